"""One shard of a two-shard coordinator fails mid-run (docs/design.md, "Sharded coordinator").

Real processes on loopback: two island processes with `diloco.overlap = true` train a two-fragment
model against shard 0 (fragment 0) and shard 1 (fragment 1), given as `--coordinator "a;b"`.

1. Shard 1 is killed with SIGKILL and, once shard 0 has committed during its absence, restarted on
   its state directory: no acknowledged push is lost or applied twice (the islands' ack logs
   against both shards' committed versions, as sim/goodput.py counts them), and shard 0 kept
   committing while shard 1 was down.
2. With etcd, each shard elects its own leader under its own prefix; shard 1 runs a leader and a
   standby sharing a state directory. The leader is killed; the standby takes over, nothing is
   lost or applied twice, and shard 0 is unaffected (same process, no island registered twice).

Every wait is bounded; every process is killed by PID.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from archipelago import config as cfglib
from archipelago import procs
from coordinator.store import sqlite_store
from island.job import write_initial_model
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from sim.goodput import accounting
from sim.run import ProcessGroup, SimConfig
from tests.coordinator.conftest import ADMIN_CREDENTIAL, SMALL, TOKENS
from tests.coordinator.processes import admin_status, wait_for

ROUNDS, H = 8, 20
RUN_TIMEOUT_S = 420.0
ISLANDS = ("island-0", "island-1")


class ShardedRun:
    """A two-shard run's files and processes (see the module docstring)."""

    def __init__(self, tmp_path: Path, data_cache: str, *extra: str) -> None:
        self.dir = tmp_path
        cfg = cfglib.load(SimConfig, "ci", SMALL + [
            f"data.cache_dir={data_cache}", f"diloco.inner_steps={H}", f"diloco.rounds={ROUNDS}",
            "diloco.fragments=2", "diloco.overlap=true", "diloco.eval_every_rounds=0",
            "diloco.reconnect_timeout_s=300.0",
            f"diloco.ack_log={json.dumps(str(tmp_path / 'acks-{island_id}.jsonl'))}",
            "coordinator.num_shards=2", "coordinator.checkpoint_every=2", "coordinator.min_islands=2", *extra])
        self.preset = tmp_path / "run.toml"
        self.preset.write_text(cfglib.dump_toml(asdict(cfg)))
        self.init = write_initial_model(cfg, tmp_path / "init")
        self.islands_file = tmp_path / "islands.json"
        self.islands_file.write_text(json.dumps(TOKENS))
        self.group = ProcessGroup(tmp_path)

    def start_shard(self, name: str, shard: int, state_dir: Path, port: int, *extra: str) -> None:
        self.group.start(name, [
            "coordinator", "serve", "--preset", str(self.preset), "--init", str(self.init), "--state-dir",
            str(state_dir), "--host", "127.0.0.1", "--port", str(port), "--shard-index", str(shard),
            "--set", f"coordinator.islands_file={json.dumps(str(self.islands_file))}", *extra],
            env={"ARCHIPELAGO_ADMIN_CREDENTIAL": ADMIN_CREDENTIAL})

    def serving(self, name: str, port: int, timeout_s: float = 120.0) -> dict[str, Any]:
        def status() -> dict[str, Any] | None:
            try:
                return admin_status(port, timeout=2.0)
            except grpc.RpcError:
                return None

        return procs.wait_serving(status, self.group.procs[name], name, timeout_s,
                                  tail=lambda: self.group.tail(name, 30))

    def start_islands(self, coordinator: str) -> None:
        for i, island in enumerate(ISLANDS):
            self.group.start(island, [
                "island", "run", "--preset", str(self.preset), "--coordinator", coordinator, "--island-id", island,
                "--island-index", str(i), "--num-islands", str(len(ISLANDS)), "--token", TOKENS[island],
                "--report", str(self.dir / f"{island}.json")])

    def wait(self, predicate, what: str, watch: tuple[str, ...], timeout_s: float = RUN_TIMEOUT_S) -> Any:
        """Poll `predicate` until it returns something true; fail early if a watched process died."""
        return wait_for(self.group, predicate, what, watch, timeout_s, may_end=watch, poll_s=0.1)

    def islands_done(self) -> dict[str, float]:
        """Block until both islands exited 0 (bounded); their end times."""
        ended: dict[str, float] = {}

        def done() -> bool:
            for island in ISLANDS:
                if island not in ended and self.group.procs[island].poll() == 0:
                    ended[island] = time.time()
            return len(ended) == len(ISLANDS)

        self.wait(done, "the islands did not finish", ISLANDS)
        return ended

    def acks(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for island in ISLANDS:
            path = self.dir / f"acks-{island}.jsonl"
            out[island] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return out


def version_of(port: int) -> int:
    try:
        return admin_status(port, timeout=2.0)["version"]
    except grpc.RpcError:
        return -1


def count(run: ShardedRun, stores: list[tuple[list, set]], ended: dict[str, float]) -> dict[str, Any]:
    """sim/goodput.py's accounting over both shards' committed versions and the islands' ack logs."""
    acks = run.acks()
    versions = [v for shard_versions, _ in stores for v in shard_versions]
    applied = set().union(*(a for _, a in stores))
    starts = [a["t"] for log in acks.values() for a in log if a["event"] == "start"]
    return accounting({"acks": acks, "versions": versions, "applied": applied, "stopped": {},
                       "t_start": min(starts), "finished": ended})


def sqlite_versions(state_dir: Path) -> tuple[list, set]:
    store = sqlite_store(state_dir)
    try:
        return store.versions(), {k[:3] for k in store.applied_keys()}
    finally:
        store.close()


def test_a_killed_shard_restarts_on_its_state_and_the_other_keeps_committing(data_cache, tmp_path):
    run = ShardedRun(tmp_path, data_cache)
    ports = [procs.free_port(), procs.free_port()]
    dirs = [tmp_path / "shard-0", tmp_path / "shard-1"]
    try:
        for i in range(2):
            run.start_shard(f"shard-{i}", i, dirs[i], ports[i])
        for i in range(2):
            run.serving(f"shard-{i}", ports[i])
        run.start_islands(";".join(f"127.0.0.1:{p}" for p in ports))
        run.wait(lambda: version_of(ports[1]) >= 2, "shard 1 did not commit twice", ("shard-0", "shard-1", *ISLANDS))
        killed_at_version = version_of(ports[1])
        run.group.kill("shard-1")  # SIGKILL, by PID
        killed_at = time.time()
        (dirs[1] / "address").unlink(missing_ok=True)
        before = version_of(ports[0])
        run.wait(lambda: version_of(ports[0]) > before, "shard 0 did not commit while shard 1 was down",
                 ("shard-0", *ISLANDS), timeout_s=180)
        run.start_shard("shard-1-restarted", 1, dirs[1], ports[1])
        resumed = run.serving("shard-1-restarted", ports[1])
        back_at = time.time()
        assert resumed["resumed"] and resumed["version"] >= killed_at_version, "shard 1 went back past a commit"
        ended = run.islands_done()
        finals = [admin_status(p) for p in ports]
    finally:
        run.group.kill_all()
    assert [f["version"] for f in finals] == [ROUNDS, ROUNDS]  # every round of both fragments committed
    stores = [sqlite_versions(d) for d in dirs]
    result = count(run, stores, ended)
    assert result["updates_acknowledged"] == len(ISLANDS) * ROUNDS * 2
    assert result["updates_lost"] == 0 and result["updates_applied_twice"] == 0, result["lost_keys"]
    during = [row["info"]["time"] for _, row in stores[0][0] if killed_at < row["info"]["time"] < back_at]
    assert during, "shard 0 committed nothing while shard 1 was down"
    reports = [json.loads((tmp_path / f"{i}.json").read_text()) for i in ISLANDS]
    assert {r["final_version"] for r in reports} == {2 * ROUNDS}  # the composite version
    assert len({r["theta_b_sha256"] for r in reports}) == 1
    print(f"shard 1 killed at version {killed_at_version}, down {back_at - killed_at:.1f}s; shard 0 commits in the "
          f"downtime at +{[round(t - killed_at, 2) for t in during]}s; acknowledged "
          f"{result['updates_acknowledged']}, lost {result['updates_lost']}, applied twice "
          f"{result['updates_applied_twice']}")


def island_epochs(port: int) -> dict[str, int]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=5)
    return {i.island_id: i.epoch for i in reply.islands}


