"""The payload codec: named tensors → quantized parts → msgpack header + zstd body → chunks.

Wire layout of one payload::

    header (msgpack map)                        body (bytes)
    {"format": 1, "scheme": "int8-block",       zstd( part0 | part1 | ... )  # one frame
     "tensors": [{"name", "shape", "dtype",
                  "parts": [{"key", "dtype",     parts are little-endian arrays laid out
                             "offset",          back to back, in tensor order then in the
                             "nbytes"}]}],      scheme's layout order, with no gaps
     "raw_len", "body_len", "body_sha256"}

On the wire the body travels in bounded chunks, each with a crc32 (protos/framing.py); the
sha256 in the header vouches for the whole body.

Both header and body come from the network, so `decode` validates the header *completely*
(types, sizes against ``MAX_RAW_BYTES``/``MAX_DECODED_BYTES``, part layout against the scheme)
before it allocates anything, verifies the body's length and sha256 before decompressing it,
and decompresses in bounded steps so a lying zstd frame cannot make it allocate more than the
header declared.  Past that boundary the code trusts what it has checked.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from protos.quant import CodecError, Parts, Scheme, get_scheme

FORMAT = 1
MAX_RAW_BYTES = 8 << 30  # decompressed body; a fragment of a large model fits comfortably
MAX_DECODED_BYTES = 32 << 30  # fp32 output: topk at 1% density decodes ~100x its body
MAX_HEADER_BYTES = 64 << 20
MAX_NDIM = 32
DEFAULT_CHUNK_SIZE = 1 << 20
_NO_CAP = 1 << 62
_READ_STEP = 1 << 20  # zstd output read per step: bounds the decompressor's scratch buffers
_WIRE_DTYPES = {"float32": "<f4", "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4"}
_TENSOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADER_KEYS = {"format", "scheme", "tensors", "raw_len", "body_len", "body_sha256"}
_TENSOR_KEYS = {"name", "shape", "dtype", "parts"}
_PART_KEYS = {"key", "dtype", "offset", "nbytes"}


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor: name, original shape and original dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype without the "torch." prefix, e.g. "bfloat16"

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), _dtype_name(tensor.dtype))


@dataclass(frozen=True)
class Payload:
    """One encoded message: a msgpack-able ``header`` and the zstd ``body`` it describes."""

    header: dict[str, Any]
    body: bytes

    def header_bytes(self) -> bytes:
        return msgpack.packb(self.header, use_bin_type=True)

    @classmethod
    def from_header_bytes(cls, data: bytes, body: bytes) -> Payload:
        """Parse and validate a header from the network (the body is checked by `decode`)."""
        return cls(parse_header(data), bytes(body))


@dataclass(frozen=True)
class _Entry:
    """One validated tensor of a header: where its parts lie in the raw body."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    parts: tuple[tuple[str, str, int, int], ...]  # (key, part dtype, offset, nbytes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size(v: object, what: str) -> int:
    if not _is_int(v) or v < 0:
        raise CodecError(f"header: {what} must be a non-negative int, got {v!r}")
    return v


def _keys(d: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(d, dict) or set(d) != keys:
        got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise CodecError(f"header: {what} must be a map with keys {sorted(keys)}, got {got}")
    return d


def _is_shape(v: object) -> bool:
    return isinstance(v, list) and len(v) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in v)


def _zstd_bound(n: int) -> int:
    """Largest zstd frame for ``n`` input bytes (ZSTD_COMPRESSBOUND plus frame-header slack)."""
    return n + (n >> 8) + (128 << 10 >> 11) + 64


