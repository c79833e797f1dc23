"""Linear + cross-entropy in row chunks, never materialising the [N, V] logits.

For an LM head the logits dominate activation memory (N·V·4 bytes: 8k tokens × 128k vocab is
4 GiB). As in Liger Kernel's fused linear cross-entropy (Hsu et al., arXiv:2410.10989) the loss
is computed chunk by chunk and, in the same pass, the gradient: for each chunk of C rows,
logits = h_c Wᵀ [C, V] (fp32), a row kernel computes lse by an online softmax (Milakov &
Gimelshein, arXiv:1805.02867), the loss and, *in place*, dlogits = (softmax − onehot) / n_valid;
then dh_c = dlogits W and dW += dlogitsᵀ h_c. Peak extra memory is one [C, V] chunk plus dW; the
backward only scales the stored dh, dW by the incoming gradient.

The chunk loop runs everywhere; the per-chunk row kernel is Triton on CUDA and torch on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import next_pow2, tl, triton, use_triton


def cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """h: [N, D], weight: [V, D], targets: [N] long → mean loss over targets != ignore_index."""
    return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=ignore_index)


def _ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                   scale: float) -> torch.Tensor:
    """logits: fp32 [C, V], overwritten with scale · (softmax − onehot) (0 on ignored rows);
    returns the per-row loss [C] (0 on ignored rows)."""
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe_t[:, None])[:, 0], 0.0)
    logits.sub_(lse[:, None]).exp_()
    logits[torch.arange(len(targets), device=logits.device), safe_t] -= 1.0
    logits.mul_(torch.where(valid, scale, 0.0)[:, None])
    return loss


if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, targets_ptr, loss_ptr, V, ignore_index, scale,
                        BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * V
        target = tl.load(targets_ptr + row)
        # Online softmax, one running (max, sum) per lane; a finite floor avoids inf − inf.
        m = tl.full([BLOCK_V], -3.0e38, tl.float32)
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=-3.0e38)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.where(cols < V, tl.exp(x - m_new), 0.0)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        valid = target != ignore_index
        x_t = tl.load(base + target, mask=valid, other=0.0)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        row_scale = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * row_scale
            tl.store(base + cols, grad, mask=cols < V)


def _ce_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    scale: float) -> torch.Tensor:
    """The Triton twin of `_ce_rows_torch` (same contract)."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    _ce_rows_kernel[(c,)](logits, targets, loss, v, ignore_index, scale,
                          BLOCK_V=min(next_pow2(v), 4096))
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients chunk by chunk in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_rows: int) -> torch.Tensor:
        rows_fn = _ce_rows_triton if use_triton(h) else _ce_rows_torch
        w = weight.to(h.dtype)
        n_valid = int((targets != ignore_index).sum())
        scale = 1.0 / n_valid if n_valid else float("nan")  # F.cross_entropy's nan for "no targets"
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc, tc = h[start:start + chunk_rows], targets[start:start + chunk_rows].contiguous()
            logits = (hc @ w.t()).float().contiguous()  # [C, V]
            total += rows_fn(logits, tc, ignore_index, scale).sum()
            grad = logits.to(h.dtype)
            dh[start:start + chunk_rows] = grad @ w
            dw.add_(grad.t() @ hc)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        dh, dw = ctx.saved_tensors
        return dh * grad_out.to(dh.dtype), (dw * grad_out).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """mean CE of (h Wᵀ, targets) over targets != ignore_index, without the [N, V] logits.

    h: [N, D], weight: [V, D], targets: [N] long. chunk_rows defaults to ~256 MiB of fp32
    logits per chunk.
    """
    chunk = chunk_rows or max(1, (1 << 26) // weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk)
