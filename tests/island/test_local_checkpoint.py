"""Island-local checkpoints (island/local_checkpoint.py) against a real coordinator over gRPC.

An island process dies mid-round (an exception out of its inner steps: the coordinator keeps its
lease, as after a SIGKILL); a new process of the same island resumes from the newest local
checkpoint, with the data cursor and AdamW state that checkpoint saved, and finishes the run. Its
pushes are applied once each, and with one island the run ends on the θ_b of a run that was never
interrupted, bit for bit (the steps after the checkpoint are redone on the same batches from the
same state).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from archipelago.checkpoint import read_checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.store import sqlite_store
from island.connection import CoordinatorLink
from island.diloco import DiLoCoClient, InnerSteps
from island.job import load_job, write_initial_model
from island.local_checkpoint import LocalCheckpoints
from island.train import Trainer, optimizer_tensors
from protos.broadcast import digest
from tests.conftest import SMALL
from tests.coordinator.conftest import ADMIN_CREDENTIAL, TOKENS, CoordinatorHarness, RunFiles

H, ROUNDS, EVERY, CRASH_AT = 8, 3, 3, 14  # checkpoints at steps 3, 6, 9, 12; the crash after step 14


class Crash(Exception):
    pass


class WrittenSteps(InnerSteps):
    """The default inner steps, one at a time, each after the last checkpoint is written (the model
    is small: without the wait a checkpoint could come due while the last is still being written,
    and be skipped); dying after step `crash_at` when it is given."""

    def __init__(self, crash_at: int = 0) -> None:
        self.crash_at = crash_at

    def train(self, client: DiLoCoClient, steps: int, fragment: int) -> None:
        for _ in range(steps):
            assert client.local_checkpoints.wait_written(30.0)
            super().train(client, 1, fragment)
            if client.trainer.step == self.crash_at:
                client.local_checkpoints.close(30.0)  # the checkpoint of step 12 is on disk by now
                raise Crash


class JoinedSteps(WrittenSteps):
    """The default inner steps, keeping the trainer's state as it was when the client joined."""

    def joined(self, client: DiLoCoClient) -> None:
        trainer = client.trainer
        self.state = {"step": trainer.step, "cursor": trainer.loader.state_dict(),
                      "optimizer": {k: v.clone() for k, v in optimizer_tensors(trainer.optimizer).items()},
                      "resumed_from": client.local_checkpoints.resumed_from}


def start_coordinator(files: RunFiles, state_dir: Path) -> CoordinatorHarness:
    cfg = CoordinatorConfig(host="127.0.0.1", port=0, islands_file=str(files.islands_file),
                            admin_credential=ADMIN_CREDENTIAL, lease_ttl_s=30.0, staleness_limit=2,
                            broadcast_scheme="int8-block", checkpoint_every=1, state_dir=str(state_dir))
    harness = CoordinatorHarness(cfg, files)
    harness.start()
    return harness


def run_island(job, address: str, steps: InnerSteps) -> DiLoCoClient:
    trainer = Trainer(job, island_id=0, num_islands=1, total_steps=job.total_inner_steps)
    link = CoordinatorLink(job.diloco, address, "island-0", TOKENS["island-0"])
    client = DiLoCoClient(job.diloco, trainer, link, steps)
    try:
        client.run()
    except Crash:
        pass
    return client


def applied_keys(state_dir: Path) -> list[tuple]:
    store = sqlite_store(state_dir)
    try:
        return [tuple(k) for _, row in store.versions() for k in row["keys"]]
    finally:
        store.close()


