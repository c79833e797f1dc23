"""Per-round inner steps and a shared warm start: both reach every process of a simulated run."""

from __future__ import annotations

import json

import pytest

from archipelago import config as cfglib
from archipelago.config import ConfigError
from island.diloco_config import DiLoCoConfig
from sim.run import SimConfig, simulate
from tests.conftest import SMALL

SMALL_SIM = [*SMALL, "optim.warmup_steps=2", "sim.islands=2"]


def test_round_steps_are_checked_and_summed():
    cfg = DiLoCoConfig(inner_steps=4, rounds=3, round_steps=[2, 4, 6], fragments=2)
    assert cfg.total_steps == 12 and cfg.steps_before(2) == 6 and cfg.steps_in_round(1) == 4
    assert DiLoCoConfig(inner_steps=5, rounds=2).total_steps == 10
    with pytest.raises(ConfigError, match="round_steps has 2 entries"):
        DiLoCoConfig(rounds=3, round_steps=[1, 2])
    assert DiLoCoConfig(inner_steps=4, fragments=2, rounds=2, round_steps=[2, 3]).fragment_steps(1) == [1, 2]
    with pytest.raises(ConfigError, match="at least one inner step"):
        DiLoCoConfig(inner_steps=4, fragments=2, rounds=2, round_steps=[2, 1])


def test_a_warm_started_run_uses_its_round_steps_and_both_runs_start_from_the_checkpoint(tmp_path, data_cache):
    cfg = cfglib.load(SimConfig, "ci", SMALL_SIM + [f"data.cache_dir={data_cache}", "diloco.rounds=2",
                                                "diloco.inner_steps=3", "diloco.round_steps=[2, 4]",
                                                "sim.warmstart_steps=3"])
    report = simulate(cfg, tmp_path / "sim", "test")
    assert report["round_steps"] == [2, 4]
    islands = [json.loads((tmp_path / "sim" / f"island-{i}.json").read_text()) for i in range(2)]
    assert [i["inner_steps"] for i in islands] == [6, 6] and all(i["pushes"] == 2 for i in islands)
    assert report["warmstart"]["steps"] == 3
    # the baseline's step-0 evaluation is the warm-start checkpoint's own eval loss
    assert report["baseline_eval_curve"][0]["loss"] == pytest.approx(report["warmstart"]["eval_loss"], rel=1e-6)
    assert report["baseline_tokens"] == report["tokens"]
    # island 0 measured its own model before each merge; the report says what each merge bought
    curve = report["diloco_eval_curve"]
    assert len(curve) == 2 and all(p["merge_gain"] == p["local_loss"] - p["loss"] for p in curve)
    assert report["merge_gain"] == curve[-1]["merge_gain"]
