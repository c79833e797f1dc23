"""SFT, DPO and GRPO as inner loops of an island.

Each stage is a `Trainer` whose `forward_backward` builds its own batch from verifiable task
problems instead of reading pre-training text; everything else (AdamW, schedule, clipping,
checkpoints, and the DiLoCo client that wraps `train_step`) is the pre-training machinery,
unchanged. `evaluate()` returns the held-out error rate (1 − greedy accuracy on the first
`posttrain.eval_problems` held-out problems), so lower is better as with a loss.

Each island works on its own slice of the train problems (`island_id::num_islands`), drawn in
a per-island shuffled order seeded by `(train.seed, island)`. The reference policy of DPO and of
GRPO's KL term is the model as it is at the stage's first step: the stage's starting point,
which every island pulled from the coordinator.
"""

from __future__ import annotations

import copy
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from archipelago.config import ConfigError
from island.model import Transformer
from island.train import Trainer
from posttrain.chat import prompt_ids, response_ids, sequence_batch
from posttrain.losses import dpo_loss, group_advantages, grpo_loss, sequence_logprob, sft_loss, token_logprobs
from posttrain.rollout import RolloutConfig, RolloutEngine, accuracy
from posttrain.tasks import Problem, TaskConfig

STAGES = ("sft", "dpo", "grpo")


@dataclass
class SFTSection:
    lr: float = 0.0  # the stage's peak lr; 0 keeps optim.lr


def _check_lr(section: str, lr: float) -> None:
    if lr < 0:
        raise ConfigError(f"{section}.lr must be >= 0 (0 keeps optim.lr), got {lr}")


@dataclass
class DPOSection:
    lr: float = 0.0  # the stage's peak lr; 0 keeps optim.lr
    beta: float = 0.1
    samples_per_prompt: int = 4  # sampled per prompt to find a correct and a wrong answer
    prompts_per_mine: int = 16  # prompts sampled per mining pass
    pairs_per_step: int = 8
    max_mining_passes: int = 4  # per step, before a step with no pair is skipped

    def __post_init__(self) -> None:
        _check_lr("dpo", self.lr)
        if self.beta <= 0 or self.samples_per_prompt < 2 or self.pairs_per_step < 1:
            raise ConfigError("dpo.beta must be > 0, dpo.samples_per_prompt >= 2, dpo.pairs_per_step >= 1")


@dataclass
class GRPOSection:
    lr: float = 0.0  # the stage's peak lr; 0 keeps optim.lr
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 8
    updates_per_batch: int = 1  # optimizer steps on one rollout batch (>1 makes the clip matter)
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # β of the KL to the reference policy; 0 skips the reference entirely

    def __post_init__(self) -> None:
        _check_lr("grpo", self.lr)
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2, got {self.group_size}")
        if self.prompts_per_step < 1 or self.updates_per_batch < 1:
            raise ConfigError("grpo.prompts_per_step and grpo.updates_per_batch must be >= 1")
        if not 0 < self.clip_eps < 1 or self.kl_coef < 0:
            raise ConfigError("grpo.clip_eps must be in (0, 1) and grpo.kl_coef >= 0")


@dataclass
class PosttrainSection:
    stage: str = "grpo"
    init: str = ""  # checkpoint to start from (training or coordinator checkpoint folder)
    warmstart_sft_steps: int = 0  # with no init: local SFT steps from the seeded init first
    warmstart_lr: float = 3e-3
    eval_problems: int = 64  # held-out problems island 0 scores after each round

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"posttrain.stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        if self.warmstart_sft_steps < 0 or self.eval_problems < 1:
            raise ConfigError("posttrain.warmstart_sft_steps must be >= 0 and posttrain.eval_problems >= 1")


@dataclass
class StageLog:
    """What a stage measured, step by step: rewards (GRPO, DPO mining), losses, pairs found."""

    rewards: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    skipped_steps: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)


