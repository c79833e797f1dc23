"""Quantization schemes for pseudo-gradients on the wire.

Every scheme maps a flattened fp32 tensor ``x: [numel]`` to a few named numpy arrays (the
*parts* that the codec concatenates into the body) and back.  The codec never interprets a part
itself: it asks the scheme for the part layout a given ``numel`` implies (`Scheme.layout`), so a
header from the network can be checked against it before a single byte is allocated.

Each scheme states its worst-case elementwise error (`Scheme.error_bound`) so that tests and
error feedback can rely on a number rather than on a tolerance picked by eye.  Bounds assume
finite inputs with ``max|x| <= 1e38`` (the codec rejects non-finite tensors; larger magnitudes
could round up to inf on reconstruction).  Each lossy bound carries two tiny terms for fp32
arithmetic: ``max|x| * 2**-20`` (rounding of the divide by the scale and the multiply back) and
``2**-126`` (scales that are fp32 subnormals or underflow to zero for blocks of ~1e-40 values).

All schemes are pure torch/numpy on CPU, vectorised over blocks, and deterministic (ties are
broken by index, rounding is round-half-to-even).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from archipelago.errors import UserError

Parts = dict[str, np.ndarray]
"""Named parts of one quantized tensor, in the order they go into the body."""

DEFAULT_BLOCK = 128
_REL_EPS = 2.0**-20  # fp32 rounding in x/scale and q*scale, relative to max|x|
_ABS_EPS = 2.0**-126  # subnormal / underflowed scales


class CodecError(UserError):
    """A payload, header, chunk or scheme name is invalid; the message names what and where.

    Defined here rather than in `protos.codec` because the schemes raise it too and the codec
    imports the schemes; `protos.codec` re-exports it.
    """


@dataclass(frozen=True)
class PartSpec:
    """What a part must look like for a given numel: one of ``dtypes``, exactly ``count`` items."""

    dtypes: tuple[str, ...]
    count: int


class Scheme(ABC):
    """A named, stateless quantizer of flattened fp32 tensors."""

    name: str

    @abstractmethod
    def layout(self, numel: int) -> dict[str, PartSpec]:
        """The parts (in body order) that quantizing ``numel`` elements produces.

        The codec validates untrusted headers against this, so it must be a pure function of
        ``numel`` and the scheme's constructor arguments.
        """

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> Parts:
        """``x: fp32 [numel]`` (CPU, contiguous) → parts matching ``layout(numel)``."""

    @abstractmethod
    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        """Parts matching ``layout(numel)`` → ``fp32 [numel]``; CodecError on invalid content."""

    @abstractmethod
    def error_bound(self, x: torch.Tensor) -> float:
        """Max ``|x - dequantize(quantize(x))|`` over elements, for this particular ``x``."""


def _n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x: [numel]`` → zero-padded ``[n_blocks, block]`` (the short last block padded with 0)."""
    nb = _n_blocks(x.numel(), block)
    return torch.nn.functional.pad(x, (0, nb * block - x.numel())).view(nb, block)


def _max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


class Fp32(Scheme):
    """Lossless: the raw little-endian fp32 values (for debugging and small tensors)."""

    name = "fp32"

    def layout(self, numel: int) -> dict[str, PartSpec]:
        return {"values": PartSpec(("float32",), numel)}

    def quantize(self, x: torch.Tensor) -> Parts:
        return {"values": x.numpy().copy()}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        return torch.from_numpy(parts["values"].astype(np.float32))

    def error_bound(self, x: torch.Tensor) -> float:
        return 0.0


