"""zstd frames of the codec's bodies: bounded decompression, and frames of stored blocks.

A body is one zstd frame: compressed where that pays for its time (`zstd_enabled`), else made of
zstd's stored (raw) blocks (`stored_frame`), which any zstd decoder reads and which a receiver
reads where they lie (`stored_blocks`, `reader`), without a copy.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
from collections.abc import Sequence

import numpy as np
import zstandard

from protos.scheme import CodecError, Scheme

_READ_STEP = 1 << 20  # zstd output read per step: bounds the decompressor's scratch buffers
ZSTD_ENV = "ARCHIPELAGO_CODEC_ZSTD"  # per-scheme override of `Scheme.zstd`: "int8-block=1,int2-block=0"
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 << 10  # largest zstd block
_STORED_MAGIC = struct.pack("<IB", _ZSTD_MAGIC, 0xE0)  # a frame `stored_frame` writes begins so


def zstd_bound(n: int) -> int:
    """Largest zstd frame for ``n`` input bytes (ZSTD_COMPRESSBOUND plus frame-header slack)."""
    return n + (n >> 8) + (128 << 10 >> 11) + 64


def decompress(body: bytes, raw_len: int) -> bytes | bytearray:
    """zstd ``body`` → exactly ``raw_len`` bytes, never buffering more than raw_len + one step.

    A frame that declares ``raw_len`` as its content size is decompressed in one call into a
    buffer of exactly that size (zstd itself fails if the content does not match what the
    frame declares); any other frame is read in bounded steps, and a lie is caught within one.
    """
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        declared = -1  # not a frame: the stepwise reader below says so
    if declared == raw_len:
        try:
            return zstandard.ZstdDecompressor().decompress(body)
        except zstandard.ZstdError as e:
            raise CodecError(f"body is not a valid zstd frame: {e}") from None
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


def stored_blocks(body: bytes, raw_len: int) -> list[tuple[int, int, int]] | None:
    """The (raw offset, body offset, size) of each block if ``body`` is a frame of stored blocks
    exactly as `stored_frame` writes them (content size ``raw_len``, nothing after it), else
    None: such a body can be read where it lies, without decompressing it into a copy."""
    if len(body) < 16 or body[:5] != _STORED_MAGIC or int.from_bytes(body[5:13], "little") != raw_len:
        return None
    blocks, pos, done = [], 13, 0
    while pos + 3 <= len(body):
        head = int.from_bytes(body[pos : pos + 3], "little")
        size = head >> 3
        if head & 6 or size > _ZSTD_BLOCK_MAX or pos + 3 + size > len(body):  # not a raw block
            return None
        blocks.append((done, pos + 3, size))
        pos, done = pos + 3 + size, done + size
        if head & 1:  # the last block
            return blocks if pos == len(body) and done == raw_len else None
    return None


def reader(raw: bytes | bytearray | None, body: bytes, blocks: list[tuple[int, int, int]] | None):
    """``copy(dest, offset)``: fill ``dest`` with raw bytes from ``offset``, from ``raw`` or,
    for a stored frame, from the blocks of ``body`` that hold them."""
    if blocks is None:
        whole = np.frombuffer(raw, np.uint8)

        def copy(dest: np.ndarray, offset: int) -> None:
            dest[:] = whole[offset : offset + dest.size]

        return copy
    data = np.frombuffer(body, np.uint8)
    starts = [b[0] for b in blocks]

    def copy_blocks(dest: np.ndarray, offset: int) -> None:
        i, done = bisect.bisect_right(starts, offset) - 1, 0
        while done < dest.size:
            raw_at, body_at, size = blocks[i]
            skip = offset + done - raw_at
            take = min(size - skip, dest.size - done)
            dest[done : done + take] = data[body_at + skip : body_at + skip + take]
            done, i = done + take, i + 1

    return copy_blocks


def zstd_enabled(scheme: Scheme) -> bool:
    """Whether ``scheme``'s bodies are zstd-compressed by default: `ZSTD_ENV` if it names the
    scheme, else the scheme's own `Scheme.zstd`."""
    for item in filter(None, os.environ.get(ZSTD_ENV, "").split(",")):
        name, _, value = item.strip().partition("=")
        if name == scheme.name:
            if value not in ("0", "1"):
                raise CodecError(f"{ZSTD_ENV}: expected {name}=0 or {name}=1, got {item!r}")
            return value == "1"
    return scheme.zstd


def stored_frame(pieces: Sequence[bytes | memoryview | np.ndarray]) -> bytes:
    """The concatenation of ``pieces`` as a zstd frame of raw (uncompressed) blocks (RFC 8878
    §3.1.1), assembled in one copy: any zstd decoder reads it back, at memcpy speed, so a body
    that zstd would not shrink skips zstd's time."""
    views = [memoryview(p).cast("B") for p in pieces]
    n = sum(v.nbytes for v in views)
    out: list[bytes | memoryview] = [struct.pack("<IBQ", _ZSTD_MAGIC, 0xE0, n)]  # single segment, 8-byte size
    done, room = 0, 0  # bytes framed so far; bytes left in the open block
    for v in views:
        while v.nbytes:
            if room == 0:
                room = min(_ZSTD_BLOCK_MAX, n - done)
                out.append((room << 3 | (done + room == n)).to_bytes(3, "little"))  # block type 0: raw
            take = min(room, v.nbytes)
            out.append(v[:take])
            v, room, done = v[take:], room - take, done + take
    if n == 0:
        out.append((0 << 3 | 1).to_bytes(3, "little"))  # one empty, last block
    return b"".join(out)
