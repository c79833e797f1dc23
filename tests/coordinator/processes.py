"""Coordinator processes for the restart and failover tests: real `archipelago coordinator serve`
processes on fixed loopback ports, started and killed by PID through `sim.run.ProcessGroup`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from archipelago import procs
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from sim.run import ProcessGroup
from tests.coordinator.conftest import ADMIN_CREDENTIAL, CoordinatorHarness, RunFiles

START_TIMEOUT_S = 120.0


def coordinator_argv(files: RunFiles, state_dir: Path, port: int, *overrides: str,
                     etcd: str = "") -> list[str]:
    # the harness's message limits (tests/coordinator/conftest.py)
    sets = [f"coordinator.islands_file={json.dumps(str(files.islands_file))}", "coordinator.chunk_bytes=65536",
            "coordinator.max_message_bytes=262144", "coordinator.lease_ttl_s=30.0",
            "coordinator.staleness_limit=2", *overrides]
    argv = ["coordinator", "serve", "--preset", "ci", "--init", str(files.init), "--state-dir", str(state_dir),
            "--host", "127.0.0.1", "--port", str(port)]
    for item in sets:
        argv += ["--set", item]
    if etcd:
        argv += ["--etcd", etcd]
    return argv


def start_coordinator(group: ProcessGroup, name: str, files: RunFiles, state_dir: Path, port: int,
                      *overrides: str, etcd: str = "", wait: bool = True) -> None:
    group.start(name, coordinator_argv(files, state_dir, port, *overrides, etcd=etcd),
                env={"ARCHIPELAGO_ADMIN_CREDENTIAL": ADMIN_CREDENTIAL})
    if wait:
        wait_serving(group, name, port)


def restart_coordinator(group: ProcessGroup, files: RunFiles, state_dir: Path, port: int,
                        *overrides: str) -> dict[str, Any]:
    """SIGKILL the process named "coordinator", start it again on the same state directory and
    port, and return its status once it serves."""
    group.kill("coordinator")
    (state_dir / "address").unlink(missing_ok=True)
    start_coordinator(group, "coordinator", files, state_dir, port, *overrides)
    return admin_status(port)


def admin_status(port: int, timeout: float = 5.0) -> dict[str, Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=timeout)
    return json.loads(reply.json)


def wait_serving(group: ProcessGroup, name: str, port: int, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Poll Admin.Status on `port` until it answers; fail early if the process exited."""
    def status() -> dict[str, Any] | None:
        try:
            return admin_status(port, timeout=2.0)
        except grpc.RpcError:
            return None

    return procs.wait_serving(status, group.procs[name], f"{name} (port {port})", timeout_s,
                              tail=lambda: group.tail(name, 30))


def harness_for(files: RunFiles, cfg: Any, port: int) -> CoordinatorHarness:
    """The conftest harness's client side, pointed at a coordinator process."""
    harness = CoordinatorHarness(cfg, files)
    harness.address = f"127.0.0.1:{port}"
    return harness


def wait_for(group: ProcessGroup, predicate: Callable[[], Any], what: str, watch: tuple[str, ...],
             timeout_s: float, may_end: tuple[str, ...] = (), poll_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true (and return that); fail early if a watched
    process exited: with any status, or with a nonzero one for those in ``may_end``."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name in watch:
            code = group.procs[name].poll()
            if code is not None and (code != 0 or name not in may_end):
                raise RuntimeError(f"{name} exited with {code}:\n{group.tail(name, 40)}")
        answer = predicate()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(poll_s)
