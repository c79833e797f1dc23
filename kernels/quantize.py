"""Blockwise quantization fused with error feedback (docs/design.md step 4), and its inverse.

One pass over a flattened pseudo-gradient reads Δ and the residual e and writes the codes, the
per-block scales and the new residual:

    y = Δ + e;  scale_b = absmax(y_b) / qmax;  q = Q(y / scale);  e ← y − q · scale

Error feedback is EF-SGD (Karimireddy et al., arXiv:1901.09847): what rounding drops this round
is re-sent in later rounds, which is what makes the 2- and 4-bit schemes usable at all. The
schemes, block layout and byte packing are exactly `protos/quant.py`'s ``int8-block``,
``fp8-block``, ``int4-block`` and ``int2-block`` (the reference twin agrees bit for bit), so the
codec can put a kernel's output on the wire unchanged (`to_parts`).

Unfused, the same work is ~10 torch ops and ~6 full passes over memory; fused it is one read of
Δ and e and one write of e and the codes, which matters on the island, where it runs once per
fragment per round on the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels._triton import EXACT_FP, tl, triton, use_triton

DEFAULT_BLOCK = 128


@dataclass(frozen=True)
class BlockScheme:
    """qmax: largest level; bits: code width (fp8 codes are whole bytes)."""

    name: str
    qmax: float
    bits: int
    fp8: bool = False

    def num_code_bytes(self, numel: int) -> int:
        return -(-numel * self.bits // 8)


SCHEMES = {s.name: s for s in (BlockScheme("int8-block", 127.0, 8), BlockScheme("fp8-block", 448.0, 8, True),
                               BlockScheme("int4-block", 7.0, 4), BlockScheme("int2-block", 1.0, 2))}


@dataclass
class Quantized:
    """codes: int8 [numel] (int8-block), uint8 [numel] (fp8-block, e4m3fn bytes) or uint8
    [ceil(numel·bits/8)] (int4/int2, code j of a byte at bit j·bits); scales: fp32 [ceil(numel/block)]."""

    codes: torch.Tensor
    scales: torch.Tensor
    numel: int


def to_parts(q: Quantized) -> dict[str, np.ndarray]:
    """The `protos.quant` parts (``{"scales", "values"}``) of a quantized tensor."""
    return {"scales": q.scales.cpu().numpy(), "values": q.codes.cpu().numpy()}


# ---- torch reference twin --------------------------------------------------------------------

def _pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """levels: int32 [n] in [-2^(bits-1), 2^(bits-1)) → uint8 [ceil(n·bits/8)], as the codec packs them (`protos.block_schemes`)."""
    per = 8 // bits
    fields = F.pad(levels & ((1 << bits) - 1), (0, -levels.numel() % per)).view(-1, per)
    shifts = torch.arange(per, device=levels.device, dtype=torch.int32) * bits
    return (fields << shifts).sum(1).to(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """uint8 [ceil(numel·bits/8)] → sign-extended int32 [numel]."""
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    fields = ((codes.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    return fields - ((fields >> (bits - 1)) << bits)


def quantize_ef_reference(delta: torch.Tensor, residual: torch.Tensor | None, scheme: str,
                          block: int = DEFAULT_BLOCK) -> tuple[Quantized, torch.Tensor]:
    """delta, residual: any shape, numel n → (Quantized, new residual fp32 [n])."""
    s = SCHEMES[scheme]
    y = delta.reshape(-1).to(torch.float32)
    if residual is not None:
        y = y + residual.reshape(-1)
    n = y.numel()
    blocks = F.pad(y, (0, -n % block)).view(-1, block)
    scales = blocks.abs().amax(dim=1) / s.qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    v = (blocks / safe[:, None]).clamp(-s.qmax, s.qmax)
    if s.fp8:
        f8 = v.to(torch.float8_e4m3fn)
        levels, codes = f8.to(torch.float32), f8.view(torch.uint8).reshape(-1)[:n]
    else:
        levels = torch.round(v)
        flat = levels.reshape(-1)[:n].to(torch.int32)
        codes = flat.to(torch.int8) if s.bits == 8 else _pack(flat, s.bits)
    y_hat = (levels * scales[:, None]).reshape(-1)[:n]
    return Quantized(codes, scales, n), y - y_hat


def dequantize_reference(q: Quantized, scheme: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Quantized → fp32 [numel]."""
    s = SCHEMES[scheme]
    if s.fp8:
        levels = q.codes.view(torch.float8_e4m3fn).to(torch.float32)
    elif s.bits == 8:
        levels = q.codes.to(torch.float32)
    else:
        levels = _unpack(q.codes, s.bits, q.numel).to(torch.float32)
    return levels * q.scales.repeat_interleave(block)[: q.numel]


