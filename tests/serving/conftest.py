"""Tiny real checkpoints (two training steps on a small corpus) for the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archipelago import config as cfglib
from island.data.prepare import CORPUS_ROOT
from island.train import Trainer, TrainJobConfig

SMALL = ["model.vocab_size=512", "data.vocab_size=512", "model.dim=64", "model.num_layers=2",
         "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=96", "model.moe_ffn_dim=32",
         "model.num_experts=4", "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32",
         "train.eval_batches=2", "train.steps=2", "optim.warmup_steps=1", "train.device=cpu"]

# name -> (preset, overrides, HF architecture the export must pick)
VARIANTS = {
    "qwen3": ("tiny", ["model.num_experts=0"], "Qwen3ForCausalLM"),
    "llama": ("tiny", ["model.num_experts=0", "model.qk_norm=false", "model.tie_embeddings=false"],
              "LlamaForCausalLM"),
    "qwen3_moe": ("tiny-moe", ["model.qk_norm=true", "model.num_shared_experts=0",
                               "model.router_bias_update_rate=0.0", "model.moe_every=2"], "Qwen3MoeForCausalLM"),
    "ernie_moe": ("tiny-moe", [], "Ernie4_5_MoeForCausalLM"),
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~40k characters of Shakespeare plus digits and non-ASCII text: trains a 512-token BPE fast."""
    text = (CORPUS_ROOT / "shakespeare" / "hamlet_gut.txt").read_text()[:40_000]
    extra = "\n".join(f"Line {i}: {i * 37} ducats, café 東京 — naïve {i % 7}." for i in range(200))
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(text + "\n" + extra)
    return path


def make_checkpoint(root: Path, corpus: Path, preset: str, overrides: list[str],
                    expert_bias_std: float = 0.0) -> Path:
    job = cfglib.load(TrainJobConfig, preset, SMALL + overrides + [f"data.corpus={corpus}",
                                                                    f"data.cache_dir={root / 'data'}"])
    trainer = Trainer(job)
    for _ in range(2):
        trainer.train_step()
    if expert_bias_std:  # a bias large enough to change which experts are picked
        gen = torch.Generator().manual_seed(0)
        for moe in trainer.model.moe_layers():
            moe.expert_bias.copy_(torch.randn(moe.num_experts, generator=gen) * expert_bias_std)
    return trainer.save_checkpoint(root / "ckpt")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, corpus) -> dict[str, Path]:
    """One checkpoint per exportable variant, plus 'refused' (QK-norm + shared expert + bias)."""
    out = {}
    for name, (preset, overrides, _) in VARIANTS.items():
        out[name] = make_checkpoint(tmp_path_factory.mktemp(name), corpus, preset, overrides,
                                    expert_bias_std=0.1 if name == "ernie_moe" else 0.0)
    out["refused"] = make_checkpoint(tmp_path_factory.mktemp("refused"), corpus, "tiny-moe",
                                     ["model.qk_norm=true"])
    return out
