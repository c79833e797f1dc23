"""How the model is spread over the ranks of one replica group: FSDP2 and expert parallel.

The model itself (`island/model.py`, `island/moe.py`) knows nothing of ranks; this module wires
in the parallelism after it is built, the same code on CPU (gloo) and GPU (NCCL): the backend
follows the device type of the mesh.

FSDP2 (`fully_shard`): one parameter group per transformer block and one at the root (embeddings,
final norm, tied head). On CUDA the default policy computes in bf16 and reduces gradients in fp32;
on CPU everything stays fp32, so a CPU run is comparable number for number with one process.

Expert parallel (EP): the routed experts of every MoE layer are split evenly over the ranks of a
group (rank r owns experts [r·E/R, (r+1)·E/R)). Every rank routes its own tokens with the full,
replicated router (and runs the replicated shared expert); each token slot is sent to the rank
owning its expert and the result is sent back, both with `all_to_all_single` of variable split
sizes (the per-expert counts are exchanged first). No token is dropped. The backward of each
exchange is the reverse exchange (`_AllToAll`). The owned experts keep their global names
(`layers.0.mlp.experts.5.up_proj.weight` on rank 1 of 2 with 8 experts), so a rank's state dict
is a slice of the full one.

FSDP with EP on the same ranks: an expert's weights already live on exactly one rank of the
group, so sharding them again over those same ranks would only add an all-gather before every
use. `apply_fsdp` therefore leaves expert weights out (`ignored_params`): FSDP neither shards nor
reduces them. What FSDP would have done for them — averaging over the data-parallel ranks — is
a division of their gradient by the group size (the owner's gradient already sums the
contributions of every rank's tokens, which the reverse all-to-all delivered). This needs the EP
group to be the FSDP mesh's ranks; a larger island (data parallel over more ranks than the experts
are split over) would shard experts over the remaining mesh dimension, which is not built here.

The aux-loss-free balancing bias must stay identical on every rank and equal to what one process
on the whole batch would compute, so each MoE layer sums its expert load over the data-parallel
ranks before the bias update (`MoE.load_all_reduce`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from archipelago.config import ConfigError
from island.moe import MoE, Routing

MeshOrGroup = DeviceMesh | dist.ProcessGroup


def parallelize(model: nn.Module, num_ranks: int, expert_parallel: bool) -> DeviceMesh:
    """FSDP2 (and EP for MoE layers, if asked) over the initialised process group of `num_ranks`.

    `model` is already on its device. This is what `Trainer` runs for a `[parallel]` table.
    """
    if not dist.is_initialized() or dist.get_world_size() != num_ranks:
        found = f"{dist.get_world_size()} ranks" if dist.is_initialized() else "no process group"
        raise ConfigError(f"parallel.num_ranks is {num_ranks} but this process has {found}; the "
                          "launcher must initialise a process group of that size first")
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (num_ranks,), mesh_dim_names=("dp",))
    if expert_parallel and _moe_layers(model):
        apply_expert_parallel(model, mesh)
    apply_fsdp(model, mesh)
    return mesh


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, init_method: str, device_type: str = "cpu",
                     timeout_s: float = 300.0) -> DeviceMesh:
    """Join the process group (gloo on CPU, NCCL on CUDA) and return the 1-D mesh `("dp",)`.

    `init_method` is a torch.distributed URL (`tcp://127.0.0.1:29500`, `env://`). Every collective
    fails after `timeout_s` instead of waiting forever for a rank that is gone.
    """
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend_for(device_type), init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def as_mesh(mesh_or_group: MeshOrGroup, device_type: str) -> DeviceMesh:
    if isinstance(mesh_or_group, DeviceMesh):
        return mesh_or_group
    return DeviceMesh.from_group(mesh_or_group, device_type, mesh_dim_names=("dp",))


def as_group(mesh_or_group: MeshOrGroup) -> dist.ProcessGroup:
    if isinstance(mesh_or_group, DeviceMesh):
        assert mesh_or_group.ndim == 1, "expert parallel takes a 1-D mesh or a process group"
        return mesh_or_group.get_group()
    return mesh_or_group


def default_mp_policy(device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; plain fp32 elsewhere."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _all_reduce_sum(tensor: torch.Tensor, groups: tuple[dist.ProcessGroup, ...]) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ---- FSDP2 -----------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, mesh_or_group: MeshOrGroup,
               mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard `model` (a `Transformer`, already on its device) with FSDP2 over `mesh_or_group`.

    Each block of `model.layers` is one FSDP group, the root holds the rest. Expert-parallel
    experts (see `apply_expert_parallel`) are left out, and their gradients divided by the mesh
    size. Returns `model`.
    """
    device_type = next(model.parameters()).device.type
    mesh = as_mesh(mesh_or_group, device_type)
    mp = mp_policy if mp_policy is not None else default_mp_policy(device_type)
    dp_size = mesh.size()
    dp_groups = tuple(mesh.get_group(d) for d in range(mesh.ndim))
    ignored: set[nn.Parameter] = set()
    for moe in _moe_layers(model):
        moe.load_all_reduce = partial(_all_reduce_sum, groups=dp_groups)
        if isinstance(moe.expert_dispatch, ExpertParallel):
            assert mesh.ndim == 1 and moe.expert_dispatch.same_ranks(mesh.get_group()), (
                "expert parallel must span the FSDP mesh's ranks")
            for p in moe.experts.parameters():
                ignored.add(p)
                # FSDP's mean over data-parallel ranks, for weights FSDP does not reduce.
                p.register_hook(partial(torch.div, other=dp_size))
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    return model


