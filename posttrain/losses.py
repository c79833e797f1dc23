"""The post-training objectives, as plain functions of tensors (tested against hand computations).

- SFT: cross-entropy on response tokens only.
- DPO (Rafailov et al., arXiv:2305.18290): -log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]).
- GRPO (Shao et al., arXiv:2402.03300): per prompt, G samples; advantage
  A_i = (r_i − mean_g r) / (std_g r + eps) with the population std of the group; per token, the
  clipped surrogate −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = π/π_old, plus β·KL(π‖π_ref) by the
  non-negative estimator exp(q) − q − 1, q = log π_ref − log π; the sum over every completion
  token of the batch divided by their count (token-level normalisation, so long and short
  completions weigh by their tokens, not by their sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits [B, T, V], targets [B, T] -> [B, T] (fp32)."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    nll = -token_logprobs(logits, targets)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the masked (response) tokens of each row: [B]."""
    return (token_logprobs(logits, targets) * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair reward margin β·[...]) from sequence log-probabilities [P]."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N·G] ordered group by group -> advantages [N·G]; a group of equal rewards gets 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask: [B, T] per completion token; advantages: [B].

    Returns the loss and its parts (mean clipped fraction, mean KL) for logging.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    tokens = mask.sum().clamp(min=1)
    kl_mean = 0.0
    if ref_logp is not None and kl_coef > 0:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        per_token = per_token + kl_coef * kl
        kl_mean = float((kl.detach() * mask).sum() / tokens)
    loss = (per_token * mask).sum() / tokens
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"clip_fraction": float((clipped.detach() * mask).sum() / tokens), "kl": kl_mean}
