"""Framing: chunking, reassembly and its checks, header + chunks both ways, the Assembler's bounds."""

from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import archipelago_pb2 as pb
from protos.codec import CodecError, Payload, decode, encode
from protos.framing import (
    Assembler,
    Chunk,
    FramingError,
    check_codec_header,
    frame,
    join_chunks,
    read_stream,
    split_chunks,
)


def small_payload(scheme: str = "int8-block") -> Payload:
    g = torch.Generator().manual_seed(0)
    return encode({"w": torch.randn(3, 100, generator=g), "b": torch.randn(7, generator=g)}, scheme)



def chunked(n: int, chunk_size: int, seed: int = 0) -> tuple[bytes, list[Chunk], str]:
    body = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return body, split_chunks(body, chunk_size), hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 1000])
def test_chunk_boundaries(n: int) -> None:
    body, chunks, sha = chunked(n, 100)
    assert len(chunks) == math.ceil(n / 100) and all(len(c.data) <= 100 for c in chunks)
    assert join_chunks(chunks, n, sha) == body


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), chunk_size=st.integers(1, 800))
def test_split_join_roundtrip(n: int, chunk_size: int) -> None:
    body, chunks, sha = chunked(n, chunk_size, n)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert join_chunks(iter(chunks), n, sha) == body


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_corruption_is_caught(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 2000))
    body, chunks, sha = chunked(n, data.draw(st.integers(1, max(1, n // 2))))
    i = data.draw(st.integers(0, len(chunks) - 1))
    kind = data.draw(st.sampled_from(["flip", "drop", "dup", "swap", "truncate", "extra"]))
    bad = list(chunks)
    if kind == "flip":
        pos = data.draw(st.integers(0, len(chunks[i].data) - 1))
        flipped = bytearray(chunks[i].data)
        flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
        bad[i] = Chunk(i, bytes(flipped), chunks[i].crc32)
        match = f"chunk {i} crc32 mismatch"
    elif kind == "drop":
        del bad[i]
        match = "truncated" if i == len(chunks) - 1 else f"skips chunk {i}"
    elif kind == "dup":
        bad.insert(i + 1, chunks[i])
        match = "duplicate"
    elif kind == "swap":
        j = (i + 1) % len(chunks)
        if i == j:
            return
        bad[i], bad[j] = bad[j], bad[i]
        match = "skips chunk|duplicate"
    elif kind == "truncate":
        last = chunks[-1]
        bad[-1] = Chunk(last.index, last.data[:-1], last.crc32)
        match = "crc32 mismatch"
    else:
        bad.append(Chunk(len(chunks), b"x", 0x8CDC1683))
        match = "past body_len"
    with pytest.raises(CodecError, match=match):
        join_chunks(bad, n, sha)


def test_chunk_length_and_sha_checks() -> None:
    body, chunks, sha = chunked(250, 100)
    short = [*chunks[:-1], Chunk(2, chunks[2].data[:-1], zlib.crc32(chunks[2].data[:-1]))]
    with pytest.raises(CodecError, match="truncated: 3 chunks carry 249 of body_len=250"):
        join_chunks(short, 250, sha)
    with pytest.raises(CodecError, match="past body_len=200"):
        join_chunks(chunks, 200, sha)
    with pytest.raises(CodecError, match="sha256"):
        join_chunks(chunks, 250, "0" * 64)
    with pytest.raises(CodecError, match="chunk_size"):
        split_chunks(body, 0)


def test_payload_travels_in_chunks() -> None:
    p = small_payload("int4-block")
    h = Payload.from_header_bytes(p.header_bytes(), b"").header
    body = join_chunks(split_chunks(p.body, 64), h["body_len"], h["body_sha256"])
    assert torch.equal(decode(Payload(h, body))["w"], decode(p)["w"])


def test_push_frames_reassemble_with_every_check() -> None:
    p = small_payload("int4-block")
    parts = frame(pb.PushPart, pb.PushHeader(fragment=1, round=2), p, 64)
    h = parts[0].header
    assert (h.fragment, h.round, h.scheme, h.num_chunks) == (1, 2, "int4-block", math.ceil(len(p.body) / 64))
    assert h.codec_header_crc32 == zlib.crc32(h.codec_header)
    check_codec_header(h)
    asm = Assembler(h, chunk_bytes=64, max_payload_bytes=1 << 20)
    for part in parts[1:]:
        asm.add(part.chunk)
    assert torch.equal(decode(asm.payload())["w"], decode(p)["w"])


def test_pull_stream_of_several_payloads() -> None:
    a, b = small_payload("int8-block"), small_payload("fp32")
    parts = (frame(pb.PayloadPart, pb.PayloadHeader(version=3, fragment=0), a, 100)
             + frame(pb.PayloadPart, pb.PayloadHeader(version=4, fragment=1), b, 100))
    records = read_stream(parts)
    assert [h.version for h, _ in records] == [3, 4]
    assert [p.body for _, p in records] == [a.body, b.body]
    with pytest.raises(FramingError, match="start with a header"):
        read_stream(parts[1:])


def test_assembler_refusals_name_their_status() -> None:
    p = small_payload()
    parts = frame(pb.PushPart, pb.PushHeader(), p, 64)
    h = parts[0].header
    with pytest.raises(FramingError, match="exceeds the limit") as info:
        Assembler(h, chunk_bytes=64, max_payload_bytes=len(p.body) - 1)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(FramingError, match="chunks do not fit") as info:
        Assembler(h, chunk_bytes=32)
    assert info.value.code == "INVALID_ARGUMENT"
    asm = Assembler(h, chunk_bytes=64)
    bad = pb.Chunk(index=0, data=parts[1].chunk.data, crc32=parts[1].chunk.crc32 ^ 1)
    with pytest.raises(FramingError, match="fails its crc32") as info:
        asm.add(bad)
    assert info.value.code == "DATA_LOSS"
    asm = Assembler(h, chunk_bytes=64)
    for part in parts[1:-1]:
        asm.add(part.chunk)
    with pytest.raises(FramingError, match="truncated push") as info:
        asm.payload()
    assert info.value.code == "DATA_LOSS"
    for part in parts[-1:]:
        asm.add(part.chunk)
    with pytest.raises(FramingError, match="more data than declared") as info:
        asm.add(parts[-1].chunk)
    assert info.value.code == "INVALID_ARGUMENT"
    h.codec_header_crc32 ^= 1
    with pytest.raises(FramingError, match="codec header fails its crc32") as info:
        check_codec_header(h)
    assert info.value.code == "DATA_LOSS"


def test_scheme_in_push_header_must_match() -> None:
    parts = frame(pb.PushPart, pb.PushHeader(), small_payload(), 1 << 20)
    parts[0].header.scheme = "fp32"
    asm = Assembler(parts[0].header)
    for part in parts[1:]:
        asm.add(part.chunk)
    with pytest.raises(FramingError, match="differs from the push header") as info:
        asm.payload()
    assert info.value.code == "INVALID_ARGUMENT"
