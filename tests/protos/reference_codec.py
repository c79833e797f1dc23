"""The reference twin: the codec's quantize / lay out / compress / reconstruct path exactly as it
was before the fused kernels (commit 6e2cf15's protos/quant.py and the encode, decode and
ErrorFeedback internals of protos/codec.py), kept verbatim in its arithmetic so property tests
can hold today's implementation to it bit for bit: codes, scales, packed layout, payload header,
decoded values and error-feedback residuals.

Nothing here is used outside tests; do not "optimise" it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch
import zstandard

from protos.codec import FORMAT, Payload
from protos.quant import CodecError

Parts = dict[str, np.ndarray]
_WIRE_DTYPES = {"float32": "<f4", "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4"}
_TENSOR_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    nb = _n_blocks(x.numel(), block)
    return torch.nn.functional.pad(x, (0, nb * block - x.numel())).view(nb, block)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    per, mask = 8 // bits, (1 << bits) - 1
    padded = np.zeros(_n_blocks(q.size, per) * per, dtype=np.uint8)
    padded[: q.size] = q.astype(np.uint8) & mask
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per, mask = 8 // bits, (1 << bits) - 1
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & mask).reshape(-1)[:n].astype(np.int16)
    return (codes - ((codes >> (bits - 1)) << bits)).astype(np.int8)


class _Block:
    qmax: float
    bits = 8
    fp8 = False

    def __init__(self, block: int = 128) -> None:
        self.block = block

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = _blocks(x, self.block)
        return blocks, blocks.abs().amax(dim=1) / self.qmax

    def _scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, scales = self._scales(x)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        v = (blocks / safe[:, None]).clamp(-self.qmax, self.qmax)
        return v.reshape(-1)[: x.numel()], scales

    def _rescale(self, values: torch.Tensor, scales: np.ndarray, numel: int) -> torch.Tensor:
        s = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(self.block)[:numel]
        return values * s

    def quantize(self, x: torch.Tensor) -> Parts:
        v, scales = self._scaled(x)
        if self.fp8:
            codes = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()
            return {"scales": scales.numpy().copy(), "values": codes}
        q = torch.round(v).to(torch.int8).numpy()
        codes = q.copy() if self.bits == 8 else pack_bits(q, self.bits)
        return {"scales": scales.numpy().copy(), "values": codes}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        if self.fp8:
            codes = torch.from_numpy(parts["values"].copy())
            return self._rescale(codes.view(torch.float8_e4m3fn).to(torch.float32), parts["scales"], numel)
        codes = parts["values"]
        q = codes.view(np.int8) if self.bits == 8 else unpack_bits(codes, self.bits, numel)
        return self._rescale(torch.from_numpy(q.astype(np.float32)), parts["scales"], numel)


class Int8(_Block):
    qmax, bits = 127.0, 8


class Int4(_Block):
    qmax, bits = 7.0, 4


class Int2(_Block):
    qmax, bits = 1.0, 2


class Fp8(_Block):
    qmax, fp8 = 448.0, True


class Fp32:
    def quantize(self, x: torch.Tensor) -> Parts:
        return {"values": x.numpy().copy()}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        return torch.from_numpy(parts["values"].astype(np.float32))


class Bf16:
    def quantize(self, x: torch.Tensor) -> Parts:
        return {"values": x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()}

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        bits = torch.from_numpy(parts["values"].view(np.int16).copy())
        return bits.view(torch.bfloat16).to(torch.float32)


class TopK:
    def __init__(self, density: float = 0.01) -> None:
        self.density = density

    def k(self, numel: int) -> int:
        return min(numel, math.ceil(self.density * numel))

    def _select(self, x: torch.Tensor) -> torch.Tensor:
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
        scale = kept.abs().max() / 127 if kept.numel() else torch.tensor(0.0)
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
        idx = np.cumsum(parts["indices"].astype(np.int64))
        out = torch.zeros(numel, dtype=torch.float32)
        scale = float(parts["scale"].astype(np.float32)[0])
        values = torch.from_numpy(parts["values"].astype(np.float32)) * torch.tensor(scale)
        out[torch.from_numpy(idx)] = values
        return out


SCHEMES = {
    "fp32": Fp32(),
    "bf16": Bf16(),
    "int8-block": Int8(),
    "fp8-block": Fp8(),
    "int4-block": Int4(),
    "int2-block": Int2(),
    "topk+int8": TopK(),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_payload(
    tensors: Mapping[str, torch.Tensor], scheme: str, dtypes: Mapping[str, str] | None = None,
    zstd_level: int | None = 3,
) -> tuple[Payload, bytes, list[tuple[str, tuple[int, ...], list[tuple[str, str, int, int]]]]]:
    """Today's ``_quantize``: (payload, raw body, per-tensor part layout).  ``zstd_level=None``
    leaves the body uncompressed (the caller frames it); the header then lacks the body fields."""
    q = SCHEMES[scheme]
    dtypes = dtypes or {n: _dtype_name(t.dtype) for n, t in tensors.items()}
    metas, blobs, offset, layout = [], [], 0, []
    for name, t in tensors.items():
        x = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CodecError(f"tensor {name!r} has {bad} non-finite values; refusing to send them")
        parts_meta, entry = [], []
        for key, arr in q.quantize(x).items():
            blob = arr.astype(_WIRE_DTYPES[arr.dtype.name]).tobytes()
            parts_meta.append({"key": key, "dtype": arr.dtype.name, "offset": offset, "nbytes": len(blob)})
            entry.append((key, arr.dtype.name, offset, len(blob)))
            blobs.append(blob)
            offset += len(blob)
        metas.append({"name": name, "shape": list(t.shape), "dtype": dtypes[name], "parts": parts_meta})
        layout.append((name, tuple(t.shape), entry))
    raw = b"".join(blobs)
    header = {"format": FORMAT, "scheme": scheme, "tensors": metas, "raw_len": len(raw)}
    body = b""
    if zstd_level is not None:
        body = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(raw)
        header.update(body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    return Payload(header, body), raw, layout


def reconstruct(scheme: str, layout, raw: bytes) -> dict[str, torch.Tensor]:
    """Today's ``_reconstruct``: raw body → fp32 tensors of their original shapes."""
    q = SCHEMES[scheme]
    out = {}
    for name, shape, entry in layout:
        parts = {}
        for key, dtype, offset, nbytes in entry:
            wire = np.dtype(_WIRE_DTYPES[dtype])
            parts[key] = np.frombuffer(raw, wire, nbytes // wire.itemsize, offset).astype(dtype)
        out[name] = q.dequantize(parts, math.prod(shape)).view(shape)
    return out


class ErrorFeedback:
    """Today's ErrorFeedback.encode arithmetic: y = Δ.float() + e; e ← y − ŷ."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def encode(self, deltas: Mapping[str, torch.Tensor], scheme: str, zstd_level: int | None = 3):
        ys, dtypes = {}, {}
        for name, d in deltas.items():
            e = self.residuals.get(name)
            y = d.detach().to(torch.float32)
            ys[name] = y + e.to(y.device) if e is not None else y
            dtypes[name] = _dtype_name(d.dtype)
        payload, raw, layout = quantize_payload(ys, scheme, dtypes, zstd_level)
        y_hat = reconstruct(scheme, layout, raw)
        for name, y in ys.items():
            self.residuals[name] = y - y_hat[name].to(y.device)
        return payload, raw, y_hat