class Bf16(Scheme):
    """Round-to-nearest-even to bfloat16 (8 significant bits): half the bytes, no scales.

    Bound ``max|x| * 2**-8 + 2**-134``: half an ulp relative for normals, plus half the bf16
    subnormal spacing for values below 2**-126.
    """

    name = "bf16"

    def layout(self, numel: int) -> dict[str, PartSpec]:
        return {"values": PartSpec(("uint16",), numel)}

    def quantize(self, x: torch.Tensor) -> Parts:
        return {"values": x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        bits = torch.from_numpy(parts["values"].view(np.int16).copy())
        return bits.view(torch.bfloat16).to(torch.float32)

    def error_bound(self, x: torch.Tensor) -> float:
        return _max_abs(x) * 2.0**-8 + 2.0**-134


class _BlockScheme(Scheme):
    """Per-block absmax scaling: ``scale = absmax / qmax`` as fp32, values ``x / scale`` coded.

    fp32 scales (not fp16) because pseudo-gradients can exceed fp16's 65504 range early in
    training or after a spike.  An all-zero block has scale 0 and decodes to zeros, no NaN.
    """

    qmax: float

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"{type(self).__name__}: block must be >= 1, got {block}")
        self.block = block

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [numel]`` → (blocks ``[nb, block]``, scales ``fp32 [nb]``)."""
        blocks = _blocks(x, self.block)
        return blocks, blocks.abs().amax(dim=1) / self.qmax

    def _scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``x / scale`` clamped to ±qmax, flattened ``[numel]``; scales ``[nb]``)."""
        blocks, scales = self._scales(x)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        v = (blocks / safe[:, None]).clamp(-self.qmax, self.qmax)
        return v.reshape(-1)[: x.numel()], scales

    def _rescale(self, values: torch.Tensor, scales: np.ndarray, numel: int) -> torch.Tensor:
        """``values: fp32 [numel]`` in scaled units × per-block ``scales`` → ``fp32 [numel]``."""
        s = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(self.block)[:numel]
        return values * s

    def _codes_layout(self, numel: int) -> PartSpec:
        return PartSpec(("int8",), numel)

    def layout(self, numel: int) -> dict[str, PartSpec]:
        return {
            "scales": PartSpec(("float32",), _n_blocks(numel, self.block)),
            "values": self._codes_layout(numel),
        }

    def _step_bound(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-block worst rounding error in absolute units (before the fp32 eps terms)."""
        return scales / 2

    def error_bound(self, x: torch.Tensor) -> float:
        _, scales = self._scales(x)
        step = float(self._step_bound(scales).max()) if scales.numel() else 0.0
        return step + _max_abs(x) * _REL_EPS + _ABS_EPS


class _IntBlock(_BlockScheme):
    """Signed integer levels ``round(x / scale)`` in ``[-qmax, qmax]``, packed ``bits`` per code."""

    bits: int

    def _codes_layout(self, numel: int) -> PartSpec:
        if self.bits == 8:
            return PartSpec(("int8",), numel)
        return PartSpec(("uint8",), -(-numel * self.bits // 8))

    def quantize(self, x: torch.Tensor) -> Parts:
        v, scales = self._scaled(x)
        q = torch.round(v).to(torch.int8).numpy()
        codes = q.copy() if self.bits == 8 else pack_bits(q, self.bits)
        return {"scales": scales.numpy().copy(), "values": codes}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        codes = parts["values"]
        q = codes.view(np.int8) if self.bits == 8 else unpack_bits(codes, self.bits, numel)
        return self._rescale(torch.from_numpy(q.astype(np.float32)), parts["scales"], numel)


class Int8Block(_IntBlock):
    """int8 levels, scale absmax/127: ~8.25 bits/param before zstd, error ≤ scale/2."""

    name, qmax, bits = "int8-block", 127.0, 8


class Int4Block(_IntBlock):
    """int4 levels in [-7, 7] two per byte, scale absmax/7: error ≤ scale/2."""

    name, qmax, bits = "int4-block", 7.0, 4


class Int2Block(_IntBlock):
    """Ternary levels {-1, 0, 1} four per byte, scale absmax: error ≤ absmax/2 per block.

    Only useful with error feedback, which re-sends what rounding dropped in later rounds.
    """

    name, qmax, bits = "int2-block", 1.0, 2


class Fp8Block(_BlockScheme):
    """float8_e4m3fn values, scale absmax/448 (e4m3fn's max finite), stored as uint8 bytes.

    e4m3 has 3 mantissa bits: half an ulp is ≤ 2**-4 of the value for normals, and the
    subnormal spacing (2**-9 in scaled units) is far below that, so the bound is stated as
    ``max over blocks of absmax * 2**-4``.
    """

    name, qmax = "fp8-block", 448.0

    def _codes_layout(self, numel: int) -> PartSpec:
        return PartSpec(("uint8",), numel)

    def quantize(self, x: torch.Tensor) -> Parts:
        v, scales = self._scaled(x)
        codes = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()
        return {"scales": scales.numpy().copy(), "values": codes}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        codes = torch.from_numpy(parts["values"].copy())
        return self._rescale(codes.view(torch.float8_e4m3fn).to(torch.float32), parts["scales"], numel)

    def _step_bound(self, scales: torch.Tensor) -> torch.Tensor:
        return scales * self.qmax * 2.0**-4


class TopKInt8(Scheme):
    """Keep the ``k = ceil(density * numel)`` largest-|x| entries, values int8 with one scale.

    Indices are sorted and delta-coded (first delta is the first index) as uint16 when every
    delta fits, else uint32, so zstd sees small, regular integers.  Ties in |x| go to the lower
    index (stable sort), which keeps encoding deterministic.  Bound:
    ``max(max |dropped|, scale/2 + eps)``.
    """

    name = "topk+int8"

    def __init__(self, density: float = 0.01) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"topk+int8: density must be in (0, 1], got {density}")
        self.density = density

    def k(self, numel: int) -> int:
        """How many entries survive for a tensor of ``numel`` elements."""
        return min(numel, math.ceil(self.density * numel))

    def layout(self, numel: int) -> dict[str, PartSpec]:
        k = self.k(numel)
        return {
            "indices": PartSpec(("uint16", "uint32"), k),
            "values": PartSpec(("int8",), k),
            "scale": PartSpec(("float32",), 1),
        }

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [numel]`` → ascending int64 indices ``[k]`` of the k largest |x|.

        O(numel): find the k-th largest |x|, keep everything above it, then fill up with the
        lowest-index entries equal to it (torch.topk's own tie order is unspecified).
        """
        k, a = self.k(x.numel()), x.abs()
        if k == 0:
            return torch.zeros(0, dtype=torch.int64)
        kth = torch.topk(a, k, sorted=False).values.min()
        above = (a > kth).nonzero().squeeze(1)
        ties = (a == kth).nonzero().squeeze(1)[: k - above.numel()]
        return torch.sort(torch.cat([above, ties])).values

    def quantize(self, x: torch.Tensor) -> Parts:
        idx = self._select(x)
        kept = x[idx]
        scale = kept.abs().max() / 127 if kept.numel() else torch.tensor(0.0)  # fp32 scalar
        safe = scale if scale > 0 else torch.tensor(1.0)
        q = torch.round(kept / safe).clamp(-127, 127).to(torch.int8)
        deltas = np.diff(idx.numpy(), prepend=0)
        wide = deltas.size > 0 and int(deltas.max()) >= 1 << 16
        return {
            "indices": deltas.astype(np.uint32 if wide else np.uint16),
            "values": q.numpy().copy(),
            "scale": np.array([scale.item()], dtype=np.float32),
        }

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        deltas = parts["indices"].astype(np.int64)
        idx = np.cumsum(deltas)
        if deltas.size and (idx[-1] >= numel or (deltas[1:] == 0).any()):
            raise CodecError(
                f"topk+int8: indices must be strictly increasing and < numel={numel}, "
                f"got last index {int(idx[-1])} and {int((deltas[1:] == 0).sum())} repeats"
            )
        out = torch.zeros(numel, dtype=torch.float32)
        scale = float(parts["scale"].astype(np.float32)[0])
        values = torch.from_numpy(parts["values"].astype(np.float32)) * torch.tensor(scale)
        out[torch.from_numpy(idx)] = values
        return out

    def error_bound(self, x: torch.Tensor) -> float:
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        keep[self._select(x)] = True
        dropped = _max_abs(x[~keep])
        kept = _max_abs(x[keep])
        return max(dropped, kept / 127 / 2 + kept * _REL_EPS + _ABS_EPS)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """``q: int8 [n]`` of ``bits``-bit two's-complement codes → ``uint8 [ceil(n*bits/8)]``.

    Code j of each byte sits at bit ``j*bits`` (little-endian within the byte); the tail of the
    last byte is zero.
    """
    per, mask = 8 // bits, (1 << bits) - 1
    padded = np.zeros(_n_blocks(q.size, per) * per, dtype=np.uint8)
    padded[: q.size] = q.astype(np.uint8) & mask
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: ``uint8 [ceil(n*bits/8)]`` → sign-extended ``int8 [n]``."""
    per, mask = 8 // bits, (1 << bits) - 1
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & mask).reshape(-1)[:n].astype(np.int16)
    return (codes - ((codes >> (bits - 1)) << bits)).astype(np.int8)


SCHEMES: dict[str, Scheme] = {
    s.name: s for s in (Fp32(), Bf16(), Int8Block(), Fp8Block(), Int4Block(), Int2Block(), TopKInt8())
}


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``; CodecError listing the known names otherwise."""
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}") from None