def parse_header(
    data: bytes, *, max_raw_bytes: int = MAX_RAW_BYTES, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> dict[str, Any]:
    """msgpack bytes → validated header dict, before any body arrives (its body_len bounds
    `join_chunks`); CodecError if malformed or over the caps."""
    if len(data) > MAX_HEADER_BYTES:
        raise CodecError(f"header is {len(data)} bytes, over MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CodecError(f"header is not valid msgpack: {e}") from None
    _check_header(header, max_raw_bytes, max_decoded_bytes)
    return header


def _check_header(
    header: object, max_raw_bytes: int = MAX_RAW_BYTES, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> tuple[Scheme, list[_Entry]]:
    """Validate every field of an untrusted header; nothing is allocated from its sizes."""
    h = _keys(header, _HEADER_KEYS, "the header")
    if h["format"] != FORMAT or not _is_int(h["format"]):
        raise CodecError(f"header: format must be {FORMAT}, got {h['format']!r}")
    scheme = get_scheme(h["scheme"])
    raw_len = _size(h["raw_len"], "raw_len")
    if raw_len > max_raw_bytes:
        raise CodecError(f"header: raw_len={raw_len} exceeds the cap of {max_raw_bytes} bytes")
    body_len = _size(h["body_len"], "body_len")
    if body_len > _zstd_bound(raw_len):
        raise CodecError(f"header: body_len={body_len} exceeds zstd's bound for raw_len={raw_len}")
    if not isinstance(h["body_sha256"], str) or not _SHA256.fullmatch(h["body_sha256"]):
        raise CodecError(f"header: body_sha256 must be 64 lowercase hex digits, got {h['body_sha256']!r}")
    if not isinstance(h["tensors"], list):
        raise CodecError(f"header: tensors must be a list, got {type(h['tensors']).__name__}")
    entries: list[_Entry] = []
    names: set[str] = set()
    offset = decoded = 0
    for i, t in enumerate(h["tensors"]):
        t = _keys(t, _TENSOR_KEYS, f"tensors[{i}]")
        name = t["name"]
        if not isinstance(name, str) or not name or name in names:
            raise CodecError(f"header: tensors[{i}] name {name!r} is empty, not a string, or repeated")
        names.add(name)
        shape = t["shape"]
        if not _is_shape(shape):
            raise CodecError(
                f"header: tensor {name!r} shape must be ≤{MAX_NDIM} non-negative ints: {shape!r}"
            )
        if t["dtype"] not in _TENSOR_DTYPES:
            raise CodecError(f"header: tensor {name!r} dtype {t['dtype']!r} is not one of {_TENSOR_DTYPES}")
        numel = math.prod(shape)
        decoded += 4 * numel
        if decoded > max_decoded_bytes:
            raise CodecError(
                f"header: tensor {name!r} shape {shape} brings the decoded size to {decoded} bytes, "
                f"over the cap of {max_decoded_bytes}"
            )
        layout = scheme.layout(numel)
        parts = t["parts"]
        if not isinstance(parts, list) or len(parts) != len(layout):
            raise CodecError(f"header: tensor {name!r} must have parts {list(layout)} ({scheme.name})")
        checked = []
        for (key, spec), p in zip(layout.items(), parts, strict=True):
            p = _keys(p, _PART_KEYS, f"tensor {name!r} part")
            where = f"tensor {name!r} part {p['key']!r}"
            if p["key"] != key or p["dtype"] not in spec.dtypes:
                raise CodecError(f"header: {where} ({p['dtype']!r}): expected part {key!r} of {spec.dtypes}")
            nbytes = spec.count * np.dtype(_WIRE_DTYPES[p["dtype"]]).itemsize
            if _size(p["nbytes"], f"{where} nbytes") != nbytes:
                raise CodecError(
                    f"header: {where} declares {p['nbytes']} bytes, {numel} elements need {nbytes}"
                )
            start = _size(p["offset"], f"{where} offset")
            if start != offset:
                problem = "overlaps the previous part" if start < offset else "leaves a gap"
                raise CodecError(f"header: {where} at offset {start} {problem} (expected offset {offset})")
            offset += nbytes
            if offset > raw_len:
                raise CodecError(f"header: {where} ends at byte {offset}, past raw_len={raw_len}")
            checked.append((key, p["dtype"], start, nbytes))
        entries.append(_Entry(name, tuple(shape), t["dtype"], numel, tuple(checked)))
    if offset != raw_len:
        raise CodecError(f"header: parts cover {offset} bytes but raw_len={raw_len}")
    return scheme, entries


def _check_expected(entries: list[_Entry], expected: Sequence[TensorSpec]) -> None:
    got = {e.name: e for e in entries}
    want = {s.name: s for s in expected}
    if missing := [n for n in want if n not in got]:
        raise CodecError(f"payload lacks expected tensors {missing}")
    if extra := [n for n in got if n not in want]:
        raise CodecError(f"payload has unexpected tensors {extra}")
    for name, spec in want.items():
        e = got[name]
        if e.shape != tuple(spec.shape):
            raise CodecError(f"tensor {name!r}: expected shape {tuple(spec.shape)}, payload has {e.shape}")
        if e.dtype != spec.dtype:
            raise CodecError(f"tensor {name!r}: expected dtype {spec.dtype}, payload has {e.dtype}")


def _decompress(body: bytes, raw_len: int) -> bytearray:
    """zstd ``body`` → exactly ``raw_len`` bytes, never buffering more than raw_len + one step."""
    out = bytearray(raw_len)
    pos = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            while chunk := reader.read(min(_READ_STEP, raw_len - pos + 1)):
                if pos + len(chunk) > raw_len:
                    raise CodecError(f"body decompresses to more than raw_len={raw_len} bytes")
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
    except zstandard.ZstdError as e:
        raise CodecError(f"body is not a valid zstd frame: {e}") from None
    if pos != raw_len:
        raise CodecError(f"body decompresses to {pos} bytes, header says raw_len={raw_len}")
    return out


def _reconstruct(scheme: Scheme, entries: list[_Entry], raw: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Dequantize every tensor from the raw (decompressed) body: fp32, original shapes."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        parts: Parts = {}
        for key, dtype, offset, nbytes in e.parts:
            wire = np.dtype(_WIRE_DTYPES[dtype])
            parts[key] = np.frombuffer(raw, wire, nbytes // wire.itemsize, offset).astype(dtype)
        out[e.name] = scheme.dequantize(parts, e.numel).view(e.shape)
    return out


def _quantize(
    tensors: Mapping[str, torch.Tensor], scheme: Scheme, dtypes: Mapping[str, str], zstd_level: int
) -> tuple[Payload, bytes]:
    """Quantize, lay out and compress; returns the payload and its raw (uncompressed) body."""
    metas, blobs, offset = [], [], 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor) or _dtype_name(t.dtype) not in _TENSOR_DTYPES:
            raise CodecError(
                f"tensor {name!r} must be a torch tensor of {_TENSOR_DTYPES}, got {getattr(t, 'dtype', t)!r}"
            )
        x = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()  # [numel]
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CodecError(f"tensor {name!r} has {bad} non-finite values; refusing to send them")
        parts_meta = []
        for key, arr in scheme.quantize(x).items():
            blob = arr.astype(_WIRE_DTYPES[arr.dtype.name]).tobytes()
            parts_meta.append({"key": key, "dtype": arr.dtype.name, "offset": offset, "nbytes": len(blob)})
            blobs.append(blob)
            offset += len(blob)
        metas.append({"name": name, "shape": list(t.shape), "dtype": dtypes[name], "parts": parts_meta})
    raw = b"".join(blobs)
    body = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(raw)
    header = {
        "format": FORMAT,
        "scheme": scheme.name,
        "tensors": metas,
        "raw_len": len(raw),
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return Payload(header, body), raw


def encode(tensors: Mapping[str, torch.Tensor], scheme: str, *, zstd_level: int = 3) -> Payload:
    """Quantize finite floating tensors with ``scheme``; deterministic in (tensors, order, level)."""
    dtypes = {n: _dtype_name(t.dtype) for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    return _quantize(tensors, get_scheme(scheme), dtypes, zstd_level)[0]


def decode(
    payload: Payload,
    expected: Sequence[TensorSpec] | None = None,
    *,
    max_raw_bytes: int = MAX_RAW_BYTES,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> dict[str, torch.Tensor]:
    """Validate and decode an untrusted payload into fp32 tensors of their original shapes.

    Order of checks, cheapest and allocation-free first: header structure and caps, the
    ``expected`` specs, body length and sha256, then bounded decompression.
    """
    scheme, entries = _check_header(payload.header, max_raw_bytes, max_decoded_bytes)
    if expected is not None:
        _check_expected(entries, expected)
    h = payload.header
    if len(payload.body) != h["body_len"]:
        raise CodecError(f"body is {len(payload.body)} bytes, header says body_len={h['body_len']}")
    if (digest := hashlib.sha256(payload.body).hexdigest()) != h["body_sha256"]:
        raise CodecError(f"body sha256 mismatch: header says {h['body_sha256']}, body has {digest}")
    return _reconstruct(scheme, entries, _decompress(payload.body, h["raw_len"]))


def payload_nbytes(payload: Payload) -> int:
    """Bytes on the wire: msgpack header plus compressed body (chunk framing excluded)."""
    return len(payload.header_bytes()) + len(payload.body)


class ErrorFeedback:
    """Per-tensor residuals so that quantization error is re-sent, not lost (EF / EF21 style).

    For each tensor: ``y = Δ + e``, send ``Q(y)``, reconstruct ``ŷ`` from the very bytes sent
    (the same code path the receiver runs), and keep ``e ← y − ŷ``.  Then
    ``Σ_t ŷ_t = T·Δ − e_T``: the sum of what was received tracks the sum of what was meant,
    off by one round's quantization error however many rounds pass.  Residuals of tensors
    missing from a round (streaming fragments) are kept untouched.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, torch.Tensor] = {}  # name → fp32, the delta's shape

    def encode(
        self, deltas: Mapping[str, torch.Tensor], scheme: str, *, zstd_level: int = 3
    ) -> tuple[Payload, dict[str, torch.Tensor]]:
        """Payload of ``Q(Δ + e)`` and the fp32 CPU tensors ``ŷ`` the receiver will decode."""
        q = get_scheme(scheme)
        ys: dict[str, torch.Tensor] = {}
        dtypes: dict[str, str] = {}
        for name, d in deltas.items():
            if not isinstance(d, torch.Tensor) or not d.is_floating_point():
                raise CodecError(f"delta {name!r} must be a floating torch tensor, got {type(d).__name__}")
            e = self._residuals.get(name)
            if e is not None and e.shape != d.shape:
                shapes = f"shape {tuple(d.shape)} but its residual has {tuple(e.shape)}"
                raise CodecError(f"delta {name!r} has {shapes}; reset() first")
            y = d.detach().to(torch.float32)
            ys[name] = y + e.to(y.device) if e is not None else y
            dtypes[name] = _dtype_name(d.dtype)
        payload, raw = _quantize(ys, q, dtypes, zstd_level)
        entries = _check_header(payload.header, len(raw), _NO_CAP)[1]  # our own header: no caps
        y_hat = _reconstruct(q, entries, raw)
        for name, y in ys.items():  # commit only once every tensor encoded
            self._residuals[name] = y - y_hat[name].to(y.device)
        return payload, y_hat

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"residuals": {n: e.clone() for n, e in self._residuals.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residuals = state.get("residuals") if isinstance(state, Mapping) else None
        if not isinstance(residuals, Mapping) or not all(
            isinstance(n, str) and isinstance(e, torch.Tensor) and e.is_floating_point()
            for n, e in residuals.items()
        ):
            raise CodecError("error-feedback state must be {'residuals': {name: floating tensor}}")
        self._residuals = {n: e.detach().to(torch.float32).clone() for n, e in residuals.items()}

    def reset(self) -> None:
        """Drop every residual (after a model reset or a change of tensor shapes)."""
        self._residuals.clear()
