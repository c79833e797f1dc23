"""The payload codec: named tensors → quantized parts → msgpack header + zstd body → chunks.

Wire layout of one payload::

    header (msgpack map, zstd-framed if shorter) body (bytes)
    {"format": 1, "scheme": "int8-block",       zstd( part0 | part1 | ... )  # one frame
     "tensors": [{"name", "shape", "dtype",
                  "parts": [{"key", "dtype",     parts are little-endian arrays laid out
                             "offset",          back to back, in tensor order then in the
                             "nbytes"}]}],      scheme's layout order, with no gaps
     "raw_len", "body_len", "body_sha256"}

The frame is zstd-compressed where that pays for its time, else made of zstd's stored blocks
(`protos.zstd_frames`): a zstd frame either way, which any receiver reads.

On the wire the body travels in bounded chunks, each with a crc32 (protos/framing.py); the
sha256 in the header vouches for the whole body.

Both header and body come from the network, so `decode` validates the header *completely*
(types, sizes against ``MAX_RAW_BYTES``/``MAX_DECODED_BYTES``, part layout against the scheme)
before it allocates anything, verifies the body's length and sha256 before decompressing it,
and decompresses in bounded steps so a lying zstd frame cannot make it allocate more than the
header declared (a frame of stored blocks exactly as this module writes them is read where it
lies).  Past that boundary the code trusts what it has checked.

Block schemes encode (with or without error feedback) and decode every tensor of a payload in
one fused kernel call over one flat buffer (`protos.block_schemes`), bit for bit what quantizing and
dequantizing tensor by tensor gives (tests/protos/reference_codec.py keeps that reference).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from protos.quant import (
    BlockBatch,
    CodecError,
    Parts,
    PartSpec,
    Scheme,
    _BlockScheme,
    get_scheme,
)
from protos.zstd_frames import (
    decompress,
    reader,
    stored_blocks,
    stored_frame,
    zstd_bound,
    zstd_enabled,
)

FORMAT = 1
MAX_RAW_BYTES = 8 << 30  # decompressed body; a fragment of a large model fits comfortably
MAX_DECODED_BYTES = 32 << 30  # fp32 output: topk at 1% density decodes ~100x its body
MAX_HEADER_BYTES = 64 << 20
MAX_NDIM = 32
DEFAULT_CHUNK_SIZE = 1 << 20
_NO_CAP = 1 << 62
_WIRE_DTYPES = {"float32": "<f4", "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4"}
_ITEMSIZE = {name: np.dtype(wire).itemsize for name, wire in _WIRE_DTYPES.items()}
_WIRE_OF = {np.dtype(name): (name, np.dtype(wire)) for name, wire in _WIRE_DTYPES.items()}  # dtype → (name, wire)
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
        """The header on the wire: msgpack, zstd-compressed when that makes it shorter (a header
        repeats tensor names and part keys, so it shrinks about tenfold; it matters where the body
        is small, as for a sparse scheme on a small model)."""
        return pack_header(self.header)

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


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size(v: object, what: str) -> int:
    if not _is_int(v) or v < 0:
        raise CodecError(f"header: {what} must be a non-negative int, got {v!r}")
    return v


def _keys(d: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(d, dict) or d.keys() != keys:
        got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise CodecError(f"header: {what} must be a map with keys {sorted(keys)}, got {got}")
    return d


def _is_shape(v: object) -> bool:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        return False
    for d in v:
        if not (type(d) is int or _is_int(d)) or d < 0:  # an int, not a bool
            return False
    return True


@functools.lru_cache(maxsize=1 << 14)
def _layout(scheme: Scheme, numel: int) -> tuple[tuple[str, PartSpec], ...]:
    """`Scheme.layout`, immutable and remembered: a header repeats the same few sizes."""
    return tuple(scheme.layout(numel).items())


_HEADER_ZSTD_MIN = 512  # a shorter msgpack header goes as it is
_HEADER_ZSTD = threading.local()  # a ZstdCompressor per thread: one must not be used by two at once
_ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"  # no msgpack map begins with 0x28


def pack_header(header: Mapping[str, Any]) -> bytes:
    """msgpack of ``header``, as a zstd frame when that is shorter (see `Payload.header_bytes`)."""
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) < _HEADER_ZSTD_MIN:
        return packed
    compressor = getattr(_HEADER_ZSTD, "compressor", None)
    if compressor is None:  # level 3, deterministic: the same header gives the same bytes
        compressor = _HEADER_ZSTD.compressor = zstandard.ZstdCompressor(level=3)
    squeezed = compressor.compress(packed)
    return squeezed if len(squeezed) < len(packed) else packed


def _unpack_header_frame(data: bytes) -> bytes:
    """A zstd-framed header → its msgpack bytes, reading at most MAX_HEADER_BYTES + 1 of them."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            out = reader.read(MAX_HEADER_BYTES + 1)
    except zstandard.ZstdError as e:
        raise CodecError(f"header is not a valid zstd frame: {e}") from None
    if len(out) > MAX_HEADER_BYTES:
        raise CodecError(f"header decompresses past MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    return out


def parse_header(
    data: bytes, *, max_raw_bytes: int = MAX_RAW_BYTES, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> dict[str, Any]:
    """msgpack bytes (or a zstd frame of them) → validated header dict, before any body arrives
    (its body_len bounds `join_chunks`); CodecError if malformed or over the caps."""
    if len(data) > MAX_HEADER_BYTES:
        raise CodecError(f"header is {len(data)} bytes, over MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    if bytes(data[:4]) == _ZSTD_FRAME_MAGIC:
        data = _unpack_header_frame(bytes(data))
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
    if body_len > zstd_bound(raw_len):
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
        layout = _layout(scheme, numel)
        parts = t["parts"]
        if not isinstance(parts, list) or len(parts) != len(layout):
            keys = [key for key, _ in layout]
            raise CodecError(f"header: tensor {name!r} must have parts {keys} ({scheme.name})")
        checked = []
        for (key, spec), p in zip(layout, parts, strict=True):
            if not isinstance(p, dict) or p.keys() != _PART_KEYS:
                _keys(p, _PART_KEYS, f"tensor {name!r} part")  # raises, naming the keys
            if p["key"] != key or p["dtype"] not in spec.dtypes:
                where = f"tensor {name!r} part {p['key']!r}"
                raise CodecError(f"header: {where} ({p['dtype']!r}): expected part {key!r} of {spec.dtypes}")
            nbytes = spec.count * _ITEMSIZE[p["dtype"]]
            start = p["offset"]
            if not (_is_int(p["nbytes"]) and p["nbytes"] == nbytes and _is_int(start) and start == offset):
                where = f"tensor {name!r} part {p['key']!r}"
                if _size(p["nbytes"], f"{where} nbytes") != nbytes:
                    raise CodecError(
                        f"header: {where} declares {p['nbytes']} bytes, {numel} elements need {nbytes}"
                    )
                start = _size(start, f"{where} offset")
                problem = "overlaps the previous part" if start < offset else "leaves a gap"
                raise CodecError(f"header: {where} at offset {start} {problem} (expected offset {offset})")
            offset += nbytes
            if offset > raw_len:
                where = f"tensor {name!r} part {p['key']!r}"
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


def _reconstruct(scheme: Scheme, entries: list[_Entry], raw: bytes | bytearray | None, body: bytes = b"",
                 blocks: list[tuple[int, int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Dequantize every tensor from the raw (decompressed) body: fp32, original shapes.

    Block schemes decode all tensors in one kernel call into one flat buffer, of which the
    returned tensors are views, reading the codes and scales from ``raw`` or, for a body of
    stored ``blocks``, from ``body`` itself; the other schemes get read-only views of ``raw``.
    """
    if isinstance(scheme, _BlockScheme):
        spans = [(e.numel, e.parts[0][2], e.parts[1][2]) for e in entries]  # layout: scales, values
        values = scheme.dequantize_raw(reader(raw, body, blocks), spans)
        return {e.name: v.view(e.shape) for e, v in zip(entries, values, strict=True)}
    assert raw is not None
    items: list[tuple[Parts, int]] = []
    for e in entries:
        parts: Parts = {}
        for key, dtype, offset, nbytes in e.parts:
            wire = np.dtype(_WIRE_DTYPES[dtype])
            part = np.frombuffer(raw, wire, nbytes // wire.itemsize, offset)
            parts[key] = part if part.dtype == np.dtype(dtype) else part.astype(dtype)
        items.append((parts, e.numel))
    values = [scheme.dequantize(parts, numel) for parts, numel in items]
    return {e.name: v.view(e.shape) for e, v in zip(entries, values, strict=True)}


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor) or _dtype_name(t.dtype) not in _TENSOR_DTYPES:
            raise CodecError(
                f"tensor {name!r} must be a torch tensor of {_TENSOR_DTYPES}, got {getattr(t, 'dtype', t)!r}"
            )


def _nonfinite(name: str, bad: int) -> CodecError:
    return CodecError(f"tensor {name!r} has {bad} non-finite values; refusing to send them")


def _quantize(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    dtypes: Mapping[str, str],
    zstd_level: int,
    zstd: bool | None = None,
    *,
    residuals: Sequence[torch.Tensor | None] | None = None,
    feedback: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[Payload, bytes | None, BlockBatch | None]:
    """Quantize ``tensors`` (plus ``residuals``, block schemes only), lay out and compress.

    Returns the payload, its raw (uncompressed) body (None for a stored body of a block scheme:
    not needed, not built) and, for block schemes, the batch the one kernel call produced (with
    ``feedback``, in the buffer ``out`` if given, the residual too).
    """
    _check_tensors(tensors)
    names = list(tensors)
    batch = None
    if isinstance(scheme, _BlockScheme):
        batch = scheme.quantize_many(list(tensors.values()), residuals, feedback=feedback, out=out)
        if (bad := batch.first_nonfinite()) is not None:
            raise _nonfinite(names[bad[0]], bad[1])
        batch.inputs = []  # only the error needed them
        all_parts = batch.all_parts()
    else:
        assert residuals is None, "residuals are added by the block schemes' kernels only"
        all_parts = []
        for name, t in tensors.items():
            x = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()  # [numel]
            if not torch.isfinite(x).all():
                raise _nonfinite(name, int((~torch.isfinite(x)).sum()))
            all_parts.append(scheme.quantize(x))
    metas, blobs, offset = [], [], 0
    for (name, t), parts in zip(tensors.items(), all_parts, strict=True):
        parts_meta = []
        for key, arr in parts.items():
            dtype_name, wire = _WIRE_OF[arr.dtype]
            blob = np.ascontiguousarray(arr if arr.dtype == wire else arr.astype(wire))
            parts_meta.append({"key": key, "dtype": dtype_name, "offset": offset, "nbytes": blob.nbytes})
            blobs.append(blob)
            offset += blob.nbytes
        metas.append({"name": name, "shape": list(t.shape), "dtype": dtypes[name], "parts": parts_meta})
    raw: bytes | None = None  # built only where needed: zstd, or a reconstruction from it
    if zstd_enabled(scheme) if zstd is None else zstd:
        raw = b"".join(blobs)
        body = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(raw)
    else:
        body = stored_frame(blobs)
        if batch is None:
            raw = b"".join(blobs)
    header = {
        "format": FORMAT,
        "scheme": scheme.name,
        "tensors": metas,
        "raw_len": offset,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return Payload(header, body), raw, batch


def encode(
    tensors: Mapping[str, torch.Tensor], scheme: str, *, zstd_level: int = 3, zstd: bool | None = None
) -> Payload:
    """Quantize finite floating tensors with ``scheme``; deterministic in (tensors, order, level).

    ``zstd``: compress the body (True) or send it as stored zstd blocks (False); by default
    what `zstd_enabled` says for the scheme.
    """
    dtypes = {n: _dtype_name(t.dtype) for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    return _quantize(tensors, get_scheme(scheme), dtypes, zstd_level, zstd)[0]


def check_header(
    header: dict[str, Any],
    expected: Sequence[TensorSpec] | None = None,
    *,
    max_raw_bytes: int = MAX_RAW_BYTES,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> tuple[Scheme, list[_Entry]]:
    """A codec header alone, against its caps and the ``expected`` specs, before any body arrives:
    the scheme and the validated tensor entries."""
    scheme, entries = _check_header(header, max_raw_bytes, max_decoded_bytes)
    if expected is not None:
        _check_expected(entries, expected)
    return scheme, entries


def check_payload(
    payload: Payload,
    expected: Sequence[TensorSpec] | None = None,
    *,
    verify_sha256: bool = True,
    max_raw_bytes: int = MAX_RAW_BYTES,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> tuple[Scheme, list[_Entry]]:
    """What `decode` checks before it reads the body's values: the header, the ``expected`` specs,
    the body's length and (``verify_sha256``; off only for a body this process verified
    itself) its sha256. The scheme and the validated tensor entries."""
    scheme, entries = check_header(payload.header, expected, max_raw_bytes=max_raw_bytes,
                                   max_decoded_bytes=max_decoded_bytes)
    h = payload.header
    if len(payload.body) != h["body_len"]:
        raise CodecError(f"body is {len(payload.body)} bytes, header says body_len={h['body_len']}")
    if verify_sha256 and (got := hashlib.sha256(payload.body).hexdigest()) != h["body_sha256"]:
        raise CodecError(f"body sha256 mismatch: header says {h['body_sha256']}, body has {got}")
    return scheme, entries


def raw_reader(payload: Payload):
    """``copy(dest, offset)`` over the raw body of a checked payload (`check_payload`): read where
    it lies for a frame of stored blocks, else decompressed first (bounded by raw_len)."""
    raw_len = payload.header["raw_len"]
    blocks = stored_blocks(payload.body, raw_len)
    return reader(decompress(payload.body, raw_len) if blocks is None else None, payload.body, blocks)


def decode(
    payload: Payload,
    expected: Sequence[TensorSpec] | None = None,
    *,
    verify_sha256: bool = True,
    max_raw_bytes: int = MAX_RAW_BYTES,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> dict[str, torch.Tensor]:
    """Validate and decode an untrusted payload into fp32 tensors of their original shapes.

    Order of checks, cheapest and allocation-free first: header structure and caps, the
    ``expected`` specs, body length and sha256, then bounded decompression.  A large body is
    hashed on a second thread (hashlib releases the GIL) while it is decompressed and decoded;
    nothing is returned, and no error past the body length raised, before the digest matched
    (``verify_sha256=False``: a body this process verified when it received it).
    (The sha256 guards against corruption, not against a sender, who can hash a lie; what is
    decompressed is bounded by the checked header either way.)
    """
    scheme, entries = _check_header(payload.header, max_raw_bytes, max_decoded_bytes)
    if expected is not None:
        _check_expected(entries, expected)
    h = payload.header
    if len(payload.body) != h["body_len"]:
        raise CodecError(f"body is {len(payload.body)} bytes, header says body_len={h['body_len']}")
    digest = _Digest(payload.body) if verify_sha256 else None
    try:
        blocks = stored_blocks(payload.body, h["raw_len"]) if isinstance(scheme, _BlockScheme) else None
        raw = decompress(payload.body, h["raw_len"]) if blocks is None else None
        out: dict[str, torch.Tensor] | CodecError = _reconstruct(scheme, entries, raw, payload.body, blocks)
    except CodecError as e:
        out = e
    if digest is not None and (got := digest.hexdigest()) != h["body_sha256"]:
        raise CodecError(f"body sha256 mismatch: header says {h['body_sha256']}, body has {got}")
    if isinstance(out, CodecError):
        raise out
    return out


class _Digest:
    """sha256 of a body, on the codec's hashing thread when the body is large enough to be worth
    it, so that the caller goes on meanwhile; `hexdigest` waits for it.

    The caller waits until the hashing thread holds the GIL and is about to hash (one update
    over the whole body, during which hashlib releases the GIL): otherwise a caller busy in
    Python would keep the GIL for up to a switch interval (5 ms) before the thread even starts.
    """

    THREAD_MIN_BYTES = 1 << 20

    def __init__(self, body: bytes) -> None:
        self._hex: str | None = None
        self._future: Future[str] | None = None
        if len(body) < self.THREAD_MIN_BYTES:
            self._hex = hashlib.sha256(body).hexdigest()
        else:
            started = threading.Event()
            self._future = _hasher().submit(self._run, body, started)
            started.wait()

    @staticmethod
    def _run(body: bytes, started: threading.Event) -> str:
        h = hashlib.sha256()
        started.set()
        h.update(body)
        return h.hexdigest()

    def hexdigest(self) -> str:
        if self._future is not None:
            self._hex, self._future = self._future.result(), None
        assert self._hex is not None
        return self._hex


_HASHER: tuple[int, ThreadPoolExecutor] | None = None


def _hasher() -> ThreadPoolExecutor:
    """One long-lived hashing thread per process (a submit does not wait for a thread to start)."""
    global _HASHER
    if _HASHER is None or _HASHER[0] != os.getpid():  # a forked child inherits no threads
        _HASHER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec-sha256"))
    return _HASHER[1]


def payload_nbytes(payload: Payload) -> int:
    """Bytes on the wire: msgpack header plus compressed body (chunk framing excluded)."""
    return len(payload.header_bytes()) + len(payload.body)
