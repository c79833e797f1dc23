"""Token permute / unpermute by expert, the data movement around grouped expert matmuls.

`plan` sorts the N·k (token, slot) pairs by expert (stable, as `MoE.local_experts_forward`
does), so expert e's inputs are rows ``offsets[e]:offsets[e+1]`` of ``permute(x)`` and one grouped
matmul (or one call per expert) reads them contiguously. `unpermute` is the weighted scatter back.

The Triton unpermute is a *gather* per token (out[n] = Σ_j w[n,j] · y[row_of_slot[n,j]]) instead
of index_add's scatter: no atomics, deterministic, and in fp32 with k ≤ 2 bit-identical to the
index_add reference (a sum of two terms commutes). It accumulates in fp32 and rounds once, where
the bf16 twin rounds the product and every partial sum. Both directions are differentiable: the
backward of a gather is the matching weighted gather the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import next_pow2, tl, triton, use_triton


@dataclass
class Permutation:
    """For N tokens routed to k experts each (slot s = n·k + j).

    order: [N·k] slot of each permuted row; token_of_row: [N·k] = order // k; row_of_slot: [N·k],
    the inverse of order; counts: [E] rows per expert.
    """

    order: torch.Tensor
    token_of_row: torch.Tensor
    row_of_slot: torch.Tensor
    counts: torch.Tensor
    top_k: int


def plan(experts: torch.Tensor, num_experts: int) -> Permutation:
    """experts: [N, k] long → the permutation grouping rows by expert."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(n * k, device=flat.device)
    return Permutation(order, order // k, row_of_slot, torch.bincount(flat, minlength=num_experts), k)


def permute_reference(x: torch.Tensor, p: Permutation) -> torch.Tensor:
    """x: [N, D] → [N·k, D], row r = x[token_of_row[r]]."""
    return x[p.token_of_row]


def unpermute_reference(y: torch.Tensor, p: Permutation, weights: torch.Tensor) -> torch.Tensor:
    """y: [N·k, D] (expert outputs, permuted order), weights: [N, k] → [N, D], as index_add."""
    out = torch.zeros(y.shape[0] // p.top_k, y.shape[1], dtype=y.dtype, device=y.device)
    w = weights.reshape(-1)[p.order].to(y.dtype)
    return out.index_add_(0, p.token_of_row, y * w[:, None])


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(src_ptr, index_ptr, scale_ptr, out_ptr, R, D, HAS_SCALE: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[r] = src[index[r]] (· scale[r])."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < R
        mask = rmask[:, None] & (cols < D)[None, :]
        src = tl.load(index_ptr + rows, mask=rmask, other=0)
        v = tl.load(src_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0)
        if HAS_SCALE:  # in fp32, one rounding to the output dtype
            v = v.to(tl.float32) * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_kernel(y_ptr, row_of_slot_ptr, w_ptr, out_ptr, N, D, K: tl.constexpr,
                        HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n] = Σ_j w[n, j] · y[row_of_slot[n·K + j]], j in slot order (w = 1 without HAS_W)."""
        tok = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        tmask = tok < N
        mask = tmask[:, None] & (cols < D)[None, :]
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)  # fp32; one rounding to y's dtype at the end
        for j in tl.static_range(K):
            r = tl.load(row_of_slot_ptr + tok * K + j, mask=tmask, other=0)
            v = tl.load(y_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + tok * K + j, mask=tmask, other=0.0)[:, None]
            acc += v
        tl.store(out_ptr + tok[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(d: int) -> tuple[int, int]:
    block_d = next_pow2(d)
    return max(1, 4096 // block_d), block_d


def _gather(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    r, d = index.numel(), src.shape[1]
    out = torch.empty(r, d, dtype=src.dtype, device=src.device)
    rows, block_d = _tiles(d)
    _gather_rows_kernel[(triton.cdiv(r, rows),)](src.contiguous(), index, scale if scale is not None else src,
                                                 out, r, d, HAS_SCALE=scale is not None, ROWS=rows,
                                                 BLOCK_D=block_d)
    return out


def _combine(y: torch.Tensor, p: Permutation, weights: torch.Tensor | None) -> torch.Tensor:
    n, d = y.shape[0] // p.top_k, y.shape[1]
    out = torch.empty(n, d, dtype=y.dtype, device=y.device)
    rows, block_d = _tiles(d)
    w = weights.reshape(-1).contiguous() if weights is not None else y
    _combine_kernel[(triton.cdiv(n, rows),)](y.contiguous(), p.row_of_slot, w, out, n, d, K=p.top_k,
                                             HAS_W=weights is not None, ROWS=rows, BLOCK_D=block_d)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Permutation) -> torch.Tensor:
        ctx.p = p
        return _gather(x, p.token_of_row, None)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _combine(dy, ctx.p, None), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, p: Permutation) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(y, weights)
        return _combine(y, p, weights)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        y, weights = ctx.saved_tensors
        p = ctx.p
        dout = dout.contiguous()
        dy = _gather(dout, p.token_of_row, weights.reshape(-1)[p.order].contiguous())
        y_slots = y[p.row_of_slot].view(dout.shape[0], p.top_k, -1)  # [N, k, D]
        dw = (y_slots.float() * dout.float()[:, None, :]).sum(-1)
        return dy, dw.to(weights.dtype), None


def permute(x: torch.Tensor, p: Permutation) -> torch.Tensor:
    """x: [N, D] → [N·k, D] grouped by expert (differentiable)."""
    return _Permute.apply(x, p) if use_triton(x) else permute_reference(x, p)


def unpermute(y: torch.Tensor, p: Permutation, weights: torch.Tensor) -> torch.Tensor:
    """y: [N·k, D] expert outputs in permuted order, weights: [N, k] → Σ_j w·y per token [N, D]."""
    return _Unpermute.apply(y, weights, p) if use_triton(y) else unpermute_reference(y, p, weights)