# ---- expert parallel -------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with variable splits; the backward sends gradients the reverse way.

    x: [sum(in_splits), dim] -> [sum(out_splits), dim]. Every rank of the group must reach this
    backward, which holds inside a model: the input always requires grad when training.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable `all_to_all_single`: rows x[sum(in_splits[:j]):...] go to rank j."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel:
    """The routed-expert computation of one MoE layer whose experts are spread over `group`.

    Installed as `MoE.expert_dispatch`; the layer's `experts` then hold only this rank's slice,
    keyed by global expert index.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        assert num_experts % self.world == 0
        self.num_local = num_experts // self.world
        self.first = self.rank * self.num_local

    def same_ranks(self, group: dist.ProcessGroup) -> bool:
        return dist.get_process_group_ranks(group) == dist.get_process_group_ranks(self.group)

    def local_indices(self) -> range:
        return range(self.first, self.first + self.num_local)

    def __call__(self, moe: MoE, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [N, dim] (this rank's tokens) -> [N, dim], the weighted sum of their routed experts."""
        _, k = routing.experts.shape
        flat_experts = routing.experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)  # slots grouped by expert, so by owner
        token_of_slot = order // k
        weight_of_slot = routing.weights.reshape(-1)[order]
        counts = torch.bincount(flat_experts, minlength=moe.num_experts)  # [E]
        # recv_counts[s, j]: slots rank s sends to this rank's j-th expert (exchanged first, so
        # every rank knows the split sizes of the token exchange).
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        sent, got = torch.stack((counts, recv_counts)).view(2, self.world, self.num_local).tolist()
        send_splits = [sum(row) for row in sent]
        recv_splits = [sum(row) for row in got]
        per_expert = [sum(col) for col in zip(*got, strict=True)]

        received = all_to_all(x[token_of_slot], recv_splits, send_splits, self.group)
        # Received rows come grouped by source rank, then by expert; regroup them by expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local, device=x.device).repeat(self.world), recv_counts)
        by_expert = torch.argsort(expert_of_row, stable=True)
        rows = received[by_expert]
        outputs, start = [], 0
        for j, count in enumerate(per_expert):
            if count:  # an expert without tokens is skipped, as in MoE.local_experts_forward
                expert = moe.experts[str(self.first + j)]
                # FSDP's mixed precision does not reach these weights: run them in their own dtype
                # (autocast, where on, still picks the matmul dtype).
                chunk = rows[start:start + count].to(next(expert.parameters()).dtype)
                outputs.append(expert(chunk).to(x.dtype))
            start += count
        done = torch.cat(outputs) if outputs else rows
        returned = all_to_all(done[torch.argsort(by_expert)], send_splits, recv_splits, self.group)
        weighted = returned * weight_of_slot[:, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, token_of_slot, weighted)


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, mesh_or_group: MeshOrGroup) -> nn.Module:
    """Keep only this rank's slice of every MoE layer's experts and route tokens across the group.

    `model` must be the full model, identical on every rank (built from the same seed, or
    loaded from the same checkpoint); the kept experts are its own modules, so the parallel model
    starts from exactly the same weights. Returns `model`.
    """
    group = as_group(mesh_or_group)
    world = dist.get_world_size(group)
    for moe in _moe_layers(model):
        if moe.num_experts % world:
            raise ValueError(f"{moe.num_experts} experts cannot be split evenly over {world} ranks")
        ep = ExpertParallel(group, moe.num_experts)
        moe.experts = nn.ModuleDict({str(e): moe.experts[e] for e in ep.local_indices()})
        moe.expert_dispatch = ep
        moe.load_all_reduce = partial(_all_reduce_sum, groups=(group,))
    return model