# ---- Triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round_half_even(v):
        """torch.round's rounding, from floor (exact for |v| < 2^23) so every backend agrees."""
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def _quantize_ef_kernel(delta_ptr, resid_ptr, codes_ptr, scales_ptr, resid_out_ptr,
                            numel, num_blocks, num_bytes,
                            QMAX: tl.constexpr, BITS: tl.constexpr, IS_FP8: tl.constexpr,
                            HAS_RESID: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # One program: ROWS quantization blocks, a [ROWS, BLOCK] tile of y.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < numel
        y = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESID:
            y += tl.load(resid_ptr + offs, mask=mask, other=0.0)
        scale = tl.math.div_rn(tl.max(tl.abs(y), axis=1), QMAX)
        tl.store(scales_ptr + rows, scale, mask=rows < num_blocks)
        safe = tl.where(scale > 0.0, scale, 1.0)
        v = tl.minimum(tl.maximum(tl.math.div_rn(y, safe[:, None]), -QMAX), QMAX)
        if IS_FP8:
            f8 = v.to(tl.float8e4nv)
            level = f8.to(tl.float32)
            tl.store(codes_ptr + offs, f8.to(tl.uint8, bitcast=True), mask=mask)
        else:
            level = _round_half_even(v)
            if BITS == 8:
                tl.store(codes_ptr + offs, level.to(tl.int8), mask=mask)
            else:
                PER: tl.constexpr = 8 // BITS
                shift = (tl.arange(0, BLOCK) % PER) * BITS
                fields = (level.to(tl.int32) & ((1 << BITS) - 1)) << shift[None, :]
                # Disjoint bit fields: their sum is their OR.
                packed = tl.sum(tl.reshape(fields, (ROWS, BLOCK // PER, PER)), axis=2)
                boffs = rows[:, None] * (BLOCK // PER) + tl.arange(0, BLOCK // PER)[None, :]
                tl.store(codes_ptr + boffs, packed.to(tl.uint8), mask=boffs < num_bytes)
        tl.store(resid_out_ptr + offs, y - level * scale[:, None], mask=mask)

    @triton.jit
    def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, numel, num_blocks,
                           BITS: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < numel
        scale = tl.load(scales_ptr + rows, mask=rows < num_blocks, other=0.0)
        if IS_FP8:
            level = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
            level = level.to(tl.float32)
        elif BITS == 8:
            level = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
        else:
            PER: tl.constexpr = 8 // BITS
            byte = tl.load(codes_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
            field = (byte >> ((offs % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
            level = (field - ((field >> (BITS - 1)) << BITS)).to(tl.float32)
        tl.store(out_ptr + offs, level * scale[:, None], mask=mask)


def _rows_per_program(block: int, numel: int) -> int:
    """~4096 elements per program, fewer for small inputs (interpreter: one program ≈ 1 ms)."""
    return max(1, min(4096 // block, 1 << max(0, (-(-numel // block) - 1).bit_length())))


def quantize_ef_triton(delta: torch.Tensor, residual: torch.Tensor | None, scheme: str,
                       block: int = DEFAULT_BLOCK) -> tuple[Quantized, torch.Tensor]:
    s = SCHEMES[scheme]
    assert block & (block - 1) == 0 and block >= 8 // s.bits, "Triton path: block must be a power of 2"
    d = delta.reshape(-1).contiguous()
    n, nb = d.numel(), -(-d.numel() // block)
    codes = torch.empty(s.num_code_bytes(n) if s.bits < 8 else n,
                        dtype=torch.int8 if s.bits == 8 and not s.fp8 else torch.uint8, device=d.device)
    scales = torch.empty(nb, dtype=torch.float32, device=d.device)
    new_resid = torch.empty(n, dtype=torch.float32, device=d.device)
    e = residual.reshape(-1).contiguous() if residual is not None else d
    rows = _rows_per_program(block, n)
    _quantize_ef_kernel[(triton.cdiv(nb, rows),)](
        d, e, codes, scales, new_resid, n, nb, codes.numel(), QMAX=s.qmax, BITS=s.bits, IS_FP8=s.fp8,
        HAS_RESID=residual is not None, BLOCK=block, ROWS=rows, **EXACT_FP)
    return Quantized(codes, scales, n), new_resid


def dequantize_triton(q: Quantized, scheme: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    s = SCHEMES[scheme]
    out = torch.empty(q.numel, dtype=torch.float32, device=q.codes.device)
    rows = _rows_per_program(block, q.numel)
    _dequantize_kernel[(triton.cdiv(q.scales.numel(), rows),)](
        q.codes, q.scales, out, q.numel, q.scales.numel(), BITS=s.bits, IS_FP8=s.fp8, BLOCK=block,
        ROWS=rows, **EXACT_FP)
    return out


# ---- dispatch --------------------------------------------------------------------------------

def quantize_with_feedback(delta: torch.Tensor, residual: torch.Tensor | None, scheme: str,
                           block: int = DEFAULT_BLOCK) -> tuple[Quantized, torch.Tensor]:
    """Q(Δ + e) and the new residual Δ + e − Q⁻¹(Q(Δ + e)) (fp32, flattened)."""
    if use_triton(delta):
        return quantize_ef_triton(delta, residual, scheme, block)
    return quantize_ef_reference(delta, residual, scheme, block)


def dequantize(q: Quantized, scheme: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Q⁻¹: fp32 [numel]."""
    if use_triton(q.codes):
        return dequantize_triton(q, scheme, block)
    return dequantize_reference(q, scheme, block)
