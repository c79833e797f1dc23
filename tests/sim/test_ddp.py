"""The synchronous data-parallel baseline: real gloo workers, exact gradient averaging, cleanup."""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sim.ddp
from archipelago.config import load
from island.train import Trainer, TrainJobConfig, model_tensors
from sim.ddp import WorkerError, run_ddp

WORDS = "the king queen lord of and to my a is that in thou thy with not be his for me this you".split()
STEPS = 5


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> TrainJobConfig:
    """A very small model on a small synthetic corpus, so two workers run in seconds."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = random.Random(0)
    (root / "a.txt").write_text(" ".join(rng.choice(WORDS) + ("\n" if i % 13 == 0 else "")
                                         for i in range(20_000)))
    return load(TrainJobConfig, "tiny", [
        "model.vocab_size=512", "data.vocab_size=512", f"data.corpus='{root / 'a.txt'}'",
        f"data.cache_dir='{root / 'cache'}'", "model.dim=64", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "model.ffn_dim=128", "train.batch_size=4", "train.seq_len=32",
        "train.eval_batches=2"])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The workers run single-threaded; the reference must too, or matmuls may round differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_all_dead(pids: list[int]) -> None:
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ddp_equals_one_process_averaging_both_shards(job: TrainJobConfig, tmp_path: Path,
                                                      one_thread: None) -> None:
    result = run_ddp(job, num_workers=2, steps=STEPS, out_dir=tmp_path, eval_every=2, timeout_s=120)

    # The reference: one model; at each step the gradients of shard 0 and shard 1 are computed
    # on it in turn (two Trainers sharing the model, each with its own loader), averaged the
    # way the all-reduce does ((g0 + g1) / 2), and applied by shard 0's AdamW.
    t0 = Trainer(job, island_id=0, num_islands=2, total_steps=STEPS)
    t1 = Trainer(job, island_id=1, num_islands=2, total_steps=STEPS, model=t0.model)
    params = list(t0.model.parameters())
    for _ in range(STEPS):
        t0.forward_backward()
        g0 = [p.grad.clone() for p in params]
        t0.optimizer.zero_grad(set_to_none=True)
        t1.forward_backward()
        for p, g in zip(params, g0, strict=True):
            p.grad = (g + p.grad) / 2
        t0.optimizer_step()

    num_params = sum(p.numel() for p in params)
    assert result["workers"] == 2 and result["steps"] == STEPS and result["params"] == num_params
    assert result["tokens"] == STEPS * 2 * t0.tokens_per_step
    assert [e["step"] for e in result["eval_curve"]] == [0, 2, 4, 5]
    assert [e["tokens"] for e in result["eval_curve"]] == [s * 2 * t0.tokens_per_step for s in (0, 2, 4, 5)]
    assert result["final_eval_loss"] == result["eval_curve"][-1]["loss"]
    assert abs(result["final_eval_loss"] - t0.evaluate()) < 1e-4
    assert result["wall_s"] > 0
    assert result["baseline_wan_bytes"] == 8 * 1 * num_params * STEPS

    ddp = load_file(result["final_params"])
    ref = model_tensors(t0.model)
    assert set(ddp) == set(ref)
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-5, f"DDP params differ from the averaged-gradient reference by {worst}"
    # Training on shard 0 alone lands elsewhere, so the match above is the averaging's doing.
    alone = Trainer(job, island_id=0, num_islands=2, total_steps=STEPS)
    for _ in range(STEPS):
        alone.train_step()
    assert max(float((ddp[k] - v).abs().max()) for k, v in model_tensors(alone.model).items()) > 1e-4


def test_crashing_worker_kills_the_others(job: TrainJobConfig, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_argv = sim.ddp._worker_argv

    def argv(spec_path: Path, rank: int) -> list[str]:
        if rank == 1:  # dies while rank 0 is still starting or waiting for it to join
            return [sys.executable, "-c", "import sys, time; time.sleep(2); print('boom', file=sys.stderr); "
                                          "sys.exit(7)"]
        return real_argv(spec_path, rank)

    monkeypatch.setattr(sim.ddp, "_worker_argv", argv)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker 1 .* exited with code 7") as info:
        run_ddp(job, num_workers=2, steps=STEPS, out_dir=tmp_path, eval_every=2, timeout_s=120)
    assert time.monotonic() - start < 30
    assert "boom" in str(info.value)
    assert_all_dead(info.value.pids)


def test_bad_config_in_workers_raises_with_their_stderr(job: TrainJobConfig, tmp_path: Path) -> None:
    bad = dataclasses.replace(job, train=dataclasses.replace(job.train, device="tpu"))
    with pytest.raises(RuntimeError, match="exited with code 1") as info:
        run_ddp(bad, num_workers=2, steps=STEPS, out_dir=tmp_path, eval_every=2, timeout_s=120)
    assert "train.device" in str(info.value)
    assert_all_dead(info.value.pids)


def test_timeout_kills_the_workers(job: TrainJobConfig, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError, match="timed out after 3 s") as info:
        run_ddp(job, num_workers=2, steps=10**6, out_dir=tmp_path, eval_every=10**6, timeout_s=3)
    assert time.monotonic() - start < 10
    assert_all_dead(info.value.pids)
