"""Framing: one encoded payload as a header message followed by bounded, checksummed chunks.

Both ends use this in both directions (docs/design.md, steps 2, 5 and 9): an island frames its
pseudo-gradient as `PushHeader` + chunks, the coordinator frames θ_b and outer deltas as
`PayloadHeader` + chunks, and each side reassembles what it receives with `Assembler`.

A header carries the codec header, the body's length, its sha256 and the number of chunks; a
push header also carries a crc32 of the codec header and the scheme's name. Each chunk carries a
crc32 of its bytes, so a corrupted stream fails at the first bad chunk; the sha256 then vouches
for the reassembled body. An `Assembler` holds at most `body_len` bytes, refuses more chunks or
bytes than were declared, and, when the receiver knows the sender's chunk size and its payload
limit, refuses headers that do not fit them before a single chunk is read.

Refusals are `FramingError`s whose `code` names the gRPC status the coordinator answers with:
INVALID_ARGUMENT (a malformed stream), DATA_LOSS (corrupted or truncated in transit) or
RESOURCE_EXHAUSTED (over a size limit).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protos.codec import DEFAULT_CHUNK_SIZE, Payload
from protos.quant import CodecError


class FramingError(CodecError):
    """A framed payload that cannot be accepted; `code` is the gRPC status name for it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Chunk:
    """A slice of the body: its position, bytes, and zlib.crc32 of those bytes."""

    index: int
    data: bytes
    crc32: int


