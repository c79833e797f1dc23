"""The scale model: its formulas by hand, its CLI, and `--validate` against a real small run."""

from __future__ import annotations

import json

import pytest

from archipelago.cli import main as cli
from sim.plan import PlanInput, parse_count, predict, scheme_bits


def test_scheme_bits_follow_the_wire_layout():
    assert scheme_bits("fp32") == 32 and scheme_bits("bf16") == 16
    assert scheme_bits("int8-block") == pytest.approx(8 + 32 / 128)  # fp32 scale per 128 values
    assert scheme_bits("int4-block") == pytest.approx(4 + 32 / 128)
    assert scheme_bits("int2-block") == pytest.approx(2 + 32 / 128)


def test_prediction_by_hand():
    p = PlanInput(params=1e9, islands=4, step_time_s=0.5, inner_steps=100, fragments=4,
                  codec="int4-block", broadcast_codec="int8-block", bandwidth_bps=1e8, latency_s=0.05,
                  rounds=10)
    out = predict(p)
    up, down = 4.25, 8.25
    sync = 1e9 / 4 * (up + down) / 1e8 + 0.1
    link = 1e9 * down / 1e8
    blocked = max(0.0, max(sync, link) - 50.0)
    assert out["sync_s_per_fragment"] == pytest.approx(sync)
    assert out["blocked_s_per_round"] == pytest.approx(blocked)
    assert out["compute_utilization"] == pytest.approx(50 / (50 + blocked))
    assert out["wall_s"] == pytest.approx(10 * (50 + blocked))
    assert out["comm_reduction"] == pytest.approx(8 * 3 * 1e9 * 100 / (4 * 1e9 * (up + down) / 8))
    assert out["fp32_sync_to_compute_ratio"] == pytest.approx((32e9 / 1e8 + 0.05) / 50)
    no_overlap = predict(PlanInput(**{**p.__dict__, "overlap": False}))
    assert no_overlap["blocked_s_per_round"] == pytest.approx(4 * sync)


def test_cli_plans_a_large_run_and_names_missing_inputs(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli(["sim", "plan", "--params", "10B", "--islands", "8", "--step-time", "2", "--inner-steps", "100",
                "--fragments", "4", "--codec", "int4-block", "--wan", "1gbit,50ms", "--json", str(path)]) == 0
    plan = json.loads(path.read_text())
    assert plan["input"]["params"] == 1e10 and plan["predicted"]["compute_utilization"] > 0
    assert parse_count("125M") == 125e6
    assert cli(["sim", "plan", "--params", "10B"]) == 2
    assert "--islands" in capsys.readouterr().err
    assert cli(["sim", "plan", "--params", "lots", "--islands", "2", "--step-time", "1", "--inner-steps", "5"]) == 2


def test_validate_runs_the_simulation_and_compares(tmp_path, data_cache, capsys):
    small = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
             "model.ffn_dim=128", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
             "optim.warmup_steps=3", "diloco.inner_steps=4", "diloco.rounds=3", "sim.islands=2",
             f"data.cache_dir={data_cache}", 'sim.wan="20mbit,20ms"', "diloco.overlap=true"]
    args = ["sim", "plan", "--preset", "ci", "--validate", "--report", str(tmp_path / "v")]
    for s in small:
        args += ["--set", s]
    assert cli(args) == 0
    plan = json.loads((tmp_path / "v" / "plan.json").read_text())
    measured, predicted = plan["measured"], plan["predicted"]
    assert measured["step_time_s"] > 0 and 0 < measured["compute_utilization"] <= 1
    assert 0 < predicted["compute_utilization"] <= 1
    assert plan["utilization_gap_points"] == pytest.approx(
        abs(predicted["compute_utilization"] - measured["compute_utilization"]) * 100)
    assert "percentage points" in capsys.readouterr().out.replace("\n", " ")
