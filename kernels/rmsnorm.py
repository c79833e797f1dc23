"""RMSNorm (Zhang & Sennrich, arXiv:1910.07467) forward and backward, as `island.model.RMSNorm`
computes it: in fp32, whatever the input dtype, and cast back.

    y = x · rstd · w,  rstd = 1/sqrt(mean(x²) + eps)
    dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)),  dw = Σ_rows dy · x̂,  x̂ = x · rstd

Eager autograd keeps xf, xf², the normalised x and the product (several [M, D] fp32 tensors per
norm); the kernel keeps only rstd [M] and recomputes x̂ in the backward, one row per tile.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, tl, triton, use_triton


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] → [..., D] in x.dtype; the twin of `island.model.RMSNorm`."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, eps, ROWS: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, D,
                            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        xhat = x * rstd[:, None]
        dxhat = dy * w[None, :]
        dot = tl.sum(dxhat * xhat, axis=1) / D
        dx = rstd[:, None] * (dxhat - xhat * dot[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cols < D)


def _tiles(m: int, d: int) -> tuple[int, int]:
    """(rows per program, BLOCK_D): ~4096 elements per tile, whole rows."""
    block_d = next_pow2(d)
    return max(1, min(4096 // block_d, next_pow2(m))), block_d


class RMSNormFunction(torch.autograd.Function):
    """The Triton forward and backward; x: [..., D] (any float dtype), weight: [D]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, d = x2.shape
        rows, block_d = _tiles(m, d)
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd_kernel[(triton.cdiv(m, rows),)](x2, weight, y, rstd, m, d, eps, ROWS=rows,
                                                     BLOCK_D=block_d)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        m, d = x2.shape
        rows, block_d = _tiles(m, d)
        grid = triton.cdiv(m, rows)
        dx = torch.empty_like(x2)
        dw_part = torch.empty(grid, d, dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(grid,)](dy.reshape(m, d).contiguous(), x2, weight, rstd, dx, dw_part, m, d,
                                     ROWS=rows, BLOCK_D=block_d)
        return dx.view(dy.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] → [..., D] in x.dtype (differentiable in x and weight)."""
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