def split_chunks(body: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
    """Cut ``body`` into ``ceil(len/chunk_size)`` chunks (none for an empty body)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise CodecError(f"chunk_size must be a positive int, got {chunk_size!r}")
    pieces = (bytes(body[o : o + chunk_size]) for o in range(0, len(body), chunk_size))
    return [Chunk(i, data, zlib.crc32(data)) for i, data in enumerate(pieces)]


def join_chunks(chunks: Iterable[Chunk], body_len: int, body_sha256: str) -> bytes:
    """Reassemble a body from chunks in index order, checking every crc, the length and sha256.

    Never holds more than ``body_len`` bytes of chunk data: it stops at the first chunk that
    would overflow it.
    """
    if not isinstance(body_len, int) or isinstance(body_len, bool) or body_len < 0:
        raise CodecError(f"body_len must be a non-negative int, got {body_len!r}")
    pieces: list[bytes] = []
    total = 0
    for pos, c in enumerate(chunks):
        if c.index != pos:
            problem = "is a duplicate" if c.index < pos else f"skips chunk {pos} (missing or out of order)"
            raise CodecError(f"chunk {c.index} at position {pos} {problem}")
        if (crc := zlib.crc32(c.data)) != c.crc32:
            raise CodecError(f"chunk {pos} crc32 mismatch: declared {c.crc32:#010x}, data has {crc:#010x}")
        total += len(c.data)
        if total > body_len:
            raise CodecError(f"chunk {pos} ends at byte {total}, past body_len={body_len} (extra data)")
        pieces.append(c.data)
    if total != body_len:
        raise CodecError(f"body truncated: {len(pieces)} chunks carry {total} of body_len={body_len} bytes")
    body = b"".join(pieces)
    if (digest := hashlib.sha256(body).hexdigest()) != body_sha256:
        raise CodecError(f"reassembled body sha256 {digest} does not match the header's {body_sha256}")
    return body


def frame(part_type: Any, header: Any, payload: Payload, chunk_bytes: int) -> list[Any]:
    """`payload` as messages of `part_type` (`PushPart` or `PayloadPart`): `header` with the
    codec header, body length, sha256 and chunk count filled in (and, for a push header, the
    codec header's crc32 and the scheme), then one message per chunk."""
    chunks = split_chunks(payload.body, chunk_bytes)
    codec_header = payload.header_bytes()
    header.codec_header = codec_header
    header.body_len = len(payload.body)
    header.body_sha256 = payload.header["body_sha256"]
    header.num_chunks = len(chunks)
    if hasattr(header, "codec_header_crc32"):
        header.codec_header_crc32 = zlib.crc32(codec_header)
        header.scheme = payload.header["scheme"]
    chunk_type = type(part_type().chunk)
    return [part_type(header=header)] + [
        part_type(chunk=chunk_type(index=c.index, data=c.data, crc32=c.crc32)) for c in chunks]


def check_codec_header(header: Any) -> None:
    """A push header's codec header against its crc32 (0: not sent): DATA_LOSS if it differs."""
    declared = getattr(header, "codec_header_crc32", 0)
    if declared and zlib.crc32(header.codec_header) != declared:
        raise FramingError("DATA_LOSS", "the push's codec header fails its crc32 check (corrupted in transit)")


def check_frame(header: Any, chunk_bytes: int | None = None, max_payload_bytes: int | None = None) -> None:
    """A header's body length and chunk count against the receiver's own limits (see `Assembler`),
    before a single chunk is read."""
    if max_payload_bytes is not None and header.body_len > max_payload_bytes:
        raise FramingError("RESOURCE_EXHAUSTED", f"payload of {header.body_len} bytes exceeds the limit of "
                           f"{max_payload_bytes}")
    if chunk_bytes is not None:
        expected = -(-header.body_len // chunk_bytes)
        if header.num_chunks != expected:
            raise FramingError("INVALID_ARGUMENT", f"{header.num_chunks} chunks do not fit a body of "
                               f"{header.body_len} bytes in chunks of {chunk_bytes} bytes (expected {expected})")


def check_push_codec_header(header: Any) -> dict[str, Any]:
    """A push header's codec header, parsed and checked against the push header's own fields (scheme,
    body length and sha256) before the body is read: the one hash computed while it arrives
    then vouches for both."""
    try:
        codec = Payload.from_header_bytes(header.codec_header, b"").header
    except CodecError as exc:
        raise FramingError("INVALID_ARGUMENT", f"payload refused: {exc}") from exc
    if header.scheme and codec["scheme"] != header.scheme:
        raise FramingError("INVALID_ARGUMENT", f"payload refused: codec header scheme {codec['scheme']!r} differs "
                           f"from the push header's {header.scheme!r}")
    if codec["body_len"] != header.body_len or codec["body_sha256"] != header.body_sha256:
        raise FramingError("INVALID_ARGUMENT", "payload refused: the codec header's body_len/body_sha256 "
                           f"({codec['body_len']}, {codec['body_sha256']}) differ from the push header's "
                           f"({header.body_len}, {header.body_sha256})")
    return codec


class Assembler:
    """Collects the chunks of one framed payload (see the module docstring for what it checks).

    `chunk_bytes` and `max_payload_bytes`, when given, are the receiver's own limits: the header's
    chunk count must be the one `chunk_bytes` gives for its body, and its body must fit the limit.
    """

    def __init__(self, header: Any, chunk_bytes: int | None = None, max_payload_bytes: int | None = None) -> None:
        self.header = header
        check_frame(header, chunk_bytes, max_payload_bytes)
        self.chunks: list[bytes] = []
        self.body_bytes = 0

    def add(self, chunk: Any) -> None:
        """One chunk message (`pb.Chunk`), in order."""
        h = self.header
        self.body_bytes += len(chunk.data)
        if len(self.chunks) >= h.num_chunks or self.body_bytes > h.body_len:
            raise FramingError("INVALID_ARGUMENT", f"more data than declared ({h.num_chunks} chunks, "
                               f"{h.body_len} bytes)")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise FramingError("DATA_LOSS", f"chunk {chunk.index} fails its crc32 check")
        pos = len(self.chunks)
        if chunk.index != pos:
            problem = "is a duplicate" if chunk.index < pos else f"skips chunk {pos} (missing or out of order)"
            raise FramingError("DATA_LOSS", f"payload refused: chunk {chunk.index} at position {pos} {problem}")
        self.chunks.append(chunk.data)

    def payload(self) -> Payload:
        """The reassembled payload, once every declared chunk is in."""
        h = self.header
        if len(self.chunks) != h.num_chunks:
            raise FramingError("DATA_LOSS", f"stream ended after {len(self.chunks)} of {h.num_chunks} chunks "
                               "(truncated push)")
        if self.body_bytes != h.body_len:
            raise FramingError("DATA_LOSS", f"payload refused: body truncated: {len(self.chunks)} chunks carry "
                               f"{self.body_bytes} of body_len={h.body_len} bytes")
        body = b"".join(self.chunks)  # every chunk's crc, index and length were checked as it came in
        self.chunks = []
        if (digest := hashlib.sha256(body).hexdigest()) != h.body_sha256:
            raise FramingError("DATA_LOSS", f"payload refused: reassembled body sha256 {digest} does not match "
                               f"the header's {h.body_sha256}")
        try:
            payload = Payload.from_header_bytes(h.codec_header, body)
        except CodecError as exc:
            raise FramingError("INVALID_ARGUMENT", f"payload refused: {exc}") from exc
        scheme = getattr(h, "scheme", None)
        if scheme is not None and payload.header.get("scheme") != scheme:
            raise FramingError("INVALID_ARGUMENT", f"payload refused: codec header scheme "
                               f"{payload.header.get('scheme')!r} differs from the push header's {scheme!r}")
        return payload


def read_stream(parts: Iterable[Any]) -> list[tuple[Any, Payload]]:
    """Every (header, payload) of a stream of `PayloadPart`s, in order (a pull reply)."""
    out: list[tuple[Any, Payload]] = []
    assembler: Assembler | None = None
    for part in parts:
        if part.WhichOneof("part") == "header":
            if assembler is not None:
                out.append((assembler.header, assembler.payload()))
            assembler = Assembler(part.header)
        elif assembler is None:
            raise FramingError("INVALID_ARGUMENT", "a payload stream must start with a header")
        else:
            assembler.add(part.chunk)
    if assembler is not None:
        out.append((assembler.header, assembler.payload()))
    return out
