"""Block schemes: int8/int4/int2/fp8 codes with one fp32 absmax scale per block.

All are pure torch/numpy on CPU, vectorised over blocks, and deterministic (round-half-to-even).
They quantize many tensors at once: `_BlockScheme.quantize_many` lays them out in one flat
buffer, each from a block boundary, and runs one fused kernel over it (absmax, scale, code, pack
and, for error feedback, the residual, block by block); `dequantize_many` is its inverse.  The
kernels are `protos.codec_kernels.Kernel`s.  Packing assumes a little-endian host, as the wire does.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.codec_kernels import Kernel, _scratch, compile_mode
from protos.scheme import (
    _ABS_EPS,
    _REL_EPS,
    DEFAULT_BLOCK,
    Parts,
    PartSpec,
    Scheme,
    _blocks,
    _max_abs,
    _n_blocks,
)


class _BlockScheme(Scheme):
    """Per-block absmax scaling: ``scale = absmax / qmax`` as fp32, values ``x / scale`` coded.

    fp32 scales (not fp16) because pseudo-gradients can exceed fp16's 65504 range early in
    training or after a spike.  An all-zero block has scale 0 and decodes to zeros, no NaN.

    The work is done by three fused kernels over a flat buffer in which every tensor starts on a
    block boundary (`quantize_many`, `dequantize_many`): many tensors, one kernel call.
    """

    qmax: float
    bits = 8

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"{type(self).__name__}: block must be >= 1, got {block}")
        self.block = block
        # Each tensor is padded to a whole number of blocks and of code bytes.
        self.unit = math.lcm(block, 8 // self.bits)
        self._kernels: dict[str, Kernel] = {}

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [numel]`` → (blocks ``[nb, block]``, scales ``fp32 [nb]``)."""
        blocks = _blocks(x, self.block)
        return blocks, blocks.abs().amax(dim=1) / self.qmax

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

    # ---- the kernels: functions of [blocks, block] tensors, compiled by `Kernel` where it pays ----

    @abstractmethod
    def _encode_levels(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled, clamped values ``v: fp32 [nb, block]`` → (the levels they decode to, fp32
        ``[nb, block]``; the codes on the wire, ``[nb, block·bits/8]``, or flat)."""

    @abstractmethod
    def _decode_levels(self, codes: torch.Tensor) -> torch.Tensor:
        """Flat codes → levels, fp32 ``[nb, block]``."""

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    # The kernels take and give two-dimensional tensors, [block, element of the block], so that
    # the compiled code runs the absmax, the coding and the residual of a block back to back
    # while the block is in L1: one outer loop, one pass over memory.

    def _scaled(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y: fp32 [nb, block]`` → (``y / scale`` clamped to ±qmax, scales ``[nb, 1]``).

        ``max|y| / qmax`` is computed as ``max(|y| / qmax)``: the same bits, as rounding the
        quotient is monotone, but a reduction the compiler fuses with the rest of the block.
        """
        scales = (y.abs() / self.qmax).amax(dim=1, keepdim=True)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return (y / safe).clamp(-self.qmax, self.qmax), scales

    def _quantize_kernel(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y: fp32 [nb, block]`` → (codes, scales ``[nb]``)."""
        v, scales = self._scaled(y)
        return self._encode_levels(v)[1], scales.view(-1)

    def _feedback_kernel(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y`` → (codes, scales), and ``y`` overwritten in place by the residual ``y − ŷ``,
        ``ŷ`` being what the receiver decodes: one read and one write of ``y``."""
        v, scales = self._scaled(y)
        levels, codes = self._encode_levels(v)
        y.sub_(levels * scales)
        return codes, scales.view(-1)

    def _dequantize_kernel(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Codes ``[nb, block·bits/8]`` (flat if a block is not whole bytes), scales ``[nb]`` →
        fp32 ``[nb, block]``."""
        return self._decode_levels(codes) * scales[:, None]

    def _accumulate_kernel(self, acc: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
        """``acc: fp32 [nb, block]`` += (what `_dequantize_kernel` gives) × ``weight`` (a 0-d fp32
        tensor), in place: the product rounded, then the sum, each once (no multiply-add)."""
        return acc.add_(self._decode_levels(codes) * scales[:, None] * weight)

    def _codes2d(self, codes: torch.Tensor) -> torch.Tensor:
        per = 8 // self.bits
        return codes.view(-1, self.block // per) if self.block % per == 0 else codes

    def kernel(self, kind: str) -> Kernel:
        """The scheme's ``"quantize"``, ``"feedback"``, ``"dequantize"`` or ``"accumulate"`` kernel.

        The first three are what an island runs and compile together; ``accumulate`` (a
        coordinator's merge) compiles on its own."""
        if not self._kernels:
            group: list[Kernel] = []
            for k, fn in (("feedback", self._feedback_kernel), ("quantize", self._quantize_kernel),
                          ("dequantize", self._dequantize_kernel), ("accumulate", self._accumulate_kernel)):
                self._kernels[k] = Kernel(f"{self.name}/{k}", fn, self._sample, functools.partial(self._synthetic, k),
                                          [] if k == "accumulate" else group, exact=k not in self.eager_only)
        return self._kernels[kind]

    def _synthetic(self, kind: str) -> tuple[torch.Tensor, ...]:
        """Inputs for compiling ``kind`` without a call of its own: made up, not drawn from an RNG."""
        rows = max(2, (1 << 16) // self.unit) * (self.unit // self.block)
        y = torch.linspace(-3.0, 3.0, rows * self.block).view(rows, self.block)
        y = y * torch.arange(1, rows + 1, dtype=torch.float32).remainder(7)[:, None]  # zero rows too
        if kind not in ("dequantize", "accumulate"):
            return (y,)
        codes, scales = self._quantize_kernel(y)
        if kind == "dequantize":
            return self._codes2d(codes.reshape(-1)), scales
        return y.flip(0) / 3, self._codes2d(codes.reshape(-1)), scales, torch.tensor(0.37)

    def _sample(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The first ≤ 2^20 values' worth of a kernel's arguments: what a compile is checked on."""
        rows = max(1, (1 << 20) // self.unit) * (self.unit // self.block)  # whole units of whole blocks
        if len(args) == 1:  # y
            return (args[0][:rows],)
        head, tail = (), ()
        if len(args) == 4:  # acc, codes, scales, weight
            head, tail, args = (args[0][:rows],), args[3:], args[1:3]
        codes, scales = args
        codes = codes[:rows] if codes.dim() == 2 else codes[: rows * self.block * self.bits // 8]
        return (*head, codes, scales[:rows], *tail)

    eager_only: tuple[str, ...] = ()  # kernels torch.compile cannot build: never tried

    ISLAND_KERNELS = ("feedback", "quantize", "dequantize")

    def kernels(self, kinds: Sequence[str] = ISLAND_KERNELS) -> list[Kernel]:
        return [self.kernel(kind) for kind in kinds]

    def compile_kernels(self, kinds: Sequence[str] = ISLAND_KERNELS) -> None:
        """Compile the scheme's kernels of ``kinds`` now, in this thread, unless `COMPILE_ENV` is
        ``0`` (see there for which callers should); a no-op once they are compiled or have failed."""
        if compile_mode() == "0":
            return
        for kernel in self.kernels(kinds):
            if kernel.state == "eager":
                kernel.compile_group()

    # ---- many tensors at once ----

    def _slots(self, numels: Sequence[int]) -> tuple[list[int], int]:
        """Element offset of each tensor in the flat buffer, and the buffer's length."""
        starts, total = [], 0
        for n in numels:
            starts.append(total)
            total += -(-n // self.unit) * self.unit
        return starts, total

    def _split(self, flat: torch.Tensor, numels: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``flat``'s slots, one view per tensor (flat), and the padding after each: one op."""
        sizes = []
        for n in numels:
            sizes += [n, -n % self.unit]
        chunks = flat.split(sizes)
        return list(chunks[::2]), list(chunks[1::2])

    def quantize_many(
        self, xs: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor | None] | None = None,
        *, feedback: bool = False, out: torch.Tensor | None = None,
    ) -> BlockBatch:
        """Quantize ``y_i = x_i.float() + e_i`` (or ``x_i.float()``) for every tensor, one kernel call.

        Each ``y_i`` is written once, into tensor i's slot of a zero-padded flat buffer (``out``
        if given: fp32, of the length the tensors need, reused across calls to spare the page
        faults of a fresh one); with ``feedback`` the kernel then overwrites it by the residual
        ``y − ŷ``.  A NaN or inf gives a non-finite block scale (`BlockBatch.first_nonfinite`).
        """
        numels = [x.numel() for x in xs]
        starts, total = self._slots(numels)
        fresh = out is None or out.shape != (total,) or out.dtype != torch.float32
        y = torch.empty(total, dtype=torch.float32) if fresh else out
        slots, pads = self._split(y, numels)
        for i, x in enumerate(xs):
            slot = slots[i] if x.dim() == 1 else slots[i].view(x.shape)
            if x.requires_grad or x.device.type != "cpu":
                x = x.detach().cpu()
            e = residuals[i] if residuals is not None else None
            if e is None:
                slot.copy_(x)
            else:
                if e.requires_grad or e.device.type != "cpu":
                    e = e.detach().cpu()
                torch.add(x if x.dtype == torch.float32 else x.to(torch.float32), e, out=slot)
        if fresh and (pads := [pad for pad in pads if pad.numel()]):  # a buffer filled before keeps
            torch._foreach_zero_(pads)  # zeros there: the residual of a zero is zero
        if total == 0:
            codes, scales = torch.empty(0, dtype=self.code_dtype), torch.empty(0)
        else:
            codes, scales = self.kernel("feedback" if feedback else "quantize")(y.view(-1, self.block))
            codes = codes.reshape(-1)
        inputs = list(zip(xs, residuals if residuals is not None else [None] * len(xs), strict=True))
        return BlockBatch(self, codes, scales, starts, numels, inputs, y if feedback else None)

    def dequantize_many(self, items: Sequence[tuple[Parts, int]]) -> list[torch.Tensor]:
        """``[(parts, numel)]`` → fp32 ``[numel]`` each, views of one flat buffer (one kernel call)."""
        numels = [n for _, n in items]
        starts, total = self._slots(numels)
        per = 8 // self.bits
        nscales = total // self.block
        # The gathered inputs only live for the kernel call: a per-thread scratch buffer, reused.
        buf = _scratch(4 * nscales + total // per)
        scales, codes = buf[: 4 * nscales].view(np.float32), buf[4 * nscales :]
        for (parts, n), start in zip(items, starts, strict=True):
            c, s = parts["values"].view(np.uint8), parts["scales"]
            b0, s0 = start // per, start // self.block
            codes[b0 : b0 + c.size] = c
            scales[s0 : s0 + s.size] = s
            if n % self.unit:  # zeros in the padding
                end = start + n - n % self.unit + self.unit
                codes[b0 + c.size : end // per] = 0
                scales[s0 + s.size : end // self.block] = 0
        return self._dequantize_gathered(codes, scales, starts, numels)

    def dequantize_raw(
        self, copy: Callable[[np.ndarray, int], None], spans: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """`dequantize_many` straight from a raw body: ``spans`` are (numel, offset of the scales,
        offset of the codes) in it, and ``copy(dest, offset)`` fills the uint8 array ``dest``
        with the body's bytes from ``offset`` on (so a body in pieces is read where it lies)."""
        numels = [n for n, _, _ in spans]
        starts, total = self._slots(numels)
        codes, scales = self.gather_raw(copy, spans, starts, total)
        return self._dequantize_gathered(codes, scales, starts, numels)

    def gather_raw(self, copy: Callable[[np.ndarray, int], None], spans: Sequence[tuple[int, int, int]],
                   starts: Sequence[int], total: int) -> tuple[np.ndarray, np.ndarray]:
        """The codes (uint8) and scales (fp32) of ``spans`` (see `dequantize_raw`), tensor i laid out
        from element ``starts[i]`` of a flat buffer of ``total`` elements with zeros in between, in
        this thread's scratch buffer (valid until its next use)."""
        per = 8 // self.bits
        nscales = total // self.block
        buf = _scratch(4 * nscales + total // per)
        scale_bytes, codes = buf[: 4 * nscales], buf[4 * nscales :]
        ends = [*starts[1:], total] if starts else []
        for (n, scales_at, codes_at), start, end in zip(spans, starts, ends, strict=True):
            b0, s0, nb, nc = start // per, start // self.block, -(-n // self.block), -(-n * self.bits // 8)
            copy(codes[b0 : b0 + nc], codes_at)
            copy(scale_bytes[4 * s0 : 4 * (s0 + nb)], scales_at)
            codes[b0 + nc : end // per] = 0  # zeros in the padding
            scale_bytes[4 * (s0 + nb) : 4 * (end // self.block)] = 0
        return codes, scale_bytes.view(np.float32)

    def accumulate_raw(self, acc: torch.Tensor, copy: Callable[[np.ndarray, int], None],
                       spans: Sequence[tuple[int, int, int]], starts: Sequence[int], weight: float) -> None:
        """``acc`` (fp32, a flat buffer in which tensor i starts at element ``starts[i]``, each start
        a multiple of `unit`) += ``weight`` × the decoded values of ``spans``, in one kernel call:
        bit for bit ``acc += dequantize_raw(...) * weight`` tensor by tensor."""
        if not acc.numel():
            return
        codes, scales = self.gather_raw(copy, spans, starts, acc.numel())
        codes_t = self._codes2d(torch.from_numpy(codes).view(self.code_dtype))
        self.kernel("accumulate")(acc.view(-1, self.block), codes_t, torch.from_numpy(scales),
                                  torch.tensor(weight, dtype=torch.float32))

    def _dequantize_gathered(self, codes: np.ndarray, scales: np.ndarray, starts: list[int],
                             numels: list[int]) -> list[torch.Tensor]:
        if not numels or not codes.size:
            return [torch.empty(0) for _ in numels]
        codes_t = self._codes2d(torch.from_numpy(codes).view(self.code_dtype))
        flat = self.kernel("dequantize")(codes_t, torch.from_numpy(scales)).view(-1)
        return self._split(flat, numels)[0]

    def quantize(self, x: torch.Tensor) -> Parts:
        return self.quantize_many([x]).parts(0)

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        return self.dequantize_many([(parts, numel)])[0]


@dataclass
class BlockBatch:
    """What `_BlockScheme.quantize_many` produced: tensor i's values sit at
    ``[starts[i], starts[i] + numels[i])`` of the flat buffer that codes, scales and (with
    feedback) ``residual`` describe."""

    scheme: _BlockScheme
    codes: torch.Tensor
    scales: torch.Tensor
    starts: list[int]
    numels: list[int]
    inputs: list[tuple[torch.Tensor, torch.Tensor | None]]  # (x_i, e_i): for error messages
    residual: torch.Tensor | None = None
    _y_hat: torch.Tensor | None = None

    def all_parts(self) -> list[Parts]:
        """Every tensor's parts: views of the batch's arrays, exactly what `layout` asks for."""
        codes, scales = self.codes.numpy(), self.scales.numpy()
        return [self._parts(codes, scales, s, n) for s, n in zip(self.starts, self.numels, strict=True)]

    def parts(self, i: int) -> Parts:
        """Tensor i's parts (see `all_parts`)."""
        return self._parts(self.codes.numpy(), self.scales.numpy(), self.starts[i], self.numels[i])

    def _parts(self, codes: np.ndarray, scales: np.ndarray, start: int, n: int) -> Parts:
        block, bits = self.scheme.block, self.scheme.bits
        return {"scales": scales[start // block : start // block + -(-n // block)],
                "values": codes[start * bits // 8 : start * bits // 8 + -(-n * bits // 8)]}

    def views(self, flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Each tensor's values in ``flat`` (a buffer of this batch's layout), in its shape."""
        slots, _ = self.scheme._split(flat, self.numels)
        return [v if len(shape) == 1 else v.view(tuple(shape)) for v, shape in zip(slots, shapes, strict=True)]

    @property
    def y_hat(self) -> torch.Tensor:
        """What the receiver decodes, fp32 over the flat buffer (decoded once, on first use)."""
        if self._y_hat is None:
            empty = self.codes.numel() == 0
            codes = self.scheme._codes2d(self.codes)
            self._y_hat = torch.empty(0) if empty else self.scheme.kernel("dequantize")(codes, self.scales).view(-1)
        return self._y_hat

    def first_nonfinite(self) -> tuple[int, int] | None:
        """(index, count) of the first tensor with a NaN or inf in its ``y``, if any.

        Only those give a non-finite block scale (absmax propagates NaN, the padding is zeros),
        so the scales, 1/block of the data, are all that a clean batch costs to check.
        """
        if self.scales.numel() == 0 or bool(torch.isfinite(self.scales).all()):
            return None
        first = int((~torch.isfinite(self.scales)).nonzero()[0, 0]) * self.scheme.block
        i = max(j for j, s in enumerate(self.starts) if s <= first)
        x, e = self.inputs[i]
        y = x.detach().to("cpu", torch.float32) + (e.detach().to("cpu") if e is not None else 0)
        return i, int((~torch.isfinite(y)).sum())


class _IntBlock(_BlockScheme):
    """Signed integer levels ``round(x / scale)`` in ``[-qmax, qmax]``, packed ``bits`` per code."""

    bits: int

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def _codes_layout(self, numel: int) -> PartSpec:
        if self.bits == 8:
            return PartSpec(("int8",), numel)
        return PartSpec(("uint8",), -(-numel * self.bits // 8))

    def _encode_levels(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(v).to(torch.int8)  # half to even; levels from the int8 so that -0 → +0
        levels = q.to(torch.float32)
        if self.bits == 8:
            return levels, q
        # Pack without gathers: the codes of several bytes, read as one little-endian integer
        # lane, are masked and shifted into place.  Compiled, int4 takes 8 codes per int64 lane
        # (inductor does not vectorise int16); eagerly, fewer and wider ops win: 2 per int16.
        per = 8 // self.bits
        q = q if self.block % per == 0 else q.view(-1)  # rows of whole bytes, or flat
        if self.bits == 4 and torch.compiler.is_compiling() and self.block % 8 == 0:
            w = q.view(torch.int64)
            packed = (w & 15) | ((w >> 4) & 0xF0)
            for j in range(2, 8, 2):  # levels 2j and 2j + 1 → byte j // 2
                packed = packed | ((((w >> (8 * j)) & 15) | ((w >> (8 * j + 4)) & 0xF0)) << (4 * j))
            return levels, packed.to(torch.int32).view(torch.uint8)
        if self.bits == 4:
            w = q.view(torch.int16).to(torch.int32)
            packed = (w & 0x0F) | ((w >> 4) & 0xF0)
        else:
            w = q.view(torch.int32)
            packed = (w & 0x03) | ((w >> 6) & 0x0C) | ((w >> 12) & 0x30) | ((w >> 18) & 0xC0)
        return levels, packed.to(torch.uint8)

    def _decode_levels(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes.view(-1, self.block).to(torch.float32)
        # Unpack the same way: each field v in [0, 2^bits) is sign-extended on its own,
        # ((v ^ half) - half) & 255, and put in its byte of a lane; the lanes, read as int8,
        # are the levels in order (no carries between bytes, no signed overflow).
        half = 1 << (self.bits - 1)
        if self.bits == 4 and torch.compiler.is_compiling() and self.block % 8 == 0:
            c = codes.view(torch.int32).to(torch.int64)  # 8 codes → one int64 lane of 8 levels
            fields = range(8)
        else:
            c = codes.to(torch.int32)  # one byte → 2 (int16 lane) or 4 (int32 lane) levels
            fields = range(8 // self.bits)
        lanes = torch.zeros_like(c)
        for j in fields:
            lanes = lanes | (((((c >> (self.bits * j)) & (2 * half - 1)) ^ half) - half) & 255) << (8 * j)
        if self.bits == 4 and c.dtype == torch.int32:
            lanes = lanes.to(torch.int16)
        return lanes.view(torch.int8).view(-1, self.block).to(torch.float32)


class Int8Block(_IntBlock):
    """int8 levels, scale absmax/127: ~8.25 bits/param before zstd, error ≤ scale/2."""

    name, qmax, bits = "int8-block", 127.0, 8
    zstd = False  # a pseudo-gradient's int8 codes barely compress (1%), at several times the codec's time


class Int4Block(_IntBlock):
    """int4 levels in [-7, 7] two per byte, scale absmax/7: error ≤ scale/2."""

    name, qmax, bits = "int4-block", 7.0, 4
    zstd = False  # 14% smaller, but zstd alone takes longer than the rest of encode and decode


class Int2Block(_IntBlock):
    """Ternary levels {-1, 0, 1} four per byte, scale absmax: error ≤ absmax/2 per block.

    Only useful with error feedback, which re-sends what rounding dropped in later rounds.
    """

    name, qmax, bits = "int2-block", 1.0, 2
    zstd = False  # 37% smaller with zstd: worth turning on (ARCHIPELAGO_CODEC_ZSTD) on a slow link


class Fp8Block(_BlockScheme):
    """float8_e4m3fn values, scale absmax/448 (e4m3fn's max finite), stored as uint8 bytes.

    e4m3 has 3 mantissa bits: half an ulp is ≤ 2**-4 of the value for normals, and the
    subnormal spacing (2**-9 in scaled units) is far below that, so the bound is stated as
    ``max over blocks of absmax * 2**-4``.
    """

    name, qmax = "fp8-block", 448.0
    eager_only = ("feedback",)  # inductor (torch 2.13) fails on it: KeyError 'buf1' in its loop body

    def _codes_layout(self, numel: int) -> PartSpec:
        return PartSpec(("uint8",), numel)

    def _encode_levels(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8 = v.to(torch.float8_e4m3fn)
        return f8.to(torch.float32), f8.view(torch.uint8)

    def _decode_levels(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.float8_e4m3fn).to(torch.float32).view(-1, self.block)

    def _step_bound(self, scales: torch.Tensor) -> torch.Tensor:
        return scales * self.qmax * 2.0**-4
