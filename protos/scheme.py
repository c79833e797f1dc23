"""The scheme interface of the wire codec, and its two scales-free schemes (fp32, bf16).

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

The block schemes are in `protos.block_schemes`, their kernels in `protos.codec_kernels`, and
`protos.quant` is the registry that names them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from archipelago.errors import UserError

if TYPE_CHECKING:
    from protos.codec_kernels import Kernel

Parts = dict[str, np.ndarray]
"""Named parts of one quantized tensor, in the order they go into the body."""

DEFAULT_BLOCK = 128
_REL_EPS = 2.0**-20  # fp32 rounding in x/scale and q*scale, relative to max|x|
_ABS_EPS = 2.0**-126  # subnormal / underflowed scales


class CodecError(UserError):
    """A payload, header, chunk or scheme name is invalid; the message names what and where.

    Defined with the schemes rather than in `protos.codec` because the schemes raise it too and
    the codec imports the schemes; `protos.codec` and `protos.quant` re-export it.
    """


@dataclass(frozen=True)
class PartSpec:
    """What a part must look like for a given numel: one of ``dtypes``, exactly ``count`` items."""

    dtypes: tuple[str, ...]
    count: int


class Scheme(ABC):
    """A named, stateless quantizer of flattened fp32 tensors."""

    name: str
    zstd = True  # the codec's default: compress the body (off where it does not pay for its time)

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

    def kernels(self) -> list[Kernel]:
        """The scheme's fused kernels (block schemes), for reporting how they run."""
        return []


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

