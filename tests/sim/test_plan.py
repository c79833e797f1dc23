"""The scale model: its formulas by hand, its CLI, and `--validate` against a real small run."""

from __future__ import annotations

import json
import math

import pytest

from archipelago.cli import main as cli
from archipelago.config import ConfigError
from sim.plan import PlanInput, build_input, parse_count, parser, predict, scheme_bits


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


def link_only(p: PlanInput) -> dict[str, float]:
    """The model before the data path was counted, verbatim: what the defaults must still give."""
    b_up, b_down = scheme_bits(p.codec), scheme_bits(p.broadcast_codec)
    compute_round = p.inner_steps * p.step_time_s
    sync_fragment = p.params / p.fragments * (b_up + b_down) / p.bandwidth_bps + 2 * p.latency_s
    link_round = p.params * max(b_up, b_down) / p.bandwidth_bps
    if p.overlap:
        blocked = max(0.0, max(sync_fragment, link_round) - compute_round)
    else:
        blocked = p.fragments * sync_fragment
    bytes_round = p.params * (b_up + b_down) / 8
    ring = 8 * (p.islands - 1) * p.params
    return {
        "bits_per_param_up": b_up, "bits_per_param_down": b_down,
        "bytes_per_round_per_island": bytes_round,
        "sync_s_per_fragment": sync_fragment, "compute_s_per_round": compute_round,
        "blocked_s_per_round": blocked,
        "compute_utilization": compute_round / (compute_round + blocked),
        "wall_s": p.rounds * (compute_round + blocked),
        "comm_reduction": (ring * p.inner_steps / (p.islands * bytes_round)) if p.islands > 1 else math.inf,
        "fp32_sync_to_compute_ratio": (32 * p.params / p.bandwidth_bps + p.latency_s) / compute_round,
        "peak_wan_bits_per_s": (min(p.bandwidth_bps, p.params * b_up / p.fragments) +
                                min(p.bandwidth_bps, p.params * b_down / p.fragments)),
    }


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("kw", [
    {"params": 1e9, "islands": 4, "step_time_s": 0.5, "inner_steps": 100, "fragments": 4, "codec": "int4-block",
     "bandwidth_bps": 1e8, "latency_s": 0.05, "rounds": 10},  # test_prediction_by_hand
    {"params": 1e10, "islands": 8, "step_time_s": 1.2, "inner_steps": 100, "fragments": 1, "codec": "int8-block",
     "bandwidth_bps": 1e9, "latency_s": 0.05, "rounds": 1000},  # the README's worked example, int8, F = 1
    {"params": 1e10, "islands": 8, "step_time_s": 2, "inner_steps": 100, "fragments": 4, "codec": "int4-block",
     "broadcast_codec": "int4-block", "bandwidth_bps": 1e9, "latency_s": 0.05},  # the CLI test below
    {"params": 2.4e6, "islands": 1, "step_time_s": 0.01, "inner_steps": 4, "codec": "fp32", "latency_s": 0.0},
])
def test_defaults_reproduce_the_link_only_model_exactly(kw, overlap):
    p = PlanInput(**kw, overlap=overlap)
    out = predict(p)
    assert {k: out[k] for k in link_only(p)} == link_only(p)  # to the last bit
    assert out["sync_chain_s_per_fragment"] == out["sync_s_per_fragment"]
    assert out["encode_s_per_round"] == out["decode_s_per_round"] == out["coordinator_s_per_round"] == 0
    assert out["shards"] == 1
    explicit = PlanInput(**kw, overlap=overlap, encode_MBps=math.inf, decode_MBps=math.inf,
                         ingest_wire_MBps=math.inf, merge_MBps=math.inf, shards=1)
    assert predict(explicit) == out


