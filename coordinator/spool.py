"""Payloads on disk: accepted pushes (spilled before they are acknowledged) and broadcast deltas.

A file holds one payload exactly as it travelled: a 4-byte big-endian length, the msgpack codec
header, then the compressed body. It is written to a temporary name, fsynced and renamed, so a
file under its final name is always complete; its body's sha256 is checked again on reading (a
push's spill file is written as it arrives: coordinator/ingest.py).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from protos.codec import Payload, parse_header


def write_payload(path: Path, payload: Payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = payload.header_bytes()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack(">I", len(header)))
        fh.write(header)
        fh.write(payload.body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_payload(path: str | Path, verify_sha256: bool = True) -> Payload:
    """The payload a file holds; its body's sha256 checked unless this process wrote the file
    after checking it (``verify_sha256=False``: a push merged right after it was received)."""
    data = memoryview(Path(path).read_bytes())
    (n,) = struct.unpack(">I", data[:4])
    payload = Payload(parse_header(bytes(data[4:4 + n])), data[4 + n:])
    if verify_sha256 and hashlib.sha256(payload.body).hexdigest() != payload.header["body_sha256"]:
        raise OSError(f"payload file {path} is corrupt (body sha256 mismatch)")
    return payload


def remove(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
