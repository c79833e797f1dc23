"""A coordinator process killed with SIGKILL and restarted on the same state directory.

1. At most once, acknowledged means kept: a push acknowledged before the kill is still pending after
   the restart (re-sending it is ALREADY_EXISTS); a push of the old epoch is refused with a
   re-register order; after the round commits and the coordinator is killed again, the version
   (not checkpointed: replayed from the spilled pushes) and θ_b are exactly what they were.
2. With real island processes: the coordinator is killed mid-run and restarted; the islands
   re-register by themselves and finish; versions continue; no acknowledged push is lost and none
   is applied twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from archipelago import config as cfglib
from archipelago.procs import free_port
from coordinator.config import CoordinatorConfig
from coordinator.store import sqlite_store
from island.job import write_initial_model
from sim.run import ProcessGroup, SimConfig
from tests.coordinator.conftest import ADMIN_CREDENTIAL, SMALL, TOKENS
from tests.coordinator.processes import admin_status, harness_for, restart_coordinator, start_coordinator

RUN_TIMEOUT_S = 300.0


def test_acknowledged_pushes_survive_a_kill_and_apply_once(run_files, tmp_path):
    state_dir, port = tmp_path / "coordinator", free_port()
    overrides = ("coordinator.min_islands=2", "coordinator.checkpoint_every=2")
    cfg = CoordinatorConfig(chunk_bytes=65536, max_message_bytes=262144)
    c = harness_for(run_files, cfg, port)
    group = ProcessGroup(tmp_path)
    try:
        start_coordinator(group, "coordinator", run_files, state_dir, port, *overrides)
        lease0, lease1 = c.register("island-0"), c.register("island-1")
        assert c.push(lease0, 0, 0, 0, c.pseudo_grad(0, seed=0)).accepted  # acknowledged, pending

        status = restart_coordinator(group, run_files, state_dir, port, *overrides)
        assert status["version"] == 0 and status["pending_pushes"] == 1
        with pytest.raises(grpc.RpcError) as err:  # the old epoch is fenced
            c.push(lease1, 0, 0, 0, c.pseudo_grad(0, seed=1))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("archipelago-action", "register") in tuple(err.value.trailing_metadata())
        new0 = c.register("island-0")
        assert new0.epoch > lease0.epoch
        with pytest.raises(grpc.RpcError) as err:  # the island's retry of its acknowledged push
            c.push(new0, 0, 0, 0, c.pseudo_grad(0, seed=0))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        new1 = c.register("island-1")
        reply = c.push(new1, 0, 0, 0, c.pseudo_grad(0, seed=1))
        assert reply.version == 1  # the round closed with both pushes
        theta_b = c.register_reply("island-2").theta_b_sha256

        status = restart_coordinator(group, run_files, state_dir, port, *overrides)
        assert status["version"] == 1 and status["resumed"] and status["replayed_versions"] == 1
        assert c.register_reply("island-2").theta_b_sha256 == theta_b  # replayed bit for bit
        again = c.register("island-1")
        with pytest.raises(grpc.RpcError) as err:
            c.push(again, 0, 0, 0, c.pseudo_grad(0, seed=1))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert admin_status(port)["version"] == 1
    finally:
        group.kill_all()
        c.stop()
    store = sqlite_store(state_dir)
    try:
        assert sorted(k[:3] for k in store.applied_keys()) == [("island-0", 0, 0), ("island-1", 0, 0)]
        [(version, row)] = store.versions()
        assert version == 1 and sorted(map(tuple, row["keys"])) == [("island-0", 0, 0), ("island-1", 0, 0)]
    finally:
        store.close()


def read_acks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_coordinator_restarts_and_islands_finish(data_cache, tmp_path):
    rounds, h = 8, 30
    cfg = cfglib.load(SimConfig, "ci", SMALL + [
        f"data.cache_dir={data_cache}", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "optim.warmup_steps=3", f"diloco.inner_steps={h}", f"diloco.rounds={rounds}", "diloco.eval_every_rounds=0",
        f"diloco.ack_log={json.dumps(str(tmp_path / 'acks-{island_id}.jsonl'))}",
        "coordinator.checkpoint_every=2", "coordinator.min_islands=2"])
    preset = tmp_path / "run.toml"
    preset.write_text(cfglib.dump_toml(cfg_dict(cfg)))
    state_dir, port = tmp_path / "coordinator", free_port()
    init = write_initial_model(cfg, state_dir / "init")
    islands_file = tmp_path / "islands.json"
    islands_file.write_text(json.dumps(TOKENS))
    argv = ["coordinator", "serve", "--preset", str(preset), "--init", str(init), "--state-dir", str(state_dir),
            "--port", str(port), "--set", f"coordinator.islands_file={json.dumps(str(islands_file))}"]
    group = ProcessGroup(tmp_path)
    try:
        env = {"ARCHIPELAGO_ADMIN_CREDENTIAL": ADMIN_CREDENTIAL}
        group.start("coordinator", argv, env=env)
        wait_version(group, port, 0, "coordinator", timeout_s=120)
        for i in range(2):
            group.start(f"island-{i}", ["island", "run", "--preset", str(preset), "--coordinator",
                                        f"127.0.0.1:{port}", "--island-id", f"island-{i}", "--island-index",
                                        str(i), "--num-islands", "2", "--token", TOKENS[f"island-{i}"],
                                        "--report", str(tmp_path / f"island-{i}.json")])
        killed_at = wait_version(group, port, 2, "coordinator")["version"]
        group.kill("coordinator")  # SIGKILL, mid-run
        assert killed_at < rounds
        time.sleep(1.0)
        group.start("coordinator-restarted", argv, env=env)
        resumed_at = wait_version(group, port, 0, "coordinator-restarted", timeout_s=120)["version"]
        assert resumed_at >= killed_at, "the version went back past a commit"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for i in range(2):
            proc = group.procs[f"island-{i}"]
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, group.tail(f"island-{i}", 30)
        final = admin_status(port)
    finally:
        group.kill_all()
    assert final["version"] == rounds
    reports = [json.loads((tmp_path / f"island-{i}.json").read_text()) for i in range(2)]
    assert all(r["final_version"] == rounds for r in reports)
    store = sqlite_store(state_dir)
    try:
        applied = {k[:3] for k in store.applied_keys()}
        listed = [tuple(k) for _, row in store.versions() for k in row["keys"]]
    finally:
        store.close()
    assert len(listed) == len(set(listed)) == 2 * rounds, "a push was applied twice (or missing)"
    acked = [(a["island"], a["round"], a["fragment"]) for i in range(2)
             for a in read_acks(tmp_path / f"acks-island-{i}.jsonl") if a["event"] == "push"]
    assert set(acked) <= applied, f"acknowledged but not applied: {set(acked) - applied}"
    starts = [a for i in range(2) for a in read_acks(tmp_path / f"acks-island-{i}.jsonl") if a["event"] == "start"]
    assert len(starts) == 2  # the islands were not restarted: they re-registered by themselves
    logs = "".join((tmp_path / f"island-{i}.log").read_text() for i in range(2))
    assert "registered again" in logs


def cfg_dict(cfg: SimConfig) -> dict:
    from dataclasses import asdict

    return asdict(replace(cfg))


def wait_version(group: ProcessGroup, port: int, version: int, coordinator: str,
                 timeout_s: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        for name, proc in group.procs.items():
            if proc.poll() not in (None, 0) and (name.startswith("island") or name == coordinator):
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{group.tail(name, 30)}")
        try:
            status = admin_status(port, timeout=2.0)
            if status["version"] >= version:
                return status
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {version} not reached within {timeout_s}s")
        time.sleep(0.05)