def test_readme_link_only_rows_are_unchanged():
    base = {"params": 1e10, "islands": 8, "step_time_s": 1.2, "inner_steps": 100, "bandwidth_bps": 1e9,
            "latency_s": 0.05, "rounds": 1000}
    rows = [(predict(PlanInput(**base, codec="fp32", broadcast_codec="fp32", overlap=False)), 640.1),
            (predict(PlanInput(**base, codec="int8-block")), 45.1),
            (predict(PlanInput(**base, fragments=4, codec="int4-block", broadcast_codec="int4-block")), 0.0)]
    for out, blocked in rows:
        assert out["blocked_s_per_round"] == pytest.approx(blocked)
    assert [round(out["compute_utilization"], 2) for out, _ in rows] == [0.16, 0.73, 1.00]
    assert rows[2][0]["bound_by"] == "compute" and rows[2][0]["shards_needed_for_0.95"] == 1


def test_encode_and_decode_bound_island():
    # P = 1e9 fp32-equivalent is 4 GB; F = 4 fragments of 1 GB; a fast link; 50 s of compute a round
    p = PlanInput(params=1e9, islands=4, step_time_s=0.5, inner_steps=100, fragments=4, bandwidth_bps=1e11,
                  latency_s=0.0, encode_MBps=20, decode_MBps=40)
    out = predict(p)
    s = 1e9 / 4 * (8.25 + 8.25) / 1e11
    assert out["encode_s_per_round"] == pytest.approx(4e9 / 20e6)  # 200 s
    assert out["decode_s_per_round"] == pytest.approx(4e9 / 40e6)  # 100 s
    assert out["sync_chain_s_per_fragment"] == pytest.approx(50 + s + 25)
    # the island spends E + D = 300 s a round encoding and decoding; its chain (75 s) fits in it
    assert out["blocked_s_per_round"] == pytest.approx(300)
    assert out["compute_utilization"] == pytest.approx(50 / 350)
    assert out["bound_by"] == "island encode+decode" and out["coordinator_s_per_round"] == 0
    assert out["shards_needed_for_0.95"] is None and "island encode+decode binds" in out["shards_needed_note"]
    blocking = predict(PlanInput(**{**p.__dict__, "overlap": False}))
    assert blocking["blocked_s_per_round"] == pytest.approx(4 * (50 + s + 25))
    # one fragment whose chain outlasts the round and the island's own 300 s: the wait counts from
    # the round's end, encode and decode inside it
    whole = predict(PlanInput(**{**p.__dict__, "fragments": 1, "bandwidth_bps": 1e8}))
    chain = 200 + 1e9 * 16.5 / 1e8 + 100
    assert whole["sync_chain_s_per_fragment"] == pytest.approx(chain)
    assert whole["blocked_s_per_round"] == pytest.approx(chain - 50)
    assert whole["bound_by"] == "sync chain (encode)"


def test_merge_bound_coordinator_unbinds_with_shards_capped_at_fragments():
    # N = 8 pushes of a 2.5e8-parameter fragment: 8 GB fp32-equivalent to merge, 2.0625 GB on the wire
    base = {"params": 1e9, "islands": 8, "step_time_s": 1.0, "inner_steps": 100, "fragments": 4,
            "bandwidth_bps": 1e11, "latency_s": 0.0, "merge_MBps": 100}
    s = 2.5e8 * 16.5 / 1e11
    m = 8 * 2.5e8 * 4 / 100e6  # 80 s a fragment
    one = predict(PlanInput(**base))
    assert one["coordinator_s_per_round"] == pytest.approx(4 * m)
    assert one["blocked_s_per_round"] == pytest.approx(4 * m - 100)  # rounds close at the coordinator's pace
    assert one["compute_utilization"] == pytest.approx(100 / 320) and one["bound_by"] == "coordinator"
    assert one["sync_chain_s_per_fragment"] == pytest.approx(s + m)
    two = predict(PlanInput(**base, shards=2))
    assert two["coordinator_s_per_round"] == pytest.approx(2 * m)
    assert two["compute_utilization"] == pytest.approx(100 / 160)
    three = predict(PlanInput(**base, shards=3))  # one shard still owns two fragments
    assert three["coordinator_s_per_round"] == pytest.approx(2 * m)
    four = predict(PlanInput(**base, shards=4))
    assert four["coordinator_s_per_round"] == pytest.approx(m)
    assert four["blocked_s_per_round"] == 0 and four["compute_utilization"] == 1 and four["bound_by"] == "compute"
    eight = predict(PlanInput(**base, shards=8))  # shards beyond F have no fragment to own
    assert {k: v for k, v in eight.items() if k != "shards"} == {k: v for k, v in four.items() if k != "shards"}
    assert eight["shards"] == 8
    assert one["shards_needed_for_0.95"] == 4 and "4 shard(s)" in one["shards_needed_note"]
    # with ingest too: i = N·(P/F)·(b_up/8)/ingest on the same shard
    i = 8 * 2.5e8 * 8.25 / 8 / 50e6
    both = predict(PlanInput(**base, ingest_wire_MBps=50, shards=2))
    assert both["coordinator_s_per_round"] == pytest.approx(2 * (i + m))
    assert both["sync_chain_s_per_fragment"] == pytest.approx(s + i + m)
    # a fragment's own merge longer than a round: no number of shards helps
    slow = predict(PlanInput(**{**base, "merge_MBps": 20}))
    assert slow["shards_needed_for_0.95"] is None
    assert slow["shards_needed_note"].endswith("sync chain (merge) binds")
    assert "even 4 shard(s)" in slow["shards_needed_note"]


