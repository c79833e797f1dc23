"""Chunked top-k with packed indices and few-bit values: the sparse exchange of SparseLoCo
(Sarfi et al., arXiv 2508.15706).

A tensor is cut into chunks of ``chunk`` consecutive values (the last one shorter); of every chunk
the ``k`` values of largest magnitude are kept (of a shorter last chunk, the same share rounded up:
⌈k·length/chunk⌉, at least one, so a 64-value norm sends 1 of its values at 64 of 4,096, not all
64), so every region of every tensor keeps sending at the same density. Each kept value is coded at ``bits`` bits on one fp32 scale per
chunk, the chunk's largest kept magnitude: 2^bits levels evenly spaced over [-scale, scale], no
zero level (a kept value is never small for its chunk). Its position in the chunk is packed at
log2(chunk) bits (12 for 4,096). SparseLoCo tiles a 2-D tensor 64 × 64; chunks here run along the
flattened tensor, the same count per chunk.

Parts: ``scales`` fp32 [chunks], ``indices`` uint8 (K positions × log2(chunk) bits, packed little
end first), ``values`` uint8 (K codes × bits), with K = Σ over chunks of the values kept:
a pure function of numel, so a header is checked before its body arrives. Within a chunk the
positions are strictly increasing; a body that breaks that (a repeat, a position past the chunk)
is refused.

Selection is deterministic: by magnitude, ties to the lower position (a stable sort).
Bits a parameter: k/chunk · (log2(chunk) + bits) + 32/chunk (e.g. 64 of 4,096 at 2 bits: 0.227).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from protos.scheme import _ABS_EPS, _REL_EPS, CodecError, Parts, PartSpec, Scheme, _max_abs

NAME = re.compile(r"sparse-(\d+)of(\d+)-(\d+)bit")
VALUE_BITS = (1, 2, 4, 8)


class ChunkTopK(Scheme):
    """See the module docstring. ``name``: ``sparse-{k}of{chunk}-{bits}bit``."""

    zstd = False  # packed positions and few-bit codes are all entropy: zstd would only cost time

    def __init__(self, k: int, chunk: int, bits: int) -> None:
        if chunk < 2 or chunk & (chunk - 1) or chunk > 1 << 16:
            raise CodecError(f"sparse: the chunk must be a power of two in [2, 65536], got {chunk}")
        if not 1 <= k <= chunk:
            raise CodecError(f"sparse: k must be in [1, chunk={chunk}], got {k}")
        if bits not in VALUE_BITS:
            raise CodecError(f"sparse: value bits must be one of {VALUE_BITS}, got {bits}")
        self.k, self.chunk, self.bits = k, chunk, bits
        self.index_bits = chunk.bit_length() - 1
        self.levels = 1 << bits
        self.name = f"sparse-{k}of{chunk}-{bits}bit"

    # ---- layout ----

    def tail_k(self, tail: int) -> int:
        """Values kept of a last chunk of ``tail`` < chunk values: the same density, at least one."""
        return max(1, -(-self.k * tail // self.chunk)) if tail else 0

    def counts(self, numel: int) -> list[int]:
        """Values kept per chunk: k, and `tail_k` for a shorter last chunk."""
        full, tail = divmod(numel, self.chunk)
        return [self.k] * full + ([self.tail_k(tail)] if tail else [])

    def kept(self, numel: int) -> int:
        full, tail = divmod(numel, self.chunk)
        return full * self.k + self.tail_k(tail)

    def layout(self, numel: int) -> dict[str, PartSpec]:
        kept = self.kept(numel)
        return {
            "scales": PartSpec(("float32",), -(-numel // self.chunk)),
            "indices": PartSpec(("uint8",), -(-kept * self.index_bits // 8)),
            "values": PartSpec(("uint8",), -(-kept * self.bits // 8)),
        }

    def bits_per_param(self) -> float:
        return self.k / self.chunk * (self.index_bits + self.bits) + 32 / self.chunk

    # ---- selection ----

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [numel]`` → the kept positions, int64, chunk by chunk and ascending within a chunk
        (flat indices into ``x``): the k largest |x| of each chunk, ties to the lower position."""
        numel = x.numel()
        full = numel // self.chunk * self.chunk
        out = []
        if full:
            a = x[:full].abs().view(-1, self.chunk)
            order = torch.sort(a, dim=1, descending=True, stable=True).indices[:, : self.k]
            order = torch.sort(order, dim=1).values
            base = torch.arange(0, full, self.chunk, dtype=torch.int64)[:, None]
            out.append((order + base).reshape(-1))
        if numel > full:
            a = x[full:].abs()
            order = torch.sort(a, descending=True, stable=True).indices[: self.tail_k(numel - full)]
            out.append(torch.sort(order).values + full)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    # ---- codes ----

    def _chunk_of(self, numel: int) -> torch.Tensor:
        """For each kept value (in order), the index of its chunk."""
        counts = torch.tensor(self.counts(numel), dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    def quantize(self, x: torch.Tensor) -> Parts:
        numel = x.numel()
        idx = self.select(x)
        kept = x[idx]
        chunk_of = self._chunk_of(numel)
        scales = torch.zeros(-(-numel // self.chunk), dtype=torch.float32)
        if kept.numel():
            scales.scatter_reduce_(0, chunk_of, kept.abs(), reduce="amax")
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[chunk_of]
        top = self.levels - 1
        codes = torch.round((kept / safe + 1) * (top / 2)).clamp(0, top).to(torch.uint8)
        positions = (idx - chunk_of * self.chunk).numpy()
        return {"scales": scales.numpy(),
                "indices": pack(positions, self.index_bits),
                "values": pack(codes.numpy().astype(np.int64), self.bits)}

    def levels_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes → levels in [-1, 1] (fp32)."""
        return codes.to(torch.float32) * (2.0 / (self.levels - 1)) - 1.0

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        counts = self.counts(numel)
        kept = sum(counts)
        positions = unpack(parts["indices"], self.index_bits, kept)
        self.check_positions(positions, numel)
        codes = torch.from_numpy(unpack(parts["values"], self.bits, kept).astype(np.uint8))
        chunk_of = self._chunk_of(numel)
        scales = torch.from_numpy(parts["scales"].astype(np.float32))
        values = self.levels_of(codes) * scales[chunk_of]
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(positions) + chunk_of * self.chunk] = values
        return out

    def check_positions(self, positions: np.ndarray, numel: int) -> None:
        """Strictly increasing within each chunk and inside it; CodecError naming the first offence."""
        start = 0
        for c, count in enumerate(self.counts(numel)):
            p = positions[start:start + count]
            length = min(self.chunk, numel - c * self.chunk)
            if count and int(p.max()) >= length:
                raise CodecError(f"{self.name}: chunk {c} names position {int(p.max())}, past its {length} values")
            if count > 1 and not bool((np.diff(p) > 0).all()):
                bad = int(np.argmax(np.diff(p) <= 0))
                raise CodecError(f"{self.name}: chunk {c} positions must strictly increase; position {int(p[bad + 1])} "
                                 f"follows {int(p[bad])} (a repeat or out of order)")
            start += count

    def error_bound(self, x: torch.Tensor) -> float:
        """Dropped values whole; a kept one within half a level step, (scale / (levels − 1))."""
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        keep[self.select(x)] = True
        dropped = _max_abs(x[~keep])
        kept = _max_abs(x[keep])
        return max(dropped, kept / (self.levels - 1) + kept * _REL_EPS + _ABS_EPS)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ints each < 2^bits → uint8, ``bits`` each, little end first, zero-padded."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise CodecError(f"cannot pack values outside [0, 2^{bits}) in {bits} bits")
    bitmap = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitmap, bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack`: ``count`` ints of ``bits`` bits each."""
    needed = -(-count * bits // 8)
    if data.size != needed:
        raise CodecError(f"{count} values of {bits} bits need {needed} bytes, got {data.size}")
    bitmap = np.unpackbits(np.asarray(data, dtype=np.uint8), bitorder="little")[: count * bits]
    return (bitmap.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def parse(name: str) -> ChunkTopK | None:
    """The scheme a ``sparse-{k}of{chunk}-{bits}bit`` name stands for; None for any other name."""
    m = NAME.fullmatch(name) if isinstance(name, str) else None
    return ChunkTopK(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
