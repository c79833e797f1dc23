"""Dynamic-scaled casts to FP8: amax, scale and cast fused (per tensor or per row).

    scale = max(amax(|x|), 1e-12) / fp8_max;   q = clamp(x / scale, ±fp8_max) in fp8;   x ≈ q · scale

``scale`` is the *dequantization* scale, the form `torch._scaled_mm` takes. Dynamic (current)
scaling follows Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433): e4m3 for
activations and weights, e5m2 (more range) for gradients; the 1e-12 floor is torchao's, so an
all-zero tensor gets a tiny scale instead of a division by zero.

Eager torch spends five kernels and three passes over x on this (abs, amax, div, clamp, cast);
the per-row kernel reads each row twice (the second time from cache) and writes the fp8 bytes
once; the per-tensor cast needs a global amax first, so it is two launches (block amax with an
atomic max, then scale + cast) but still no host synchronisation.
"""

from __future__ import annotations

import torch

from kernels._triton import EXACT_FP, next_pow2, tl, triton, use_triton

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
AMAX_FLOOR = 1e-12


def fp8_cast_reference(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                       rowwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (any float dtype) → (q: dtype [M, K], scale: fp32 [M, 1] if rowwise else [])."""
    fmax = FP8_MAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    scale = amax.clamp(min=AMAX_FLOOR) / fmax
    return (xf / scale).clamp(-fmax, fmax).to(dtype), scale


if triton is not None:

    @triton.jit
    def _to_fp8(v, FMAX: tl.constexpr, E5M2: tl.constexpr):
        v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
        if E5M2:
            return v.to(tl.float8e5).to(tl.uint8, bitcast=True)
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)

    @triton.jit
    def _rowwise_kernel(x_ptr, q_ptr, scale_ptr, M, K, FMAX: tl.constexpr, E5M2: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), FMAX)
        tl.store(scale_ptr + rows, scale, mask=rmask)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (cols < K)[None, :]
            offs = rows[:, None] * K + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + offs, _to_fp8(tl.math.div_rn(x, scale[:, None]), FMAX, E5M2), mask=m)

    @triton.jit
    def _amax_kernel(x_ptr, amax_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))  # |x| ≥ 0: float max = int max

    @triton.jit
    def _tensorwise_kernel(x_ptr, q_ptr, amax_ptr, scale_ptr, numel, FMAX: tl.constexpr,
                           E5M2: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        scale = tl.math.div_rn(tl.maximum(tl.load(amax_ptr), 1e-12), FMAX)
        if pid == 0:
            tl.store(scale_ptr, scale)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, _to_fp8(tl.math.div_rn(x, scale), FMAX, E5M2), mask=mask)


def fp8_cast_triton(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                    rowwise: bool = False, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    fmax, e5m2 = FP8_MAX[dtype], dtype == torch.float8_e5m2
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)  # fp8 bits; viewed as dtype below
    if rowwise:
        m, k = x.shape
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        block_k = min(next_pow2(k), block)
        rows = max(1, min(block // block_k, next_pow2(m)))
        _rowwise_kernel[(triton.cdiv(m, rows),)](x, q, scale, m, k, FMAX=fmax, E5M2=e5m2, ROWS=rows,
                                                 BLOCK_K=block_k, **EXACT_FP)
    else:
        n = x.numel()
        block = min(block, next_pow2(n))
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        scale = torch.empty((), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, block),)
        _amax_kernel[grid](x, amax, n, BLOCK=block)
        _tensorwise_kernel[grid](x, q, amax, scale, n, FMAX=fmax, E5M2=e5m2, BLOCK=block, **EXACT_FP)
    return q.view(dtype), scale


def fp8_cast(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
             rowwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] → (q fp8 [M, K], fp32 dequantization scale: [M, 1] rowwise, else [])."""
    if use_triton(x):
        return fp8_cast_triton(x, dtype, rowwise)
    return fp8_cast_reference(x, dtype, rowwise)
