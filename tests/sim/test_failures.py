"""The goodput model under failures (sim/failures.py), by hand; its validation against a chaos run is
`archipelago sim plan --failures --validate` (docs/experiments.md); the probe that gives it J builds a
real island process."""

from __future__ import annotations

import math
import random
from dataclasses import asdict

import pytest

from archipelago import config as cfglib
from archipelago.config import ConfigError
from sim import failures
from sim.failures import FailureInput, lost_since_checkpoint, poisson_kills, predict, seconds, startup_probe
from sim.run_faults import load_config


def test_the_work_a_failure_destroys_is_about_half_a_checkpoint_interval():
    assert lost_since_checkpoint(1e-9, 60.0) == pytest.approx(30.0, abs=1e-6)
    # exactly: E[T mod c] = 1/λ - c/(e^{λc} - 1); at λc = 1 that is (1 - 1/(e - 1))/λ
    assert lost_since_checkpoint(1 / 60, 60.0) == pytest.approx(60 * (1 - 1 / (math.e - 1)))
    # no checkpoint within reach: about everything since the start (1/λ)
    assert lost_since_checkpoint(1 / 10, 1e6) == pytest.approx(10.0)


def test_one_island_failing_costs_only_itself_and_data_parallel_stops_everyone():
    # 4 islands of 100 accelerators, each failing once in 400,000 s: an island every 4,000 s, the
    # cluster every 1,000 s; down 100 + 20 s; checkpoints every 60 s of work.
    p = FailureInput(islands=4, accelerators_per_island=100, mtbf_s=400_000.0, restart_s=100.0, rejoin_s=20.0,
                     checkpoint_every_s=60.0, quorum=0.5, detect_s=30.0)
    out = predict(p)
    assert out["failures_per_hour"] == pytest.approx(3.6)
    ours = (4000 - lost_since_checkpoint(1 / 4000, 60)) / (4000 + 120)
    assert out["this_system"]["goodput"] == pytest.approx(ours, rel=1e-3)  # the quorum never stalls at 2 of 4
    sync = (1000 - lost_since_checkpoint(1 / 1000, 60)) / (1000 + 30 + 120)
    assert out["sync_data_parallel"]["goodput"] == pytest.approx(sync)
    group_down = (120 / 4000) / (1 + 120 / 4000)
    elastic = (1 - group_down) / (1 + (30 + 20) / 1000)
    assert out["elastic_data_parallel"]["goodput"] == pytest.approx(elastic, rel=1e-3)
    assert out["this_system"]["goodput"] > out["elastic_data_parallel"]["goodput"] > out["sync_data_parallel"]["goodput"]
    # a quorum of every island: each failure elsewhere makes the others wait out the lease (D)
    every = predict(FailureInput(**{**p.__dict__, "quorum": 1.0}))
    assert every["this_system"]["others_wait_fraction"] == pytest.approx(3 * 30 / 4000)
    # replica groups: a failure costs one group of 25, not the island of 100
    groups = predict(FailureInput(**{**p.__dict__, "replica_groups": 4}))
    assert groups["this_system"]["unit"] == "replica group"
    assert groups["this_system"]["goodput"] > out["this_system"]["goodput"]


def test_durations_and_inputs_are_checked():
    assert seconds("90s", "--x") == 90 and seconds("10m", "--x") == 600 and seconds("1y", "--x") == 365 * 86400
    assert seconds("2", "--mtbf", default_unit="h") == 7200
    with pytest.raises(ConfigError, match="--restart takes a duration"):
        seconds("soon", "--restart")
    with pytest.raises(ConfigError, match="multiple of --replica-groups"):
        FailureInput(islands=2, accelerators_per_island=10, mtbf_s=1.0, restart_s=1, rejoin_s=1,
                     checkpoint_every_s=1, replica_groups=3)
    with pytest.raises(ConfigError, match="give --mtbf"):
        failures.main(["--islands", "2", "--accelerators", "8"])


def test_poisson_kills_leave_each_island_up_between_them():
    kills = poisson_kills(random.Random(3), islands=3, mtbf_s=50.0, expected_s=300.0, restart_s=1.0, rejoin_s=4.0)
    assert kills == sorted(kills) and all(0 <= t < 300 for t, _ in kills)
    for island in ("island-0", "island-1", "island-2"):
        times = [t for t, i in kills if i == island]
        assert all(b - a >= 5.0 for a, b in zip(times, times[1:], strict=False))
    assert 9 <= len(kills) <= 27  # about 3 × 300 / 55 = 16 expected


def test_the_startup_probe_builds_an_island_and_reports_its_wall_and_cpu_seconds(tmp_path, data_cache):
    preset = tmp_path / "preset.toml"
    cfg = load_config("ci", [f"data.cache_dir={data_cache}"])
    preset.write_text(cfglib.dump_toml(asdict(cfg)))
    probe = startup_probe(preset, islands=2)
    assert 0.1 < probe["process_s"] < 240 and 0.1 < probe["cpu_s"] < 240, probe
    preset.write_text(cfglib.dump_toml({**asdict(cfg), "train": {**asdict(cfg)["train"], "batch_size": 0}}))
    with pytest.raises(RuntimeError, match="exited with 2"):
        startup_probe(preset, islands=2)
