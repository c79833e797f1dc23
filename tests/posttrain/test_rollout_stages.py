"""The rollout engine and the stage trainers on a small model: the KV-cache engine decodes like
full recomputation at temperature 0, and each stage takes real steps on its own batches."""

from __future__ import annotations

import pytest
import torch

from archipelago import config as cfglib
from posttrain.chat import prompt_ids, stop_ids
from posttrain.config import PosttrainJobConfig as PosttrainConfig
from posttrain.rollout import RolloutEngine, accuracy
from posttrain.stages import DPOTrainer, GRPOTrainer, SFTTrainer

SMALL = ["model.dim=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_dim=128",
         "train.batch_size=8", "train.seq_len=32", "train.eval_batches=1", "train.num_threads=1",
         "task.train_problems=64", "task.heldout_problems=16", "posttrain.eval_problems=8",
         "rollout.max_new_tokens=8", "grpo.group_size=4", "grpo.prompts_per_step=4", "dpo.samples_per_prompt=4",
         "dpo.prompts_per_mine=8", "dpo.pairs_per_step=2", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def cfg(data_cache):
    return cfglib.load(PosttrainConfig, "tiny", SMALL + [f"data.cache_dir={data_cache}"])


def test_engine_greedy_equals_full_recomputation(cfg):
    trainer = SFTTrainer(cfg)
    for _ in range(3):  # move off the init so the argmax is not degenerate
        trainer.train_step()
    model, tok = trainer.model.eval(), trainer.tokenizer
    prompts = [p.prompt for p in trainer.heldout[:5]]
    out = RolloutEngine(model, tok, cfg.rollout).sample(prompts, 1, seed=0, temperature=0.0)
    with torch.no_grad():
        for prompt, completion in zip(prompts, out, strict=True):
            ids = prompt_ids(tok, prompt)
            start = len(ids)
            for _ in range(cfg.rollout.max_new_tokens):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] in stop_ids(tok):
                    break
            assert completion.token_ids == ids[start:]


def test_sampling_is_grouped_and_seeded(cfg):
    trainer = SFTTrainer(cfg)
    engine = RolloutEngine(trainer.model, trainer.tokenizer, cfg.rollout)
    a = engine.sample(["What is 1 + 2?", "What is 3 + 4?"], 3, seed=7)
    b = engine.sample(["What is 1 + 2?", "What is 3 + 4?"], 3, seed=7)
    assert len(a) == 6 and [c.token_ids for c in a] == [c.token_ids for c in b]
    assert engine.tokens > 0 and engine.tokens_per_s > 0


def test_sft_learns_the_answer_format(cfg):
    trainer = SFTTrainer(cfg, total_steps=60)
    first = trainer.train_step().loss
    for _ in range(59):
        last = trainer.train_step().loss
    assert last < 0.7 * first
    completions = trainer.engine.sample([p.prompt for p in trainer.heldout[:8]], 1, 0, temperature=0.0)
    assert sum(c.text.startswith("Answer:") for c in completions) >= 6
    assert 0.0 <= accuracy(trainer.engine, trainer.task, trainer.heldout) <= 1.0


def test_grpo_steps_on_its_own_rollouts(cfg):
    job = cfglib.load(PosttrainConfig, "tiny", SMALL + [f"data.cache_dir={cfg.data.cache_dir}",
                                                         "grpo.updates_per_batch=2", "grpo.kl_coef=0.05"])
    trainer = GRPOTrainer(job, total_steps=4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(4):
        trainer.train_step()
    assert len(trainer.log.rewards) == 2  # one rollout batch per two updates
    assert trainer.log.extra["kl"][0] == pytest.approx(0.0, abs=1e-6)  # the first step is the reference
    assert trainer.log.extra["clip_fraction"][0] == 0.0  # and on-policy: every ratio is 1
    assert trainer.tokens_per_step > 0
    moved = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert moved


def test_dpo_mines_pairs_from_its_own_samples(cfg):
    trainer = DPOTrainer(cfg, total_steps=3)
    for _ in range(3):
        trainer.train_step()
    assert len(trainer.log.pairs) >= 1
    # a random model is rarely right: a step with no pair is skipped and counted, never faked
    assert trainer.log.skipped_steps + len(trainer.log.losses) == 3