def test_a_restarted_island_resumes_from_its_local_checkpoint(data_cache, tmp_path, monkeypatch):
    # Eager codec kernels: with the coordinator in this process, compiling them at the first push
    # made that round's delta differ from run to run here, which the bit-for-bit comparison at the
    # end would take for a difference the resume made.
    monkeypatch.setenv("ARCHIPELAGO_CODEC_COMPILE", "0")
    job = load_job("ci", SMALL + [
        f"data.cache_dir={data_cache}", f"diloco.inner_steps={H}", f"diloco.rounds={ROUNDS}",
        "diloco.eval_every_rounds=0", f"diloco.local_checkpoint_every={EVERY}",
        f"diloco.local_checkpoint_dir={json.dumps(str(tmp_path / 'local' / '{island_id}'))}",
        f"diloco.ack_log={json.dumps(str(tmp_path / 'acks-{island_id}.jsonl'))}"])
    islands_file = tmp_path / "islands.json"
    islands_file.write_text(json.dumps(TOKENS))
    files = RunFiles(job, write_initial_model(job, tmp_path / "init"), islands_file, "", [], {})

    coordinator = start_coordinator(files, tmp_path / "coordinator")
    try:
        first = run_island(job, coordinator.address, WrittenSteps(CRASH_AT))
        assert first.trainer.step == CRASH_AT and first.local_checkpoints.saved == CRASH_AT // EVERY
        saved_files, saved = read_checkpoint(tmp_path / "local" / "island-0" / f"step-{12:09d}")
        assert saved["step"] == 12 and saved["position"] == [1, 0, 4] and saved["pushes_held"] == 1

        joined = JoinedSteps()
        second = run_island(job, coordinator.address, joined)
        final = digest(second.theta_b)
    finally:
        coordinator.stop()

    # the restarted process took the state the checkpoint saved, not a fresh one
    state = joined.state
    assert state["resumed_from"]["step"] == 12 and state["step"] == 12
    assert state["cursor"] == saved["data_cursor"]
    optimizer = saved_files["optimizer.safetensors"]
    assert set(state["optimizer"]) == set(optimizer)
    assert all(torch.equal(state["optimizer"][k], optimizer[k]) for k in optimizer)
    assert second.trainer.step == H * ROUNDS and second.version == ROUNDS

    # every push applied once: round 0 from the first process, rounds 1 and 2 from the second
    listed = applied_keys(tmp_path / "coordinator")
    assert sorted(listed) == [("island-0", r, 0) for r in range(ROUNDS)]
    acks = [json.loads(line) for line in (tmp_path / "acks-island-0.jsonl").read_text().splitlines()]
    assert [a["round"] for a in acks if a["event"] == "push"] == [0, 1, 2]
    starts = [a for a in acks if a["event"] == "start"]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"]["step"] == 12
    assert [a["step"] for a in acks if a["event"] == "checkpoint"][:4] == [3, 6, 9, 12]

    # the same run without the crash ends on the same θ_b, bit for bit
    again = replace(job, diloco=replace(job.diloco, local_checkpoint_dir=str(tmp_path / "other" / "{island_id}"),
                                        ack_log=""))
    coordinator = start_coordinator(files, tmp_path / "coordinator-uninterrupted")
    try:
        assert digest(run_island(again, coordinator.address, WrittenSteps()).theta_b) == final
    finally:
        coordinator.stop()


def registration(**fields):
    return SimpleNamespace(**{"epoch": 2, "timeline": 0, "version": 5, "staleness_limit": 4, "received_pushes": 3,
                              "num_shards": 1, **fields})


def test_a_checkpoint_whose_base_the_coordinator_no_longer_accepts_is_not_resumed():
    client = SimpleNamespace(island_id="island-0", config_hash="abc")
    meta = {"kind": "island-local", "island_id": "island-0", "config_hash": "abc", "timeline": 0, "version": 3,
            "pushes_held": 3}
    assert LocalCheckpoints.refusal(meta, registration(), client) is None
    for fields, reason in [({"timeline": 1}, "timeline"), ({"version": 8}, "staleness limit"),
                           ({"version": 2}, "ahead"), ({"received_pushes": 4}, "holds 4 pushes"),
                           ({"epoch": 1}, "new run"), ({"num_shards": 2}, "sharded")]:
        assert reason in LocalCheckpoints.refusal(meta, registration(**fields), client)
    assert "another model" in LocalCheckpoints.refusal({**meta, "config_hash": "x"}, registration(), client)