class StageTrainer(Trainer):
    """The shared part: task, problems, rollout engine, held-out evaluation."""

    stage = "sft"

    def __init__(self, job: Any, island_id: int = 0, num_islands: int = 1, total_steps: int | None = None,
                 model: Transformer | None = None) -> None:
        super().__init__(job, island_id=island_id, num_islands=num_islands, total_steps=total_steps,
                         model=model)
        self.tokenizer = self.dataset.tokenizer
        self.task = job.task.build()
        tc: TaskConfig = job.task
        train = self.task.problems("train", tc.train_problems, tc.seed)
        self.problems: list[Problem] = train[island_id::num_islands]
        if not self.problems:
            raise ConfigError(f"task.train_problems ({tc.train_problems}) leaves island {island_id} of "
                              f"{num_islands} no problems")
        self.heldout = self.task.problems("heldout", tc.heldout_problems, tc.seed)
        self.rng = random.Random(f"{job.train.seed}/{island_id}")
        self._order: list[int] = []
        self.engine = RolloutEngine(self.model, self.tokenizer, job.rollout)
        self.log = StageLog()
        self.tokens_per_step = 0
        self.ref_model: Transformer | None = None

    def next_problems(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            if not self._order:
                self._order = list(range(len(self.problems)))
                self.rng.shuffle(self._order)
            out.append(self.problems[self._order.pop()])
        return out

    def reference(self) -> Transformer:
        """The frozen policy of the stage's first step (taken lazily, after the first pull)."""
        if self.ref_model is None:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        return self.ref_model

    def logits(self, model: Transformer, inputs: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return model(inputs)

    @torch.no_grad()
    def evaluate(self) -> float:
        problems = self.heldout[: self.job.posttrain.eval_problems]
        return 1.0 - accuracy(self.engine, self.task, problems)

    def heldout_accuracy(self) -> float:
        return accuracy(self.engine, self.task, self.heldout)


class SFTTrainer(StageTrainer):
    """Cross-entropy on the reference answers, on the assistant tokens only."""

    stage = "sft"

    def forward_backward(self) -> float:
        batch = self.next_problems(self.job.train.batch_size)
        prompts = [prompt_ids(self.tokenizer, p.prompt) for p in batch]
        responses = [response_ids(self.tokenizer, self.task.reference_completion(p)) for p in batch]
        inputs, targets, mask = sequence_batch(prompts, responses, self.tokenizer.pad_id, self.device)
        loss = sft_loss(self.logits(self.model, inputs), targets, mask)
        loss.backward()
        self.tokens_per_step = int(mask.sum())
        self.log.losses.append(float(loss.detach()))
        return float(loss.detach())


class GRPOTrainer(StageTrainer):
    """G samples per prompt, group-normalised advantages, clipped ratio, optional KL."""

    stage = "grpo"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: dict[str, torch.Tensor] | None = None
        self._uses = 0
        self._rollout_seed = self.rng.randrange(1 << 30)

    @torch.no_grad()
    def rollout_batch(self) -> dict[str, torch.Tensor]:
        g = self.job.grpo
        problems = self.next_problems(g.prompts_per_step)
        self._rollout_seed += 1
        completions = self.engine.sample([p.prompt for p in problems], g.group_size, seed=self._rollout_seed)
        rewards = torch.tensor([self.task.safe_score(problems[i // g.group_size], c.text or "")
                                for i, c in enumerate(completions)])
        prompts = [prompt_ids(self.tokenizer, p.prompt) for p in problems for _ in range(g.group_size)]
        inputs, targets, mask = sequence_batch(prompts, [c.token_ids for c in completions],
                                               self.tokenizer.pad_id, self.device)
        self.model.eval()  # log-probs of the policy that sampled (no MoE balancing counts)
        old = token_logprobs(self.logits(self.model, inputs), targets)
        self.model.train()
        batch = {"inputs": inputs, "targets": targets, "mask": mask, "old": old,
                 "advantages": group_advantages(rewards, g.group_size).to(self.device)}
        if g.kl_coef > 0:
            batch["ref"] = token_logprobs(self.logits(self.reference(), inputs), targets)
        self.log.rewards.append(float(rewards.mean()))
        return batch

    def forward_backward(self) -> float:
        g = self.job.grpo
        if g.kl_coef > 0:
            self.reference()
        if self._batch is None or self._uses >= g.updates_per_batch:
            self._batch, self._uses = self.rollout_batch(), 0
        b = self._batch
        self._uses += 1
        logp = token_logprobs(self.logits(self.model, b["inputs"]), b["targets"])
        loss, parts = grpo_loss(logp, b["old"], b["advantages"], b["mask"], g.clip_eps, b.get("ref"),
                                g.kl_coef)
        loss.backward()
        self.tokens_per_step = int(b["mask"].sum())
        self.log.losses.append(float(loss.detach()))
        for k, v in parts.items():
            self.log.extra.setdefault(k, []).append(v)
        return float(loss.detach())


class DPOTrainer(StageTrainer):
    """Pairs mined from the model's own samples: a verified-correct and a verified-wrong answer."""

    stage = "dpo"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pairs: list[tuple[list[int], list[int], list[int]]] = []  # (prompt, chosen, rejected)
        self._mine_seed = self.rng.randrange(1 << 30)

    @torch.no_grad()
    def mine(self) -> None:
        d = self.job.dpo
        problems = self.next_problems(d.prompts_per_mine)
        self._mine_seed += 1
        completions = self.engine.sample([p.prompt for p in problems], d.samples_per_prompt,
                                         seed=self._mine_seed)
        scores = [self.task.safe_score(problems[i // d.samples_per_prompt], c.text or "")
                  for i, c in enumerate(completions)]
        self.log.rewards.append(statistics.fmean(scores))
        found = 0
        for j, problem in enumerate(problems):
            group = list(range(j * d.samples_per_prompt, (j + 1) * d.samples_per_prompt))
            good = [completions[i].token_ids for i in group if scores[i] == 1.0]
            bad = [completions[i].token_ids for i in group if scores[i] == 0.0]
            if good and bad:
                self.pairs.append((prompt_ids(self.tokenizer, problem.prompt), good[0], bad[0]))
                found += 1
        self.log.pairs.append(found)

    def forward_backward(self) -> float:
        """One DPO step. Its token count (what the coordinator weights the push by) is the tokens
        it sampled while mining plus the tokens it trained on, so a step that found no pair still
        counts the work it did."""
        d = self.job.dpo
        ref = self.reference()
        sampled = self.engine.tokens
        for _ in range(d.max_mining_passes):
            if len(self.pairs) >= d.pairs_per_step:
                break
            self.mine()
        sampled = self.engine.tokens - sampled
        if not self.pairs:  # nothing to learn from this step: no gradient, and it is counted
            self.log.skipped_steps += 1
            self.tokens_per_step = max(1, sampled)
            return 0.0
        take, self.pairs = self.pairs[:d.pairs_per_step], self.pairs[d.pairs_per_step:]
        prompts = [p for p, _, _ in take] * 2
        responses = [c for _, c, _ in take] + [r for _, _, r in take]
        inputs, targets, mask = sequence_batch(prompts, responses, self.tokenizer.pad_id, self.device)
        logp = sequence_logprob(self.logits(self.model, inputs), targets, mask)
        with torch.no_grad():
            ref_logp = sequence_logprob(self.logits(ref, inputs), targets, mask)
        n = len(take)
        loss, margin = dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], d.beta)
        loss.backward()
        self.tokens_per_step = int(mask.sum()) + sampled
        self.log.losses.append(float(loss.detach()))
        self.log.extra.setdefault("margin", []).append(float(margin.mean()))
        return float(loss.detach())


TRAINERS: dict[str, type[StageTrainer]] = {"sft": SFTTrainer, "dpo": DPOTrainer, "grpo": GRPOTrainer}

__all__ = ["STAGES", "TRAINERS", "SFTSection", "DPOSection", "GRPOSection", "PosttrainSection",
           "RolloutConfig", "StageTrainer", "SFTTrainer", "DPOTrainer", "GRPOTrainer"]
