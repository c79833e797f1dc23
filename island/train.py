"""The local (inner) trainer: AdamW, warmup + cosine/WSD schedule, clipping, eval, checkpoints.

`Trainer.train_step()` is the untouched inner step that the DiLoCo client and the post-training
loops wrap; `Trainer.train()` is the plain local loop. A checkpoint holds the model, the AdamW
state, the step and the data cursor, so a resumed run continues with the same losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from archipelago.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from archipelago.config import ConfigError
from island.data import DataConfig, TokenLoader, eval_batches, open_dataset
from island.model import ModelConfig, Transformer, build_model, lm_loss
from island.moe import update_router_biases


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr · min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    grad_clip: float = 1.0  # 0 disables

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, wsd or constant, got '{self.schedule}'")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    """The ranks that train one replica together (tier 1), as `island/parallelize.py` spreads it.

    With `num_ranks` > 1 the trainer joins the process group its launcher initialised (of exactly
    that size), shards the model with FSDP2 over it, and splits MoE experts over it when
    `expert_parallel` is set. Each rank takes its `batch_size / num_ranks` rows of every batch.
    """

    num_ranks: int = 1
    expert_parallel: bool = True

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ConfigError(f"parallel.num_ranks must be >= 1, got {self.num_ranks}")


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.data.vocab_size != self.model.vocab_size:
            raise ConfigError(f"data.vocab_size ({self.data.vocab_size}) must equal model.vocab_size "
                              f"({self.model.vocab_size})")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                              f"({self.model.max_seq_len})")
        ranks = self.parallel.num_ranks
        if self.train.batch_size % ranks:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be divisible by "
                              f"parallel.num_ranks ({ranks})")
        if ranks > 1 and self.parallel.expert_parallel and self.model.num_experts % ranks:
            raise ConfigError(f"model.num_experts ({self.model.num_experts}) must be divisible by "
                              f"parallel.num_ranks ({ranks}) for expert parallel")


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate for (0-based) `step` of `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # warmup-stable-decay (Hägele et al., arXiv:2405.18392)
        decay_start = int(total_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, total_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got '{name}'")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and other vectors do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=False)


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int


class Trainer:
    """One model, its AdamW, its data shard and eval set; `train_step` is the inner step.

    With `parallel.num_ranks` > 1 every rank of the group constructs a Trainer and calls the same
    methods in the same order: the model is sharded (island/parallelize.py), each rank takes its
    rows of the batch, reported losses are the group's, and `full_model_state()` gathers the
    model. Checkpoints of a sharded trainer are not written or read here.
    """

    def __init__(self, job: TrainJobConfig, island_id: int = 0, num_islands: int = 1,
                 total_steps: int | None = None, model: Transformer | None = None) -> None:
        self.job = job
        tc = job.train
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.device = pick_device(tc.device)
        self.total_steps = total_steps or tc.steps
        self.model = (model or build_model(job.model, seed=tc.seed)).to(self.device)
        self.mesh = None
        self.rows = slice(None)  # this rank's rows of every batch
        if job.parallel.num_ranks > 1:
            from island.parallelize import parallelize  # torch.distributed only when needed

            self._tensor_names = list(model_tensors(self.model))
            self.mesh = parallelize(self.model, job.parallel.num_ranks, job.parallel.expert_parallel)
            share = tc.batch_size // job.parallel.num_ranks
            rank = self.mesh.get_local_rank()
            self.rows = slice(rank * share, (rank + 1) * share)
        self.optimizer = build_optimizer(self.model, job.optim)
        self.dataset = open_dataset(job.data)
        self.loader = TokenLoader(self.dataset.train, tc.seq_len, tc.batch_size, island_id=island_id,
                                  num_islands=num_islands, seed=tc.seed)
        self.eval_set = eval_batches(self.dataset.eval, tc.seq_len, tc.batch_size, tc.eval_batches)
        self.step = 0
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())

    def forward_backward(self) -> float:
        """Loss and gradients of the next batch; returns the loss."""
        x, y = self.loader.next_batch()
        x, y = x[self.rows].to(self.device), y[self.rows].to(self.device)
        with self.autocast:
            loss = self.model.loss(x, y)
        loss.backward()
        return self.group_mean(float(loss.detach()))

    def group_mean(self, value: float) -> float:
        """`value` averaged over the ranks of a parallel trainer (equal rows each); else itself."""
        if self.mesh is None:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total, group=self.mesh.get_group())
        return float(total) / self.mesh.size()

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, set the scheduled lr, step AdamW, update MoE balancing; (grad_norm, lr)."""
        clip = self.job.optim.grad_clip
        if self.mesh is not None:
            from island.parallelize import clip_grad_norm_

            grad_norm = clip_grad_norm_(self.model, clip if clip > 0 else float("inf"))
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       clip if clip > 0 else float("inf"))
        lr = lr_at(self.job.optim, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_router_biases(self.model)
        self.step += 1
        return float(grad_norm), lr

    def train_step(self) -> StepStats:
        self.model.train()
        loss = self.forward_backward()
        grad_norm, lr = self.optimizer_step()
        return StepStats(self.step, loss, grad_norm, lr, self.tokens_per_step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed held-out batches. The z-loss (`model.z_loss`) is a
        training regulariser and is left out, so eval losses compare across settings of it."""
        self.model.eval()
        losses = []
        for x, y in self.eval_set:
            with self.autocast:
                logits = self.model(x[self.rows].to(self.device))
                losses.append(float(lm_loss(logits, y[self.rows].to(self.device))))
        self.model.train()
        return self.group_mean(sum(losses) / len(losses))

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors as `model_tensors` names them; every rank of a parallel
        trainer must call it (it gathers), and each gets the full state on CPU."""
        if self.mesh is None:
            return model_tensors(self.model)
        from island.parallelize import full_state_dict

        state = full_state_dict(self.model)
        return {name: state[name] for name in self._tensor_names}

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint_files(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.mesh is not None:
            raise CheckpointError("checkpoints of a trainer sharded over several ranks are not "
                                  "supported; gather the model with full_model_state()")
        return {"model.safetensors": model_tensors(self.model),
                "optimizer.safetensors": optimizer_tensors(self.optimizer)}

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        meta = {"kind": "island-train", "step": self.step, "config": asdict(self.job),
                "data_cursor": self.loader.state_dict(),
                "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in self.optimizer.param_groups],
                **(extra or {})}
        return write_checkpoint(path, self.checkpoint_files(), meta)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        if self.mesh is not None:
            raise CheckpointError("checkpoints of a trainer sharded over several ranks are not "
                                  "supported")
        files, manifest = read_checkpoint(path)
        for name in ("model.safetensors", "optimizer.safetensors"):
            if name not in files:
                raise CheckpointError(f"checkpoint {path} lacks {name}")
        load_model_tensors(self.model, files["model.safetensors"], str(path))
        load_optimizer_tensors(self.optimizer, files["optimizer.safetensors"],
                               manifest["optimizer_param_groups"])
        self.step = int(manifest["step"])
        self.loader.load_state_dict(manifest["data_cursor"])
        return manifest

    # ---- the local loop ----------------------------------------------------------------------

    def train(self, steps: int, on_step: Callable[[StepStats], None] | None = None,
              on_eval: Callable[[int, float], None] | None = None,
              on_checkpoint: Callable[[int], None] | None = None) -> None:
        tc = self.job.train
        while self.step < steps:
            stats = self.train_step()
            if on_step:
                on_step(stats)
            if on_eval and (self.step % tc.eval_every == 0 or self.step == steps):
                on_eval(self.step, self.evaluate())
            if on_checkpoint and tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                on_checkpoint(self.step)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied (aliased) tensors stored once."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen[ptr] = name
        out[name] = tensor
    return out


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"checkpoint {where}: {name} has shape {tuple(tensor.shape)}, the "
                                  f"model expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           param_groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    groups = []
    for saved, live in zip(param_groups, current["param_groups"], strict=True):
        groups.append({**saved, "params": live["params"],
                       "betas": tuple(saved["betas"]) if "betas" in saved else live["betas"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


