"""The coordinator's outer step in one pass: weighted mean of K pseudo-gradients, Nesterov
momentum and the parameter update (docs/design.md step 7; `coordinator/params.py` is the contract).

    g = (Σ_i w_i Δ_i) / Σw;   m ← μ m + g;   u = g + μ m (Nesterov) or m;   θ ← θ − lr · u

DiLoCo's outer optimizer is SGD with Nesterov momentum (Douillard et al., arXiv:2311.08105).
Unfused, the round's weighted sum (`protos/accumulate.py: WeightedSum`) + ``ParamState.outer_step``
are K + 6 elementwise passes, each reading and
writing a full fp32 tensor; fused, the K deltas, θ and m are read once and θ, m written once:
(K + 4)·4 bytes per parameter, the floor for this memory-bound update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._triton import EXACT_FP, tl, triton, use_triton


def outer_step_reference(theta: torch.Tensor, momentum: torch.Tensor, deltas: torch.Tensor,
                         weights: Sequence[float], lr: float, mu: float, nesterov: bool) -> None:
    """In place on theta and momentum (fp32, shape S); deltas: fp32 [K, *S]; weights: K floats.

    The same op sequence as `WeightedSum.add_tensors` for each delta, `WeightedSum.mean`, then
    `ParamState.outer_step`: each product w·Δ rounded, then added; the sum divided by Σw.
    """
    total = sum(weights)
    g = torch.zeros_like(theta)
    for d, w in zip(deltas, weights, strict=True):
        g.add_(d * torch.tensor(w, dtype=torch.float32))
    g = g / total
    if mu > 0:
        momentum.mul_(mu).add_(g)
        update = g.add(momentum, alpha=mu) if nesterov else momentum
    else:
        update = g
    theta.sub_(update, alpha=lr)


if triton is not None:

    @triton.jit
    def _outer_step_kernel(theta_ptr, mom_ptr, deltas_ptr, weights_ptr, total, numel, num_deltas, lr, mu,
                           HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.zeros([BLOCK], dtype=tl.float32)
        delta_ptrs = deltas_ptr + offs
        for k in range(num_deltas):
            w = tl.load(weights_ptr + k)
            g += w * tl.load(delta_ptrs, mask=mask, other=0.0)
            delta_ptrs += numel  # pointer arithmetic is 64-bit: no k·numel overflow
        g = g / total
        if HAS_MOMENTUM:
            m = mu * tl.load(mom_ptr + offs, mask=mask, other=0.0) + g
            tl.store(mom_ptr + offs, m, mask=mask)
            if NESTEROV:
                update = g + mu * m
            else:
                update = m
        else:
            update = g
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
        tl.store(theta_ptr + offs, theta - lr * update, mask=mask)


def outer_step_triton(theta: torch.Tensor, momentum: torch.Tensor, deltas: torch.Tensor,
                      weights: Sequence[float], lr: float, mu: float, nesterov: bool,
                      block: int = 2048) -> None:
    assert theta.is_contiguous() and momentum.is_contiguous() and deltas.is_contiguous()
    w = torch.tensor(list(weights), dtype=torch.float32, device=theta.device)
    n = theta.numel()
    _outer_step_kernel[(triton.cdiv(n, block),)](
        theta, momentum, deltas, w, float(sum(weights)), n, len(weights), lr, mu, HAS_MOMENTUM=mu > 0, NESTEROV=nesterov,
        BLOCK=block, **EXACT_FP)


def fused_outer_step(theta: torch.Tensor, momentum: torch.Tensor, deltas: torch.Tensor,
                     weights: Sequence[float], lr: float, mu: float, nesterov: bool = True) -> None:
    """theta, momentum: fp32 S (updated in place); deltas: fp32 [K, *S], the K contributions
    stacked (decode them into one buffer); weights: K non-negative floats, not all zero."""
    assert deltas.shape[0] == len(weights) and deltas.shape[1:] == theta.shape
    if use_triton(theta):
        outer_step_triton(theta, momentum, deltas, weights, lr, mu, nesterov)
    else:
        outer_step_reference(theta, momentum, deltas, weights, lr, mu, nesterov)
