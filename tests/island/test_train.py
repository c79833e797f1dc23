"""The local trainer: schedules, checkpoints bit-exact, resume identical, and the report."""

from __future__ import annotations

import json

import pytest
import torch

from archipelago import config as cfglib
from archipelago.checkpoint import CheckpointError
from island.train import OptimConfig, Trainer, TrainJobConfig, lr_at
from tests.conftest import SMALL

SMALL_JOB = [*SMALL, "train.steps=12"]


@pytest.fixture
def small_job(data_cache):
    def make(*extra: str) -> TrainJobConfig:
        return cfglib.load(TrainJobConfig, "tiny", SMALL_JOB + [f"data.cache_dir={data_cache}", *extra])
    return make


def test_schedules_warm_up_then_decay_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 99, 100) == pytest.approx(0.1, abs=1e-3)
    wsd = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(wsd, 50, 100) == 1.0 and lr_at(wsd, 90, 100) == pytest.approx(0.5)


def test_checkpoint_save_load_is_bit_exact_and_resume_continues_identically(tmp_path, small_job):
    job = small_job()
    straight = Trainer(job)
    losses = [straight.train_step().loss for _ in range(12)]

    first = Trainer(job)
    for _ in range(6):
        first.train_step()
    ckpt = first.save_checkpoint(tmp_path / "ckpt")
    resumed = Trainer(job)
    resumed.load_checkpoint(ckpt)
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for pa, pb in zip(first.model.parameters(), resumed.model.parameters(), strict=True):
        sa, sb = first.optimizer.state[pa], resumed.optimizer.state[pb]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.step == 6
    rest = [resumed.train_step().loss for _ in range(6)]
    assert rest == losses[6:], "a resumed run must produce the same losses as an uninterrupted one"
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_corrupt_or_missing_checkpoint_files_are_named(tmp_path, small_job):
    job = small_job()
    trainer = Trainer(job)
    ckpt = trainer.save_checkpoint(tmp_path / "ckpt")
    blob = bytearray((ckpt / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        trainer.load_checkpoint(ckpt)
    (ckpt / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing|sha256"):
        trainer.load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.load_checkpoint(tmp_path / "nowhere")


def test_training_reduces_eval_loss_and_writes_report(tmp_path, small_job):
    from island.train_cli import run

    job = small_job("train.steps=40", "train.eval_every=20", "optim.lr=1e-2")
    report = run(job, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    for key in ("params", "tokens", "steps", "initial_eval_loss", "final_eval_loss", "tokens_per_s",
                "wall_s", "checkpoint", "seed", "config", "versions"):
        assert key in saved, key
    assert saved["steps"] == 40 and saved["tokens"] == 40 * 4 * 32
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 1.0
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0
    assert saved["versions"]["torch"] == torch.__version__


def test_job_cross_checks_vocab_and_sequence_length(tmp_path, small_job):
    with pytest.raises(cfglib.ConfigError, match="data.vocab_size"):
        small_job("data.vocab_size=512")
    with pytest.raises(cfglib.ConfigError, match="train.seq_len"):
        small_job("train.seq_len=1024")


def test_eval_loss_is_the_cross_entropy_without_the_z_loss(small_job):
    plain, with_z = Trainer(small_job()), Trainer(small_job("model.z_loss=0.01"))
    assert with_z.evaluate() == plain.evaluate()  # the same init: z-loss is a training term only
    x, y = plain.eval_set[0]
    assert float(with_z.model.loss(x, y)) > float(plain.model.loss(x, y))