def expert_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert weights that live on this rank only."""
    return [p for moe in _moe_layers(model) if isinstance(moe.expert_dispatch, ExpertParallel)
            for p in moe.experts.parameters()]


# ---- utilities for a parallel training step ----------------------------------------------------


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Global L2 gradient norm of a sharded model; scales gradients down to `max_norm` if above.

    FSDP gradients (DTensors) are summed over their sharded mesh dims, expert-parallel gradients
    over their EP group, anything else is replicated and counted once. Every rank makes the same
    collectives whichever gradients it holds. Returns the norm before clipping.
    """
    ep_group_of = {id(p): moe.expert_dispatch.group for moe in _moe_layers(model)
                   if isinstance(moe.expert_dispatch, ExpertParallel) for p in moe.experts.parameters()}
    sums: dict[tuple[int, ...], tuple[tuple[dist.ProcessGroup, ...], torch.Tensor]] = {}
    for p in model.parameters():
        if isinstance(p, DTensor):
            groups = tuple(p.device_mesh.get_group(d) for d, placement in enumerate(p.placements)
                           if placement.is_shard())
        elif id(p) in ep_group_of:
            groups = (ep_group_of[id(p)],)
        else:
            groups = ()
        key = tuple(id(g) for g in groups)
        if key not in sums:
            sums[key] = (groups, torch.zeros((), dtype=torch.float64, device=p.device))
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sums[key][1].add_(local.detach().double().pow(2).sum())
    total = sum(float(_all_reduce_sum(sq, groups)) for groups, sq in sums.values())
    norm = math.sqrt(total)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on every rank, as one process would hold it (CPU tensors).

    FSDP shards are gathered by `get_model_state_dict(full_state_dict=True)`; expert-parallel
    experts are all-gathered over their group. Every rank must call it.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    out = {name: t.detach().cpu() for name, t in state.items()}
    for prefix, moe in _named_moe_layers(model):
        ep = moe.expert_dispatch
        if not isinstance(ep, ExpertParallel):
            continue
        for local_name, tensor in _local_expert_tensors(moe, ep).items():
            pieces = [torch.empty_like(tensor) for _ in range(ep.world)]
            dist.all_gather(pieces, tensor.contiguous(), group=ep.group)
            for rank, piece in enumerate(pieces):
                for j in range(ep.num_local):
                    out[f"{prefix}experts.{rank * ep.num_local + j}.{local_name}"] = piece[j].cpu()
    return out


def _named_moe_layers(model: nn.Module) -> Iterable[tuple[str, MoE]]:
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield (f"{name}." if name else ""), module


def _local_expert_tensors(moe: MoE, ep: ExpertParallel) -> dict[str, torch.Tensor]:
    """{'gate_proj.weight': [num_local, ...]} stacking this rank's experts in index order."""
    per_expert = [dict(moe.experts[str(e)].named_parameters()) for e in ep.local_indices()]
    return {name: torch.stack([p[name].detach() for p in per_expert]) for name in per_expert[0]}
