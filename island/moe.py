"""Mixture-of-experts feed-forward: top-k routing, a shared expert, aux-loss-free balancing.

Routing is softmax over the router logits, top-k selection on (probability + bias), and the
selected probabilities renormalised to sum to one. With a zero bias this is exactly Qwen3-MoE's
router (`norm_topk_prob=True`). The bias is the auxiliary-loss-free balancing of DeepSeek
(Wang et al., arXiv:2408.15664): it only steers *selection*, never the mixing weights, and after each
optimizer step it moves by `router_bias_update_rate · sign(mean_load − load_e)`, so under-used
experts become more likely to be picked. No gradient flows through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from island.mlp import MLP
from island.model_config import ModelConfig


@dataclass
class Routing:
    """The router's decision for N tokens.

    experts: [N, k] long, expert index per slot; weights: [N, k] fp32, sum to 1 per token.
    """

    experts: torch.Tensor
    weights: torch.Tensor


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.bias_update_rate = cfg.router_bias_update_rate
        self.gate = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_ffn_dim) for _ in range(cfg.num_experts))
        self.shared_experts = (MLP(cfg.dim, cfg.moe_ffn_dim * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        # Persistent: the bias is part of the model's state and is checkpointed and synced.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # Tokens routed to each expert since the last bias update (not persistent).
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts), persistent=False)
        # Set by expert parallel (island/parallelize.py): computes the routed experts' output.
        self.expert_dispatch = None
        # Set by data or expert parallel: sums a load vector over the ranks whose batches make up
        # the step, so every rank moves the bias by the same, global counts.
        self.load_all_reduce = None

    def route(self, x: torch.Tensor) -> Routing:
        """x: [N, dim] -> Routing."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        _, experts = torch.topk(probs + self.expert_bias.float(), self.top_k, dim=-1)
        weights = probs.gather(-1, experts)
        weights = weights / weights.sum(-1, keepdim=True)
        return Routing(experts=experts, weights=weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(flat)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(routing.experts.reshape(-1),
                                                   minlength=self.num_experts).float()
        if self.expert_dispatch is not None:
            out = self.expert_dispatch(self, flat, routing)
        else:
            out = self.local_experts_forward(flat, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    def local_experts_forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every expert on this process: gather each expert's tokens, run it, scatter back weighted.

        x: [N, dim] -> [N, dim]. No token is dropped (no capacity limit).
        """
        n, k = routing.experts.shape
        flat_experts = routing.experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of_slot = order // k
        weight_of_slot = routing.weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            idx = token_of_slot[start:start + count]
            y = self.experts[e](x[idx]) * weight_of_slot[start:start + count, None].to(x.dtype)
            out.index_add_(0, idx, y)
            start += count
        return out

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Move the selection bias toward balance and reset the load counter.

        `load` overrides the counted load: this rank's count, or the sum over the data-parallel
        ranks when `load_all_reduce` is set.
        """
        if load is None:
            load = (self.expert_load if self.load_all_reduce is None
                    else self.load_all_reduce(self.expert_load.clone()))
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def update_router_biases(model: nn.Module) -> None:
    """After an optimizer step: update every MoE layer's balancing bias."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias()
