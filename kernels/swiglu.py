"""SwiGLU's gating, h = silu(g) · u (Shazeer, arXiv:2002.05202), forward and backward fused.

g, u are the gate and up projections [..., F]. Eager torch materialises silu(g) and keeps it
for the backward; the kernel computes in fp32 registers, stores only h, and the backward
recomputes sigmoid(g):

    dg = dh · u · σ(g) · (1 + g · (1 − σ(g))),   du = dh · silu(g)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import next_pow2, tl, triton, use_triton

BLOCK = 4096


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: [..., F] → [..., F]; what `island.mlp.MLP` computes between its projections."""
    return F.silu(g) * u


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """The Triton forward and backward; g, u: same shape and dtype."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        block = min(BLOCK, next_pow2(n))
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, h, n, BLOCK=block)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        block = min(BLOCK, next_pow2(n))
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dh.contiguous(), g, u, dg, du, n, BLOCK=block)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) · u, differentiable in both; g, u: [..., F] of one dtype."""
    assert g.shape == u.shape and g.dtype == u.dtype
    if use_triton(g):
        return SwiGLUFunction.apply(g, u)
    return swiglu_reference(g, u)
