"""Tier 2: one replica group of an island, made fault tolerant with torchft.

An island is `island.num_replica_groups` replica groups; each is `parallel.num_ranks` ranks that
shard one copy of the model with FSDP2 (+ expert parallel), as island/parallelize.py wires it.
Between the groups torchft keeps the island going:

    per step, on every rank of every group:
        quorum (torchft Lighthouse via the group's Manager): who is live; a group that is
            behind (restarted, or missed a commit) loads the state of a live peer first
        forward/backward on this rank's rows of the island's batch
        Manager.allreduce: the gradient shard (and the MoE expert loads) averaged over the
            live groups' matching ranks (torchft's reconfigurable gloo/NCCL group)
        OptimizerWrapper.step: AdamW steps only if every live group's all-reduce succeeded
            (should_commit); otherwise nothing changes and the next step runs with fewer groups

Rows: the island's batch (`train.batch_size` rows, one loader cursor shared by every group) is
split into `num_replica_groups × num_ranks` equal slices; group g rank r takes slice g·K + r. With
every group live that is exactly one process on the whole batch; while a group is down its rows
are skipped (the island trains on fewer tokens for those steps, and reports so).

Recovery: the state a peer sends (torchft's HTTP checkpoint transport, per group rank) is this
rank's shard of the model, its AdamW state, the step, the data cursor, and whatever the island
link registers (`GroupLink`: snapshots and merges of the DiLoCo outer loop). A restarted group
therefore continues bit for bit where its peer is. The quorum is synchronous
(`use_async_quorum=False`): a healing group loads the peer's state before its forward pass and
takes part in that very step.

Gradient averaging goes through `Manager.allreduce` and the optimizer through
`torchft.optim.OptimizerWrapper`, not `torchft.DistributedDataParallel`: when a peer dies in the
middle of an all-reduce the survivors must drop the step, not crash in a communication hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from archipelago.config import ConfigError
from island.model import build_model
from island.moe import MoE, update_router_biases
from island.train import StepStats, Trainer, TrainJobConfig, lr_at, model_tensors
from protos.broadcast import digest

log = logging.getLogger(__name__)


@dataclass
class ReplicaGroupsConfig:
    """The `[island]` table: how many replica groups make up an island and how torchft runs them.

    The ranks of one group are `[parallel] num_ranks`. A step commits once at least
    `min_replica_groups` groups are in the quorum.
    """

    num_replica_groups: int = 1
    min_replica_groups: int = 1
    lighthouse: str = ""  # http://HOST:PORT of a running torchft Lighthouse; empty: the island head starts one
    join_timeout_ms: int = 10_000  # how long a quorum waits for live groups that have not asked yet
    heartbeat_timeout_ms: int = 3_000  # a group silent this long is out of the next quorum
    quorum_timeout_s: float = 900.0  # covers a group blocked on an outer sync (no overlap)
    timeout_s: float = 60.0  # cross-group collectives, commits and state transfers
    host: str = "127.0.0.1"  # the address the island head listens on and advertises
    gateway_port: int = 0  # the island gateway's HTTP port (0: any free port)
    start_timeout_s: float = 300.0  # the gateway holds the first step until every group is up, at most this long
    # Local launches (`island run`): a group that loses a rank is killed and started again after
    # `restart_delay_s`; with auto_restart off it stays down until asked (POST /groups/G/restart).
    auto_restart: bool = True
    restart_delay_s: float = 2.0
    max_restarts: int = 10

    def __post_init__(self) -> None:
        if self.num_replica_groups < 1:
            raise ConfigError(f"island.num_replica_groups must be >= 1, got {self.num_replica_groups}")
        if not 1 <= self.min_replica_groups <= self.num_replica_groups:
            raise ConfigError(f"island.min_replica_groups must be in [1, {self.num_replica_groups}], "
                              f"got {self.min_replica_groups}")
        for name in ("quorum_timeout_s", "timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"island.{name} must be positive, got {getattr(self, name)}")


def check_island_layout(job: TrainJobConfig, groups: ReplicaGroupsConfig) -> None:
    """The island's batch must split evenly over every rank of every group."""
    ranks = groups.num_replica_groups * job.parallel.num_ranks
    if job.train.batch_size % ranks:
        raise ConfigError(f"train.batch_size ({job.train.batch_size}) must be divisible by "
                          f"island.num_replica_groups × parallel.num_ranks ({ranks})")