def etcd_versions(endpoint: str, prefix: str) -> tuple[list, set]:
    from coordinator.etcd import EtcdSession, etcd_store

    session = EtcdSession(endpoint, prefix)
    try:
        store = etcd_store(session, -1)  # read only
        return store.versions(), {k[:3] for k in store.applied_keys()}
    finally:
        session.close()


@pytest.mark.etcd
@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary on PATH (apt-get install -y etcd-server)")
def test_a_shard_standby_takes_over_and_the_other_shard_is_unaffected(data_cache, tmp_path):
    from tests.coordinator.test_etcd import start_etcd

    ttl, prefix = 3, f"/test/{uuid.uuid4().hex}"
    (tmp_path / "etcd").mkdir()
    etcd_proc, endpoint = start_etcd(tmp_path / "etcd")
    run = ShardedRun(tmp_path, data_cache, f"coordinator.etcd_lease_ttl_s={ttl}",
                     f"coordinator.etcd_prefix={json.dumps(prefix)}")
    ports = {"a": procs.free_port(), "b": procs.free_port(), "b-standby": procs.free_port()}
    dirs = [tmp_path / "shard-0", tmp_path / "shard-1"]  # shard 1's is shared by its leader and standby
    etcd = ("--etcd", endpoint)
    try:
        run.start_shard("a", 0, dirs[0], ports["a"], *etcd)
        run.start_shard("b", 1, dirs[1], ports["b"], *etcd)
        run.serving("a", ports["a"])  # both shards lead at once: their elections do not collide
        run.serving("b", ports["b"])
        run.start_shard("b-standby", 1, dirs[1], ports["b-standby"], *etcd)
        run.start_islands(f"127.0.0.1:{ports['a']};127.0.0.1:{ports['b']},127.0.0.1:{ports['b-standby']}")
        run.wait(lambda: version_of(ports["b"]) >= 2, "shard 1 did not commit twice", ("a", "b", *ISLANDS))
        assert version_of(ports["b-standby"]) == -1, "the standby serves while its leader lives"
        before = version_of(ports["a"])
        run.group.kill("b")  # SIGKILL the shard's leader, by PID
        killed_at = time.time()
        run.serving("b-standby", ports["b-standby"], timeout_s=4 * ttl + 30)
        took_over_s = time.time() - killed_at
        ended = run.islands_done()
        finals = {name: admin_status(ports[name]) for name in ("a", "b-standby")}
        epochs = {name: island_epochs(ports[name]) for name in ("a", "b-standby")}
        assert run.group.procs["a"].poll() is None, "shard 0's leader stopped"
        stores = [etcd_versions(endpoint, f"{prefix}/shard-{i}") for i in range(2)]
    finally:
        run.group.kill_all()
        procs.kill_group(etcd_proc)
    assert finals["a"]["version"] == ROUNDS and finals["b-standby"]["version"] == ROUNDS
    assert "lost leadership" not in (tmp_path / "a.log").read_text()
    # the failover was shard 1's alone: no island registered with shard 0 twice
    assert epochs["a"] == dict.fromkeys(ISLANDS, 1) and all(e > 1 for e in epochs["b-standby"].values()), epochs
    result = count(run, stores, ended)
    assert result["updates_acknowledged"] == len(ISLANDS) * ROUNDS * 2
    assert result["updates_lost"] == 0 and result["updates_applied_twice"] == 0, result["lost_keys"]
    after = [row["info"]["time"] for v, row in stores[0][0] if v > before]
    print(f"shard 1's standby took over {took_over_s:.1f}s after its leader was killed (shard 0 at version "
          f"{before}, then committing at +{[round(t - killed_at, 2) for t in after]}s); acknowledged "
          f"{result['updates_acknowledged']}, lost {result['updates_lost']}, applied twice "
          f"{result['updates_applied_twice']}")
