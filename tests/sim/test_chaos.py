"""`archipelago chaos` end to end, shrunk: every process is started by the command under test and killed
by PID when it ends; every wait in it is bounded (`sim.timeout_s`, `chaos.timeout_s`).

- faults across islands and the coordinator (`--preset ci`): the whole seeded schedule on a small model;
- a schedule file (configs/faults-two-kills-zombie.toml, with etcd): two islands killed at once, each
  resuming from its local checkpoint, and a leader paused past its lease, which wakes as a zombie;
- faults inside an island (`--preset island-ci`): one island of 2 replica groups × 2 ranks (FSDP2 +
  expert parallel), a real coordinator, a real SIGKILL of one rank, a restart through the island gateway.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from sim import chaos
from sim.fault_schedule import load_schedule
from sim.run_faults import load_config
from tests.conftest import SMALL

WORDS = "the king queen lord of and to my a is that in thou thy with not be his for me this you".split()

SMALL_RUN = [*SMALL, "diloco.inner_steps=20", "diloco.rounds=8"]


@pytest.mark.chaos
@pytest.mark.slow
def test_a_short_chaos_run_loses_nothing_and_recovers(data_cache, tmp_path):
    """Every fault of the schedule on a small model: what must hold whatever the timing. (The goodput
    and loss targets are for the ci preset's longer run; here start-up time dominates.)"""
    cfg = load_config("ci", SMALL_RUN + [f"data.cache_dir={data_cache}"])
    report = chaos.simulate_chaos(cfg, tmp_path / "chaos", "test")
    json.dumps(report, default=str)  # the report serializes
    assert report["failures_injected"] >= 4, report["faults"]
    assert report["recovered"] == report["failures_injected"], report["faults"]
    assert report["updates_lost"] == 0 and report["updates_applied_twice"] == 0
    assert report["coordinator_failovers"] == 1
    assert report["updates_acknowledged"] > 0 and report["final_version"] > 0
    assert 0 < report["dp_goodput_same_trace"] < 1 and 0 < report["goodput"] <= 1
    for key in ("faults", "failures_injected", "recovered", "goodput", "dp_goodput_same_trace", "updates_lost",
                "updates_applied_twice", "coordinator_failovers", "final_eval_loss", "fault_free_eval_loss",
                "loss_gap_vs_fault_free", "seed", "config", "versions"):
        assert key in report


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.etcd
@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary on PATH (apt-get install -y etcd-server)")
def test_two_islands_killed_at_once_resume_and_a_woken_leader_is_refused(data_cache, tmp_path):
    cfg = load_config("ci", SMALL_RUN + [f"data.cache_dir={data_cache}", "diloco.local_checkpoint_every=3"])
    schedule = load_schedule("faults-two-kills-zombie")
    report = chaos.simulate_chaos(cfg, tmp_path / "chaos", "test", schedule=schedule)
    assert report["updates_lost"] == 0 and report["updates_applied_twice"] == 0
    kill, pause = report["faults"]
    assert kill["target"] == ["island-0", "island-1"] and kill["recovered"], kill
    # each replacement resumes from its local checkpoint, unless the coordinator holds a push made after
    # it (a kill in the step or two between a push's answer and the next checkpoint): then it says so
    logs = "".join(p.read_text() for p in (tmp_path / "chaos" / "chaos").glob("island-*-restart*.log"))
    resumed = [i["resumed_from"] for i in kill["detail"]["islands"].values()]
    assert any(resumed) and (all(resumed) or "not resuming from local checkpoint" in logs), kill["detail"]
    assert kill["recovered_at_s"] > kill["injected_at_s"]
    zombie = pause["detail"]["zombie"]
    assert pause["recovered"] and pause["detail"]["takeover_s"] < zombie["woke_after_s"], pause["detail"]
    assert zombie["lease_lapsed_before_wake"] and zombie["commits_after_wake"] == 0
    assert zombie["pushes_accepted_after_wake"] == 0 and zombie["stepped_down_after_wake_s"] is not None
    assert report["coordinator_failovers"] == 1


@pytest.mark.slow
@pytest.mark.chaos
def test_island_keeps_pushing_while_a_rank_is_down_and_the_group_heals_bit_identical(tmp_path):
    rng = random.Random(0)
    (tmp_path / "a.txt").write_text(" ".join(rng.choice(WORDS) + ("\n" if i % 13 == 0 else "")
                                             for i in range(5_000)))
    out = tmp_path / "run"
    code = chaos.main([
        "--preset", "island-ci", "--report", str(out),
        *[arg for item in [
            "model.vocab_size=512", "data.vocab_size=512", f"data.corpus='{tmp_path / 'a.txt'}'",
            f"data.cache_dir='{tmp_path / 'cache'}'", "model.dim=32", "model.num_layers=2",
            "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=64", "model.num_experts=4",
            "model.moe_ffn_dim=16", "model.max_seq_len=32", "train.batch_size=4", "train.seq_len=32",
            "train.eval_batches=2", "optim.warmup_steps=2", "sim.islands=1", "diloco.inner_steps=4",
            "diloco.rounds=40", "diloco.eval_every_rounds=0", "coordinator.checkpoint_every=10",
            "sim.timeout_s=400", "chaos.timeout_s=300", "island.timeout_s=30"] for arg in ("--set", item)]])
    report = json.loads((out / "report.json").read_text())

    assert code == 0, report["checks"]
    assert report["replica_groups"] == 2 and report["ranks_per_group"] == 2 and report["expert_parallel"]
    assert report["intra_island_failures"] >= 1 and report["intra_island_recoveries"] >= 1
    assert report["pushes_while_down"] >= 1 and report["pushes_while_down_applied"] == report["pushes_while_down"]
    assert report["updates_lost"] == 0 and report["acknowledged_pushes"] == 40
    digests = report["recovery_digests"]
    assert {d["rank"] for d in digests} == {0, 1}, "both ranks of the restarted group heal"
    assert all(d["peer_sha256"] == d["own_sha256"] for d in digests)
    assert report["syncs_after_recovery"] and report["recovered_equals_peer_at_sync"]
    assert report["theta_b_identical"]