def is_replicated(groups: ReplicaGroupsConfig, job: TrainJobConfig) -> bool:
    """Whether the island runs as replica groups (torchft) rather than one training process."""
    return groups.num_replica_groups > 1 or job.parallel.num_ranks > 1


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is (same storage)."""
    from torch.distributed.tensor import DTensor  # here: importing it costs a plain island's start seconds

    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class TorchftEndpoint:
    """Where a rank finds torchft: the island's Lighthouse and its group's TCPStore."""

    lighthouse: str  # http://HOST:PORT
    store_host: str
    store_port: int
    hostname: str  # advertised to the Lighthouse and to peers fetching this group's state
    replica_id: str  # the group's name; must end in its group index (torchft derives ranks from it)


class ReplicaTrainer(Trainer):
    """The inner trainer as one replica group of an island (see the module docstring).

    `train_step()` keeps `Trainer`'s contract (one committed step or none; `step` counts committed
    steps), so the outer loop around it does not change. Every rank of every group constructs one.
    """

    def __init__(self, job: TrainJobConfig, groups: ReplicaGroupsConfig, group: int,
                 endpoint: TorchftEndpoint, island_id: int = 0, num_islands: int = 1,
                 total_steps: int | None = None) -> None:
        check_island_layout(job, groups)
        if not 0 <= group < groups.num_replica_groups:
            raise ConfigError(f"replica group {group} is not in [0, {groups.num_replica_groups})")
        model = build_model(job.model, seed=job.train.seed)
        # DiLoCo's tensors (island/diloco_config.py `synced_tensors`), named before experts are split up
        self.synced_names = sorted(n for n, t in model_tensors(model).items() if t.is_floating_point())
        super().__init__(job, island_id=island_id, num_islands=num_islands, total_steps=total_steps,
                         model=model)
        from torchft.manager import Manager
        from torchft.optim import OptimizerWrapper
        from torchft.process_group import ProcessGroupGloo

        self.group = group
        self.num_groups = groups.num_replica_groups
        ranks = job.parallel.num_ranks
        self.group_rank = self.mesh.get_local_rank() if self.mesh is not None else 0
        share = job.train.batch_size // (self.num_groups * ranks)
        first = (group * ranks + self.group_rank) * share
        self.rows = slice(first, first + share)
        self.tokens_per_step = share * ranks * job.train.seq_len  # this group's tokens per step
        self.num_participants = 0
        self.committed = False
        self.heals: list[dict[str, Any]] = []
        timeout = timedelta(seconds=groups.timeout_s)
        if self.device.type == "cuda":
            from torchft.process_group import ProcessGroupNCCL

            pg = ProcessGroupNCCL(timeout=timeout)
        else:
            pg = ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(
            pg=pg, load_state_dict=self.load_replica_state, state_dict=self.replica_state,
            min_replica_size=groups.min_replica_groups, use_async_quorum=False, timeout=timeout,
            quorum_timeout=timedelta(seconds=groups.quorum_timeout_s), connect_timeout=timeout,
            rank=self.group_rank, world_size=ranks, store_addr=endpoint.store_host,
            store_port=endpoint.store_port, lighthouse_addr=endpoint.lighthouse,
            replica_id=endpoint.replica_id, hostname=endpoint.hostname,
            # every group starts from the same weights (the gateway's θ_b), so step 0 needs no sync
            init_sync=False)
        self.ft_optimizer = OptimizerWrapper(self.manager, self.optimizer)
        self._moe = [m for m in self.model.modules() if isinstance(m, MoE)]

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self) -> StepStats:
        self.model.train()
        self.ft_optimizer.zero_grad(set_to_none=True)  # quorum; a group that is behind heals here
        loss = self.average_across_groups(self.forward_backward())
        grad_norm, lr = self.optimizer_step()
        tokens = self.num_participants * self.tokens_per_step if self.committed else 0
        return StepStats(self.step, loss, grad_norm, lr, tokens)

    @torch.no_grad()
    def average_across_groups(self, loss: float) -> float:
        """Gradients (this rank's shards) averaged over the live groups in one flat bucket, the
        MoE expert loads summed over them; returns the island's mean loss.

        A parameter without a gradient here (an expert none of this group's tokens reached)
        contributes zeros, so every group sends a bucket of the same layout, and a flag: it gets
        the average only if some group had a gradient for it. One that no token of the island's
        batch reached keeps none, so AdamW skips it as it would in one process.
        """
        params = list(self.model.parameters())
        grads = [local_part(p.grad) if p.grad is not None else torch.zeros_like(local_part(p))
                 for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [present, torch.tensor([loss], dtype=torch.float32, device=self.device)])
        self.manager.allreduce(flat).wait()  # average over the groups in the quorum
        self.num_participants = self.manager.num_participants()
        flags = flat[-1 - len(params):-1]
        offset = 0
        for p, g, had, flag in zip(params, grads, present, flags, strict=True):
            part = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
            if had:
                local_part(p.grad).copy_(part)
            elif flag > 0:
                from torch.distributed.tensor import DTensor

                part = part.clone()
                p.grad = (DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                          if isinstance(p, DTensor) else part)
        if self._moe:
            # Summed, not averaged: the balancing update compares counts, and sums stay integers.
            from torch.distributed import ReduceOp

            loads = torch.cat([m.expert_load for m in self._moe])
            self.manager.allreduce(loads, reduce_op=ReduceOp.SUM).wait()
            for m, part in zip(self._moe, loads.split([m.num_experts for m in self._moe]), strict=True):
                m.expert_load.copy_(part)
        return float(flat[-1])

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, set the scheduled lr, and step AdamW through torchft's wrapper, which steps only
        when the group may commit; the step count and MoE balancing move only on a commit."""
        clip = self.job.optim.grad_clip
        max_norm = clip if clip > 0 else float("inf")
        if self.mesh is not None:
            from island.parallelize import clip_grad_norm_

            grad_norm = clip_grad_norm_(self.model, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = lr_at(self.job.optim, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before = self.manager.current_step()
        self.ft_optimizer.step()  # should_commit: AdamW only if every live group's all-reduce worked
        self.committed = self.manager.current_step() > before
        self.optimizer.zero_grad(set_to_none=True)
        if self.committed:
            update_router_biases(self.model)
            self.step += 1
        else:
            log.warning("group %d: step %d not committed (%s); retrying with the next quorum",
                        self.group, self.step, self.manager.errored())
            for m in self._moe:
                m.expert_load.zero_()
        return float(grad_norm), lr

    # ---- what a recovering group loads from a live peer --------------------------------------

    def replica_state(self) -> dict[str, Any]:
        """This rank's part of the group's state (torchft sends it to the same rank of a group that
        heals). Live tensors: torchft serves them before this group's next optimizer step."""
        model = {n: local_part(t).detach() for n, t in self.model.state_dict().items()}
        optim = self.optimizer.state_dict()
        return {"model": model, "model_sha256": digest(model),
                "optimizer": {"state": {i: {k: local_part(v) if torch.is_tensor(v) else v for k, v in s.items()}
                                        for i, s in optim["state"].items()},
                              "param_groups": optim["param_groups"]},
                "step": self.step, "loader": self.loader.state_dict()}

    @torch.no_grad()
    def load_replica_state(self, state: dict[str, Any]) -> None:
        live = self.model.state_dict()
        if set(live) != set(state["model"]):
            raise RuntimeError("the peer's model state does not match this group's layout")
        for name, value in state["model"].items():
            local_part(live[name]).copy_(value)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        optim_state = {int(i): {k: self._like(params[int(i)], v) for k, v in s.items()}
                       for i, s in state["optimizer"]["state"].items()}
        self.optimizer.load_state_dict({"state": optim_state,
                                        "param_groups": state["optimizer"]["param_groups"]})
        before = self.step
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        own = digest({n: local_part(t) for n, t in self.model.state_dict().items()})
        self.heals.append({"group": self.group, "rank": self.group_rank, "from_step": before,
                           "step": self.step, "peer_sha256": state["model_sha256"], "own_sha256": own})
        log.info("group %d rank %d healed from a peer: step %d -> %d, identical=%s", self.group,
                 self.group_rank, before, self.step, own == state["model_sha256"])

    @staticmethod
    def _like(param: torch.Tensor, value: Any) -> Any:
        """An optimizer state entry as the live optimizer keeps it: a DTensor for a sharded
        parameter's moments, a plain tensor (the step) or value otherwise."""
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor) and torch.is_tensor(value) and value.ndim > 0:
            return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                      stride=param.stride())
        return value

    # ---- full tensors <-> this rank's parts ---------------------------------------------------

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Synced name -> this rank's live part of it (experts other ranks own are absent)."""
        live = dict(self.model.named_parameters(remove_duplicate=False)) | dict(self.model.named_buffers())
        return {n: local_part(live[n]) for n in self.synced_names if n in live}

    def part_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor `name` (a slice for an FSDP shard)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        live = self._live(name)
        if isinstance(live, DTensor):
            return distribute_tensor(full.to(live.device), live.device_mesh, live.placements,
                                     src_data_rank=None).to_local()
        return full.to(live.device)

    def _live(self, name: str) -> torch.Tensor:
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module), attr)

    @torch.no_grad()
    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the model to the full tensors `tensors` (every synced name)."""
        missing = sorted(set(self.synced_names) - set(tensors))
        if missing:
            raise RuntimeError(f"start weights lack {missing[:3]}")
        for name, local in self.local_tensors().items():
            local.copy_(self.part_of(name, tensors[name]))

    def full_synced_state(self) -> dict[str, torch.Tensor]:
        """Every synced tensor in full, on every rank of the group (a collective over the group)."""
        state = self.full_model_state()
        return {n: state[n].detach().cpu().clone() for n in self.synced_names}


__all__ = ["ReplicaGroupsConfig", "ReplicaTrainer", "TorchftEndpoint", "check_island_layout",
           "is_replicated", "local_part"]
