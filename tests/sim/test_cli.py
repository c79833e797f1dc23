"""`archipelago sim --seeds`: one run per seed, and the spread of the gap across them."""

from __future__ import annotations

import json

import pytest

from archipelago.config import ConfigError
from sim import cli
from tests.conftest import SMALL

SMALL_SIM = [*SMALL, "optim.warmup_steps=2", "sim.islands=2", "diloco.inner_steps=2", "diloco.rounds=2"]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_each_seed_runs_in_its_own_folder_and_the_report_gives_the_spread(tmp_path, data_cache):
    out = tmp_path / "sim"
    assert cli.main(["--preset", "ci", "--report", str(out), "--seeds", "7,8",
                     *sets(*SMALL_SIM, f"data.cache_dir={data_cache}")]) == 0
    runs = {seed: json.loads((out / f"seed-{seed}" / "report.json").read_text()) for seed in (7, 8)}
    assert {seed: r["seed"] for seed, r in runs.items()} == {7: 7, 8: 8}
    assert runs[7]["final_eval_loss"] != runs[8]["final_eval_loss"], "the seed must reach the run"
    spread = json.loads((out / "report.json").read_text())
    assert spread["seeds"] == [7, 8] and [r["seed"] for r in spread["runs"]] == [7, 8]
    gaps = [runs[7]["loss_gap_rel"], runs[8]["loss_gap_rel"]]
    assert [r["loss_gap_rel"] for r in spread["runs"]] == gaps
    assert spread["loss_gap_rel_mean"] == pytest.approx(sum(gaps) / 2)
    assert spread["loss_gap_rel_std"] == pytest.approx(abs(gaps[0] - gaps[1]) / 2 ** 0.5)
    assert (spread["loss_gap_rel_min"], spread["loss_gap_rel_max"]) == (min(gaps), max(gaps))
    assert spread["comm_reduction_min"] == min(r["comm_reduction"] for r in runs.values())
    assert "versions" in spread and spread["seed"] == [7, 8]
    # the same model and islands in every run: the law's prediction and tokens per parameter once
    for key in ("params", "tokens_per_param", "law_predicted_gap", "law_predicted_gap_note"):
        assert spread[key] == runs[7][key] == runs[8][key], key


@pytest.mark.parametrize("seeds,match", [("1,x", "integers"), ("3,3", "distinct"), ("", "integers")])
def test_bad_seed_lists_are_refused_naming_the_flag(tmp_path, capsys, seeds, match):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--report", str(tmp_path), "--seeds", seeds])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and match in err
    assert not any(tmp_path.iterdir())


def test_seeds_and_a_fixed_seed_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.seed"):
        cli.main(["--report", str(tmp_path / "sim"), "--seeds", "1,2", "--set", "train.seed=5"])
    assert not (tmp_path / "sim").exists()
