"""`archipelago bench coordinator`: a small run end to end, and the numbers its report rests on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from archipelago import config as cfglib
from coordinator import bench
from island.job import IslandJobConfig
from sim.bench import main as bench_main
from sim.run import synced_numel


def test_rss_growth_is_the_least_squares_trend_relative_to_the_mean():
    assert bench.rss_trend([100.0, 101.0, 102.0]) == pytest.approx(2 / 101)
    assert bench.rss_trend([100.0, 110.0, 90.0, 100.0]) == pytest.approx(-6 / 100)
    assert bench.rss_trend([100.0]) == 0.0


def test_a_run_longer_than_the_status_history_still_times_every_merge(tmp_path):
    out = tmp_path / "bench.json"
    rounds = bench.HISTORY_EVERY * 2 + 10  # the coordinator's status lists its newest 50 versions
    assert bench_main(["coordinator", "--islands", "2", "--rounds", str(rounds), "--warmup", "1", "--params", "2000",
                       "--json", str(out), "--workdir", str(tmp_path / "work"), "--disk-dir", str(tmp_path / "disk"),
                       "--spill-bytes", "100000"]) == 0
    report = json.loads(out.read_text())
    assert report["final_version"] == rounds + 1 and len(report["merge_s"]["all"]) == rounds
    assert len(report["rss_MB"]) == rounds + 1


def test_a_small_run_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(["coordinator", "--islands", "3", "--rounds", "2", "--warmup", "1", "--params", "20000",
                       "--seed", "7", "--json", str(out), "--workdir", str(tmp_path / "work"),
                       "--disk-dir", str(tmp_path / "disk"), "--spill-bytes", "100000"]) == 0
    report = json.loads(out.read_text())
    assert report["islands"] == 3 and report["params"] == 20000 and report["scheme"] == "int8-block"
    assert report["measured_rounds"] == 2 and len(report["rounds"]) == 3
    assert report["final_version"] == 3  # every round committed exactly one version
    assert report["rounds_per_s"] > 0
    for latency in ("round_latency_s", "commit_latency_s", "ingest_latency_s"):
        assert 0 < report[latency]["p50"] <= report[latency]["p99"] <= max(report[latency]["all"])
    for r in report["rounds"]:  # acknowledged (durable), then committed, then pulled
        assert 0 < r["ingest_s"] <= r["commit_s"] <= r["round_s"]
    assert report["aggregation_MBps"] > 0 and report["memcpy_MBps"] > 0
    assert report["aggregation_vs_memcpy"] == pytest.approx(report["aggregation_MBps"] / report["memcpy_MBps"])
    # the merge is part of the commit latency, so it runs at least as fast as the whole round's aggregation
    assert len(report["merge_s"]["all"]) == 2 and report["merge_MBps"] >= report["aggregation_MBps"]
    assert report["merge_vs_memcpy"] == pytest.approx(report["merge_MBps"] / report["memcpy_MBps"])
    assert report["ingest_wire_MBps"] == pytest.approx(
        3 * report["push_bytes"] / 1e6 / report["ingest_latency_s"]["p50"])
    assert len(report["rss_MB"]) == 3 and all(r > 0 for r in report["rss_MB"])
    assert report["rss_growth_last_100_endpoints"] == pytest.approx(report["rss_MB"][-1] / report["rss_MB"][0] - 1)
    assert report["rss_growth_last_100"] == pytest.approx(bench.rss_trend(report["rss_MB"]))
    assert len(report["merged_before_close"]) == 2 and all(0 <= m <= 3 for m in report["merged_before_close"])
    assert report["codec_kernels"] and all(k.startswith("int8-block/") for k in report["codec_kernels"])
    assert report["spill_MBps"] > 0 and report["state_dir_spill_MBps"] > 0
    assert report["disk_dir"] == str((tmp_path / "disk").resolve()) and not list((tmp_path / "disk").iterdir())
    assert 0 < report["push_bytes"] < report["fp32_bytes"] == 20000 * 4
    assert report["delta_bytes_pulled_per_round"] > 0
    assert report["seed"] == 7 and report["config"]["bench"]["islands"] == 3
    assert report["config"]["coordinator"]["min_islands"] == 3
    assert {"archipelago", "torch"} <= set(report["versions"])
    assert "rounds / s" in capsys.readouterr().out
    assert "version 3" in (tmp_path / "work" / "coordinator.log").read_text()  # the coordinator's own log
    assert not (tmp_path / "work" / "coordinator").exists()  # its state (spilled pushes) is not left behind


def test_the_default_size_is_the_tiny_presets_model():
    assert bench.TINY_PARAMS == synced_numel(cfglib.load(IslandJobConfig, "tiny").model)


def test_model_sized_tensors_have_the_asked_number_of_elements():
    tensors = bench.model_sized(3 * bench.TENSOR_NUMEL + 5, seed=0, scale=1.0)
    assert [t.numel() for t in tensors.values()] == [bench.TENSOR_NUMEL] * 3 + [5]


def test_percentile_matches_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 50, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_bad_arguments_name_the_flag():
    with pytest.raises(cfglib.ConfigError, match="--islands"):
        bench.main(["--islands", "0", "--json", "x.json"])
    with pytest.raises(cfglib.ConfigError, match="--scheme"):
        bench.main(["--scheme", "gzip", "--json", "x.json"])


def test_two_shards_each_merge_their_own_fragment(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_main(["coordinator", "--islands", "2", "--rounds", "2", "--warmup", "1", "--params",
                       str(3 * bench.TENSOR_NUMEL), "--shards", "2", "--json", str(out), "--workdir",
                       str(tmp_path / "work"), "--disk-dir", str(tmp_path / "disk"), "--spill-bytes", "100000"]) == 0
    report = json.loads(out.read_text())
    assert report["shards"] == 2 and report["final_version"] == 3  # each shard committed one version a round
    assert report["config"]["coordinator"]["num_shards"] == 2
    for shard in (0, 1):  # each shard's own log shows its commits
        assert "version 3" in (tmp_path / "work" / f"coordinator-shard-{shard}.log").read_text()
    assert report["merge_MBps"] > 0 and report["ingest_wire_MBps"] > 0 and len(report["rss_MB"]) == 3


def test_more_shards_than_tensors_is_refused():
    with pytest.raises(cfglib.ConfigError, match="--shards 3"):
        bench.BenchConfig(params=2 * bench.TENSOR_NUMEL, shards=3)
