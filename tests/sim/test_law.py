"""The scaling law's predicted gap (sim/law.py), the law presets' own arithmetic, and the report's
law fields on a small simulation."""

from __future__ import annotations

import json

import pytest

from archipelago import config as cfglib
from sim import cli
from sim.law import DATA_PARALLEL, DILOCO, predicted_gap
from sim.run import SimConfig, synced_numel
from tests.conftest import SMALL

# Charles et al. (arXiv:2503.09799) Table 4 at 35M parameters: data parallel 3.485; M = 2, 4, 8
TABLE4_35M = {2: 3.508 / 3.485 - 1, 4: 3.554 / 3.485 - 1, 8: 3.621 / 3.485 - 1}
LAW_PRESETS = ("law-m2", "law-m4", "law-m2-small", "law-m4-small")


def test_the_fits_reproduce_the_papers_figures():
    # taken below the smallest fitted size, at 0.25M: about +1.5% (M = 2) and +3.9% (M = 4)
    assert predicted_gap(0.25e6, 2).gap == pytest.approx(0.0149, abs=5e-4)
    assert predicted_gap(0.25e6, 4).gap == pytest.approx(0.0385, abs=5e-4)
    # at 35M, the measured gaps of Table 4 to within 0.25 points
    for m, measured in TABLE4_35M.items():
        assert predicted_gap(35e6, m).gap == pytest.approx(measured, abs=0.0025), m
    # the fits' own losses at 35M are Table 4's to within 1%
    assert DATA_PARALLEL.loss(35e6) == pytest.approx(3.485, rel=1e-2)
    assert DILOCO[4].loss(35e6) == pytest.approx(3.554, rel=1e-2)


def test_the_gap_falls_with_size_and_rises_with_islands():
    sizes = (0.1e6, 0.25e6, 35e6, 2.4e9)
    for m in (2, 3, 4, 8):
        gaps = [predicted_gap(n, m).gap for n in sizes]
        assert gaps == sorted(gaps, reverse=True), m
    for n in sizes:
        gaps = [predicted_gap(n, m).gap for m in (2, 3, 4, 8)]
        assert gaps == sorted(gaps), n


def test_the_note_says_where_the_figure_comes_from():
    below, inside, above = predicted_gap(0.2e6, 4), predicted_gap(1e9, 4), predicted_gap(1e10, 8)
    assert "2503.09799" in below.note and "extrapolation below" in below.note and "N = 0.2M" in below.note
    assert "within the fitted" in inside.note
    assert "extrapolation above" in above.note and "N = 10B" in above.note
    three = predicted_gap(2e6, 3)
    assert "interpolated" in three.note and predicted_gap(2e6, 2).gap < three.gap < predicted_gap(2e6, 4).gap
    for m in (1, 16):
        none = predicted_gap(2e6, m)
        assert none.gap is None and f"no fit for M = {m}" in none.note
    assert predicted_gap(2e6, 2).fields() == {"law_predicted_gap": predicted_gap(2e6, 2).gap,
                                              "law_predicted_gap_note": predicted_gap(2e6, 2).note}
    with pytest.raises(ValueError):
        predicted_gap(0, 2)


@pytest.mark.parametrize("preset", LAW_PRESETS)
def test_each_law_preset_trains_20_tokens_per_parameter_by_its_own_arithmetic(preset):
    cfg = cfglib.load(SimConfig, preset)
    m, steps = cfg.sim.islands, cfg.total_inner_steps
    tokens = m * steps * cfg.train.batch_size * cfg.train.seq_len  # DiLoCo's, and the baseline's
    assert tokens / synced_numel(cfg.model) >= 20
    assert m == (4 if "m4" in preset else 2) and cfg.sim.baseline == "ddp"
    # the published protocol (arXiv:2503.09799)
    assert cfg.diloco.inner_steps == 30 and cfg.diloco.round_steps == []
    assert (cfg.coordinator.outer_momentum, cfg.coordinator.nesterov) == (0.9, True)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.schedule, cfg.optim.min_lr_ratio) == (0.9, 0.99, "cosine", 0.05)
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.warmup_steps > 0
    assert cfg.optim.lr * cfg.optim.weight_decay * steps == pytest.approx(1, rel=0.01)  # a decay of 1/T a step
    assert cfg.model.qk_norm and cfg.model.z_loss > 0
    assert cfg.sim.warmstart_steps == 0  # from scratch
    # the same held-out windows at both M of a size
    assert cfg.train.eval_batches * cfg.train.batch_size == 256


def test_the_two_sizes_share_everything_but_the_model_and_batch():
    big, small = cfglib.load(SimConfig, "law-m4"), cfglib.load(SimConfig, "law-m4-small")
    assert synced_numel(small.model) * 2 < synced_numel(big.model)
    assert small.model.vocab_size == big.model.vocab_size and small.train.seq_len == big.train.seq_len
    assert small.diloco.inner_steps == big.diloco.inner_steps
    for preset in ("law-m2", "law-m2-small"):
        m2, m4 = cfglib.load(SimConfig, preset), cfglib.load(SimConfig, preset.replace("m2", "m4"))
        assert m2.train.batch_size * 2 == m4.train.batch_size * 4  # the same global batch
        assert (m2.total_inner_steps, m2.model) == (m4.total_inner_steps, m4.model)


def test_the_report_carries_tokens_per_parameter_and_the_predicted_gap(tmp_path, data_cache, capsys):
    out = tmp_path / "sim"
    small = [*SMALL, "model.vocab_size=4096", "data.vocab_size=4096", "train.eval_batches=2",
             "diloco.inner_steps=2", "diloco.rounds=2", "diloco.eval_every_rounds=1", f"data.cache_dir={data_cache}"]
    assert cli.main(["--preset", "law-m2", "--report", str(out), *[a for s in small for a in ("--set", s)]]) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = cfglib.load(SimConfig, "law-m2", small)
    params = synced_numel(cfg.model)
    assert report["params"] == params
    assert report["tokens_per_param"] == pytest.approx(report["tokens"] / params)
    assert report["tokens"] == 2 * 4 * 4 * 32 == report["baseline_tokens"]
    assert report["law_predicted_gap"] == predicted_gap(params, 2).gap
    assert "extrapolation below" in report["law_predicted_gap_note"]
    assert report["loss_gap_rel"] == pytest.approx(report["final_eval_loss"] / report["baseline_eval_loss"] - 1)
    printed = capsys.readouterr().out
    assert "law_predicted_gap" in printed and "tokens_per_param" in printed and "loss_gap_rel" in printed