def plan_args(*extra: str) -> list[str]:
    return ["--params", "1B", "--islands", "4", "--step-time", "0.5", "--inner-steps", "100", "--fragments", "4",
            *extra]


def test_bench_files_set_the_throughputs_and_flags_override(tmp_path, capsys):
    codec = tmp_path / "codec.json"
    codec.write_text(json.dumps({"params": 123, "schemes": {
        "int4-block": {"bits_per_param": 4.3, "encode_MBps": 150.0, "encode_no_ef_MBps": 300.0,
                       "decode_MBps": 500.0},
        "int8-block": {"encode_ef_MBps": 111.0, "encode_MBps": 999.0, "decode_MBps": 222.0}}}))
    new = tmp_path / "coordinator-new.json"
    new.write_text(json.dumps({"ingest_wire_MBps": 53.0, "merge_MBps": 216.0, "push_wire_MBps": 1.0,
                               "aggregation_MBps": 2.0}))
    old = tmp_path / "coordinator-old.json"
    old.write_text(json.dumps({"push_wire_MBps": 53.0, "aggregation_MBps": 216.0, "rounds_per_s": 1.0}))

    def built(*extra: str, notes: list[str] | None = None) -> PlanInput:
        return build_input(parser().parse_args(plan_args(*extra)), {}, notes)

    # encode from the push codec's entry (error feedback first), decode from the broadcast codec's
    p = built("--codec", "int4-block", "--bench", str(codec), "--bench", str(new))
    assert (p.encode_MBps, p.decode_MBps, p.ingest_wire_MBps, p.merge_MBps) == (150, 222, 53, 216)
    assert built("--codec", "int8-block", "--bench", str(codec)).encode_MBps == 111
    notes: list[str] = []
    p = built("--bench", str(old), notes=notes)
    assert (p.merge_MBps, p.ingest_wire_MBps) == (216, math.inf)  # one interval, counted once
    assert len(notes) == 1 and "aggregation_MBps" in notes[0]
    # as `bench coordinator` writes it now: pushes acknowledged once durable, ingest apart from the merge
    now = tmp_path / "coordinator-now.json"
    now.write_text(json.dumps({"push_bytes": 1000, "fp32_bytes": 4000, "ingest_wire_MBps": 50.0,
                               "merge_MBps": 400.0, "ingest_latency_s": {"p50": 1.0}}))
    notes = []
    assert (built("--bench", str(now), notes=notes).ingest_wire_MBps, notes) == (50, [])
    # as it wrote it before: ingest_wire_MBps spans the commit, the merge inside it
    full = tmp_path / "coordinator-full.json"
    full.write_text(json.dumps({"push_bytes": 1000, "fp32_bytes": 4000, "ingest_wire_MBps": 50.0,
                                "merge_MBps": 400.0, "aggregation_MBps": 200.0}))
    notes = []
    p = built("--bench", str(full), notes=notes)  # 20 µs a push in all, 10 µs of it merging
    assert (p.ingest_wire_MBps, p.merge_MBps) == (pytest.approx(1000 / (20 - 10)), 400)
    assert len(notes) == 1 and "spans the merge" in notes[0]
    full.write_text(json.dumps({"push_bytes": 1000, "fp32_bytes": 4000, "ingest_wire_MBps": 50.0,
                                "merge_MBps": 200.0}))
    assert built("--bench", str(full)).ingest_wire_MBps == math.inf  # the merge is all of it
    p = built("--bench", str(codec), "--bench", str(new), "--merge-MBps", "100", "--encode-MBps", "inf",
              "--shards", "2")
    assert (p.encode_MBps, p.decode_MBps, p.merge_MBps, p.ingest_wire_MBps, p.shards) == (math.inf, 222, 100, 53, 2)

    path = tmp_path / "plan.json"
    assert cli(["sim", "plan", *plan_args("--bench", str(old), "--shards", "2", "--json", str(path))]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "utilization at 2 shard(s):" in printed and "shards needed for >= 0.95:" in printed
    plan = json.loads(path.read_text())
    assert plan["input"]["merge_MBps"] == 216 and plan["predicted"]["shards"] == 2
    assert plan["predicted"]["coordinator_s_per_round"] == pytest.approx(2 * 4 * 2.5e8 * 4 / 216e6)


def test_bad_data_path_input_is_a_one_line_error(tmp_path, capsys):
    codec = tmp_path / "codec.json"
    codec.write_text(json.dumps({"schemes": {"int8-block": {"encode_MBps": 100.0, "decode_MBps": -1}}}))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rounds_per_s": 1.0}))
    cases = [
        (["--codec", "int4-block", "--bench", str(codec)], [str(codec), "int4-block"]),
        (["--bench", str(codec)], [str(codec), "schemes.int8-block.decode_MBps"]),
        (["--bench", str(junk)], [str(junk), "not JSON"]),
        (["--bench", str(other)], [str(other), "bench codec", "bench coordinator"]),
        (["--bench", str(tmp_path / "missing.json")], ["missing.json", "cannot read"]),
        (["--encode-MBps", "-5"], ["--encode-MBps"]),
        (["--merge-MBps", "fast"], ["--merge-MBps"]),
        (["--ingest-MBps", "0"], ["--ingest-MBps"]),
        (["--shards", "0"], ["--shards"]),
        (["--shards", "two"], ["--shards"]),
    ]
    for extra, words in cases:
        assert cli(["sim", "plan", *plan_args(*extra)]) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        for word in words:
            assert word in err, (extra, err)
    with pytest.raises(ConfigError, match="decode_MBps"):
        PlanInput(params=1e9, islands=1, step_time_s=1, inner_steps=1, decode_MBps=0)
    with pytest.raises(ConfigError, match="shards"):
        PlanInput(params=1e9, islands=1, step_time_s=1, inner_steps=1, shards=0)


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


def test_plan_gives_the_scaling_laws_gap_next_to_the_bandwidth(tmp_path, capsys):
    from sim.law import predicted_gap

    path = tmp_path / "plan.json"
    assert cli(["sim", "plan", "--params", "10B", "--islands", "4", "--step-time", "1.2", "--inner-steps", "100",
                "--json", str(path)]) == 0
    predicted = json.loads(path.read_text())["predicted"]
    law = predicted_gap(10e9, 4)
    assert predicted["law_predicted_gap"] == law.gap and predicted["law_predicted_gap_note"] == law.note
    assert "extrapolation above" in law.note
    printed = " ".join(capsys.readouterr().out.split())
    assert f"law_predicted_gap: DiLoCo's eval loss {law.gap:+.2%}" in printed and "2503.09799" in printed
    assert cli(["sim", "plan", "--preset", "law-m4", "--step-time", "0.1", "--json", str(path)]) == 0
    predicted = json.loads(path.read_text())["predicted"]
    from archipelago.config import load
    from sim.run import SimConfig, synced_numel

    assert predicted["law_predicted_gap"] == predicted_gap(synced_numel(load(SimConfig, "law-m4").model), 4).gap
    assert "extrapolation below" in predicted["law_predicted_gap_note"]


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
