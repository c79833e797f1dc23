"""Receiving one push: its body goes to its spill file as the chunks arrive (docs/design.md step 6).

The coordinator never holds a push's body whole. Each chunk is checked (position, size, crc32),
fed to the body's sha256 and appended to a temporary file in `state_dir/spill/`, on a worker
thread while the event loop reads the next chunk; when the last chunk is in, the length and the
sha256 are checked and the file is fsynced. The round engine then renames it to its final name
and records the push as pending in one step under its lock (`RoundEngine.submit`): only then is
the push acknowledged. A refused or broken stream leaves no file behind.

The file is what `coordinator/spool.py` reads: a 4-byte big-endian length, the msgpack codec
header, the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.admission import BadPseudoGradient, Busy
from coordinator.guard import first_non_finite
from coordinator.spool import read_payload
from protos.broadcast import l2_norm
from protos.codec import CodecError, TensorSpec, check_payload, decode, raw_reader
from protos.framing import FramingError
from protos.quant import Fp8Block, _BlockScheme


class BodyWriter:
    """The body of one push, chunk by chunk, into ``tmp`` (see the module docstring).

    ``header`` is the push header (body_len, num_chunks, body_sha256 already checked against the
    receiver's limits by `protos.framing.Assembler`'s rules); ``codec_header`` its parsed codec
    header, whose bytes open the file.
    """

    def __init__(self, tmp: Path, header: Any, payload_header: dict[str, Any]) -> None:
        self.header = header
        self.payload_header = payload_header
        self.tmp = tmp
        self.chunks = 0
        self.body_bytes = 0
        self._sha = hashlib.sha256()
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(tmp, "wb")  # noqa: SIM115 (closed by finish or abort)
        codec_header = bytes(header.codec_header)
        self._fh.write(struct.pack(">I", len(codec_header)))
        self._fh.write(codec_header)

    def check(self, chunk: Any) -> None:
        """Position and size of the next chunk (cheap: on the event loop, before it is queued)."""
        h = self.header
        self.body_bytes += len(chunk.data)
        if self.chunks >= h.num_chunks or self.body_bytes > h.body_len:
            raise FramingError("INVALID_ARGUMENT", f"more data than declared ({h.num_chunks} chunks, "
                               f"{h.body_len} bytes)")
        if chunk.index != self.chunks:
            pos = self.chunks
            problem = "is a duplicate" if chunk.index < pos else f"skips chunk {pos} (missing or out of order)"
            raise FramingError("DATA_LOSS", f"payload refused: chunk {chunk.index} at position {pos} {problem}")
        self.chunks += 1

    def write(self, chunk: Any) -> None:
        """crc32, hash and append one checked chunk (a worker thread; hashlib, zlib and the write
        release the GIL)."""
        data = chunk.data
        if zlib.crc32(data) != chunk.crc32:
            raise FramingError("DATA_LOSS", f"chunk {chunk.index} fails its crc32 check")
        self._sha.update(data)
        self._fh.write(data)

    def finish(self) -> None:
        """Every declared chunk in, the sha256 right, the file fsynced (a worker thread)."""
        h = self.header
        if self.chunks != h.num_chunks:
            raise FramingError("DATA_LOSS", f"stream ended after {self.chunks} of {h.num_chunks} chunks "
                               "(truncated push)")
        if self.body_bytes != h.body_len:
            raise FramingError("DATA_LOSS", f"payload refused: body truncated: {self.chunks} chunks carry "
                               f"{self.body_bytes} of body_len={h.body_len} bytes")
        if (digest := self._sha.hexdigest()) != h.body_sha256:
            raise FramingError("DATA_LOSS", f"payload refused: reassembled body sha256 {digest} does not match "
                               f"the header's {h.body_sha256}")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


async def receive_body(writer: BodyWriter, parts: Any) -> int:
    """Stream the chunk messages of ``parts`` (an async iterator) into ``writer``: each chunk is
    written on a worker thread while the next one is read. The bytes of the messages received."""
    loop = asyncio.get_running_loop()
    received = 0
    in_flight: asyncio.Future | None = None
    try:
        async for part in parts:
            if part.WhichOneof("part") != "chunk":
                raise FramingError("INVALID_ARGUMENT", "a push carries one PushHeader, then only chunks")
            received += part.ByteSize()
            writer.check(part.chunk)
            if in_flight is not None:
                await in_flight
            in_flight = loop.run_in_executor(None, writer.write, part.chunk)
        if in_flight is not None:
            await in_flight
            in_flight = None
        await asyncio.to_thread(writer.finish)
    except BaseException:
        if in_flight is not None:
            await asyncio.gather(in_flight, return_exceptions=True)  # never close under a write
        writer.abort()
        raise
    return received


def check_body(path: Path, specs: list[TensorSpec], max_update_norm: float) -> None:
    """A spilled body the outer step can use (docs/design.md step 6): every value finite and, with
    ``max_update_norm`` > 0, the norm within it; `BadPseudoGradient` otherwise.

    A block scheme's values are ``level × scale`` with ``|level| ≤ qmax``, so its scales decide:
    all finite, and ``|scale| · qmax`` finite too (fp8 codes can themselves be NaN, so those are
    looked at as well). Other schemes, and a norm bound, decode the body.
    """
    payload = read_payload(path, verify_sha256=False)  # hashed as it arrived
    try:
        scheme, entries = check_payload(payload, specs, verify_sha256=False)
        if max_update_norm > 0 or not isinstance(scheme, _BlockScheme):
            values = decode(payload, specs, verify_sha256=False)
            if (bad := first_non_finite(values)) is not None:
                raise BadPseudoGradient(f"pseudo-gradient tensor '{bad}' contains NaN or Inf")
            if max_update_norm > 0 and (norm := l2_norm(values)) > max_update_norm:
                raise BadPseudoGradient(f"pseudo-gradient norm {norm:.4g} exceeds the bound {max_update_norm:.4g}")
            return
        copy = raw_reader(payload)
        for e in entries:
            (_, _, scales_at, n_scales), (_, _, codes_at, n_codes) = e.parts
            scales = np.empty(n_scales, np.uint8)
            copy(scales, scales_at)
            big = torch.from_numpy(scales.view(np.float32)).abs() * scheme.qmax
            if not bool(torch.isfinite(big).all()):
                raise BadPseudoGradient(f"pseudo-gradient tensor '{e.name}' contains NaN or Inf (a block scale "
                                        "that is not finite, or that overflows fp32 when decoded)")
            if isinstance(scheme, Fp8Block):
                codes = np.empty(n_codes, np.uint8)
                copy(codes, codes_at)
                if bool(((codes & 0x7F) == 0x7F).any()):  # e4m3fn's NaN, either sign
                    raise BadPseudoGradient(f"pseudo-gradient tensor '{e.name}' contains NaN or Inf")
    except CodecError as exc:
        raise BadPseudoGradient(f"payload refused: {exc}") from exc



class PushStreams:
    """The push streams being received, bounded in all and per island; a key on one stream at a time.

    Bodies go to disk as they arrive, so a stream costs about one chunk of memory: these bounds are
    what keeps a hostile or broken island (or too many honest ones) from exhausting the coordinator's
    memory and threads. A refusal is `Busy`: RESOURCE_EXHAUSTED, which islands retry with backoff."""

    def __init__(self, total: int, per_island: int) -> None:
        self.total, self.per_island = total, per_island
        self.keys: set[tuple[str, int, int]] = set()
        self.of_island: dict[str, int] = {}

    def open(self, key: tuple[str, int, int]) -> None:
        island = key[0]
        if key in self.keys:
            raise Busy(f"push for island '{island}' round {key[1]} fragment {key[2]} is being received on another "
                       "stream; send it again once that one ended", "ABORTED")
        if len(self.keys) >= self.total:
            raise Busy(f"the coordinator is receiving {len(self.keys)} pushes, its limit "
                       "(coordinator.max_push_streams); send it again shortly")
        if self.of_island.get(island, 0) >= self.per_island:
            raise Busy(f"island '{island}' has {self.of_island[island]} pushes in flight, the limit "
                       "(coordinator.max_push_streams_per_island); send it again once one ended")
        self.keys.add(key)
        self.of_island[island] = self.of_island.get(island, 0) + 1

    def close(self, key: tuple[str, int, int]) -> None:
        self.keys.discard(key)
        if (left := self.of_island.get(key[0], 0) - 1) > 0:
            self.of_island[key[0]] = left
        else:
            self.of_island.pop(key[0], None)
