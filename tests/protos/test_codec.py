"""Payload codec: round trips, determinism, error feedback, and hostile headers."""

from __future__ import annotations

import copy
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import codec
from protos.codec import (
    CodecError,
    Payload,
    TensorSpec,
    decode,
    encode,
    payload_nbytes,
)
from protos.error_feedback import ErrorFeedback
from protos.quant import SCHEMES

SHAPES = st.one_of(
    st.sampled_from([(0,), (1,), (), (129,), (2, 200)]), st.lists(st.integers(0, 12), max_size=3)
)


def sample(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def small_payload(scheme: str = "int8-block") -> Payload:
    return encode({"w": sample((3, 100)), "b": sample((7,), 1)}, scheme)


def reseal(header: dict[str, Any], raw: bytes) -> Payload:
    """A payload whose body, body_len and sha256 are consistent with ``raw`` (as an attacker would)."""
    body = zstandard.ZstdCompressor().compress(raw)
    h = dict(header, body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    return Payload(h, body)


def raw_of(p: Payload) -> bytes:
    return zstandard.ZstdDecompressor().decompress(p.body)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("scheme", list(SCHEMES))
@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(SHAPES, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
)
def test_encode_decode_within_bound(scheme: str, shapes: list, seed: int, scale: float) -> None:
    ts = {f"t{i}": sample(tuple(s), seed + i, scale) for i, s in enumerate(shapes)}
    p = encode(ts, scheme)
    wire = Payload.from_header_bytes(p.header_bytes(), p.body)
    assert wire.header == p.header
    out = decode(wire, [TensorSpec.of(n, t) for n, t in ts.items()])
    assert list(out) == list(ts)
    for name, t in ts.items():
        assert out[name].dtype == torch.float32 and out[name].shape == t.shape
        err = float((out[name].double() - t.double()).abs().max()) if t.numel() else 0.0
        assert err <= SCHEMES[scheme].error_bound(t.reshape(-1)), name


def test_fp32_payload_is_bit_exact_and_keeps_source_dtype() -> None:
    ts = {"w": sample((5, 33)), "h": sample((40,)).to(torch.bfloat16)}
    p = encode(ts, "fp32")
    assert [t["dtype"] for t in p.header["tensors"]] == ["float32", "bfloat16"]
    out = decode(p, [TensorSpec("w", (5, 33), "float32"), TensorSpec("h", (40,), "bfloat16")])
    assert torch.equal(out["w"], ts["w"]) and torch.equal(out["h"], ts["h"].float())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_encoding_is_deterministic(scheme: str) -> None:
    ts = {"a": sample((64, 50), 3), "b": sample((300,), 4)}
    p1, p2 = encode(ts, scheme), encode({k: v.clone() for k, v in ts.items()}, scheme)
    assert p1.body == p2.body and p1.header_bytes() == p2.header_bytes()
    assert payload_nbytes(p1) == len(p1.header_bytes()) + len(p1.body)


def test_encode_rejects_bad_inputs() -> None:
    with pytest.raises(CodecError, match="'w' has 1 non-finite"):
        encode({"w": torch.tensor([1.0, float("nan")])}, "fp32")
    with pytest.raises(CodecError, match="'i' must be a torch tensor"):
        encode({"i": torch.arange(3)}, "int8-block")
    with pytest.raises(CodecError, match="unknown quantization scheme"):
        encode({"w": sample((3,))}, "int16")


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("scheme", ["int8-block", "int2-block"])
def test_error_feedback_sum_tracks_t_times_delta(scheme: str) -> None:
    """Σ ŷ_t = T·Δ − e_T: the gap is one round's error, the same at T=10 and T=150."""
    delta = sample((7, 61), 5)
    ef = ErrorFeedback()
    total = torch.zeros(delta.shape, dtype=torch.float64)
    gaps = {}
    for t in range(1, 151):
        y = delta + ef.state_dict()["residuals"].get("d", torch.zeros(delta.shape))
        payload, y_hat = ef.encode({"d": delta}, scheme)
        assert torch.equal(y_hat["d"], decode(payload)["d"])  # exactly what the receiver sees
        total += y_hat["d"].double()
        if t in (10, 150):
            bound = SCHEMES[scheme].error_bound(y.reshape(-1))
            residual = ef.state_dict()["residuals"]["d"]
            assert float(residual.abs().max()) <= bound
            gaps[t] = float((total - t * delta.double()).abs().max())
            assert gaps[t] <= bound + 1e-5 * t, (t, gaps[t], bound)
    if scheme == "int2-block":  # without feedback the same sum drifts linearly
        no_ef = decode(encode({"d": delta}, scheme))["d"].double() * 150
        assert float((no_ef - 150 * delta.double()).abs().max()) > 20 * gaps[150]


def test_error_feedback_state_fragments_and_reset() -> None:
    a, b = sample((200,), 1), sample((3, 3), 2)
    ef = ErrorFeedback()
    ef.encode({"a": a, "b": b}, "int2-block")
    state = ef.state_dict()
    ef.encode({"b": b}, "int2-block")  # a fragment: a's residual stays as it was
    assert torch.equal(ef.state_dict()["residuals"]["a"], state["residuals"]["a"])
    clone = ErrorFeedback()
    clone.load_state_dict(state)
    ef.load_state_dict(state)
    assert ef.encode({"a": a}, "int4-block")[0].body == clone.encode({"a": a}, "int4-block")[0].body
    with pytest.raises(CodecError, match="'a' has shape \\(20, 10\\) but its residual has \\(200,\\)"):
        ef.encode({"a": a.reshape(20, 10)}, "int8-block")
    with pytest.raises(CodecError, match="non-finite"):
        ef.encode({"a": a, "b": torch.full((3, 3), float("inf"))}, "int8-block")
    assert torch.equal(ef.state_dict()["residuals"]["a"], clone.state_dict()["residuals"]["a"])  # no commit
    ef.reset()
    assert ef.state_dict() == {"residuals": {}}
    with pytest.raises(CodecError, match="error-feedback state"):
        ef.load_state_dict({"residuals": {"a": [1.0]}})


# ---------------------------------------------------------------- hostile payloads


def test_body_integrity() -> None:
    p = small_payload()
    flipped = bytearray(p.body)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(CodecError, match="sha256 mismatch"):
        decode(Payload(p.header, bytes(flipped)))
    with pytest.raises(
        CodecError, match=f"body is {len(p.body) - 1} bytes, header says body_len={len(p.body)}"
    ):
        decode(Payload(p.header, p.body[:-1]))


def test_expected_specs_must_match_exactly() -> None:
    p = small_payload()
    ok = [TensorSpec("w", (3, 100), "float32"), TensorSpec("b", (7,), "float32")]
    assert set(decode(p, ok)) == {"w", "b"}
    cases = [
        (
            [ok[0], TensorSpec("b", (1, 7), "float32")],
            r"tensor 'b': expected shape \(1, 7\), payload has \(7,\)",
        ),
        (
            [ok[0], TensorSpec("b", (7,), "bfloat16")],
            "tensor 'b': expected dtype bfloat16, payload has float32",
        ),
        ([ok[0]], r"unexpected tensors \['b'\]"),
        ([*ok, TensorSpec("c", (1,), "float32")], r"lacks expected tensors \['c'\]"),
    ]
    for expected, match in cases:
        with pytest.raises(CodecError, match=match):
            decode(p, expected)


def tamper(p: Payload, edit: Any) -> dict[str, Any]:
    h = copy.deepcopy(p.header)
    edit(h)
    return h


BAD_HEADERS = [
    (lambda h: h.update(raw_len=10**15), "raw_len=1000000000000000 exceeds the cap"),
    (lambda h: h.update(raw_len=-1), "raw_len must be a non-negative int"),
    (lambda h: h.update(body_len=10**12), "body_len=1000000000000 exceeds zstd's bound"),
    (lambda h: h["tensors"][0].update(shape=[10**6, 10**6]), "decoded size to 4000000000000 bytes"),
    (lambda h: h["tensors"][0].update(shape=[-3, -100]), "shape must be"),
    (lambda h: h["tensors"][0].update(shape=[1] * 40), "shape must be"),
    (lambda h: h["tensors"][0].update(shape=[4, 100]), "'scales' declares 12 bytes, 400 elements need 16"),
    (
        lambda h: h["tensors"][0]["parts"][1].update(offset=0),
        "'values' at offset 0 overlaps the previous part",
    ),
    (lambda h: h["tensors"][0]["parts"][1].update(offset=13), "'values' at offset 13 leaves a gap"),
    (lambda h: h["tensors"][1]["parts"][0].update(nbytes=-4), "nbytes must be a non-negative int"),
    (lambda h: h["tensors"][1]["parts"][1].update(dtype="float64"), "expected part 'values'"),
    (lambda h: h["tensors"][1]["parts"].pop(), "must have parts"),
    (lambda h: h["tensors"][1].update(name="w"), "'w' is empty, not a string, or repeated"),
    (lambda h: h["tensors"][1].update(dtype="int64"), "dtype 'int64' is not one of"),
    (lambda h: h.update(raw_len=h["raw_len"] + 8), "parts cover 323 bytes but raw_len=331"),
    (lambda h: h.update(raw_len=300), "ends at byte 312, past raw_len=300"),
    (lambda h: h.update(scheme="int9"), "unknown quantization scheme 'int9'"),
    (lambda h: h.update(format=True), "format must be 1"),
    (lambda h: h.update(body_sha256="XYZ"), "body_sha256 must be 64"),
    (lambda h: h.update(tensors={}), "tensors must be a list"),
    (lambda h: h.update(extra=1), "the header must be a map with keys"),
    (lambda h: h["tensors"][0].pop("parts"), r"tensors\[0\] must be a map"),
]


@pytest.mark.parametrize("edit, match", BAD_HEADERS)
def test_inconsistent_headers_are_rejected_before_allocating(edit: Any, match: str) -> None:
    p = small_payload()
    assert p.header["raw_len"] == 323  # the tampering messages below assume this layout
    h = tamper(p, edit)
    start = time.perf_counter()
    with pytest.raises(CodecError, match=match):
        decode(Payload(h, p.body))
    with pytest.raises(CodecError, match=match):
        Payload.from_header_bytes(msgpack.packb(h), p.body)
    assert time.perf_counter() - start < 0.5


def test_caps_are_overridable_and_headers_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    p = small_payload()
    with pytest.raises(CodecError, match="raw_len=323 exceeds the cap of 100 bytes"):
        decode(p, max_raw_bytes=100)
    with pytest.raises(CodecError, match="decoded size to 1200 bytes, over the cap of 1000"):
        decode(p, max_decoded_bytes=1000)
    for junk in [b"\xc1", b"\x93\x01", msgpack.packb([1, 2]) + b"tail", msgpack.packb([1, 2])]:
        with pytest.raises(CodecError, match="header"):
            Payload.from_header_bytes(junk, b"")
    monkeypatch.setattr(codec, "MAX_HEADER_BYTES", 64)
    with pytest.raises(CodecError, match="over MAX_HEADER_BYTES=64"):
        Payload.from_header_bytes(p.header_bytes(), p.body)


def test_a_long_header_travels_as_a_zstd_frame_and_a_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    ts = {f"layers.{i}.attention.wq.weight": sample((8, 8), i) for i in range(40)}
    p = encode(ts, "int8-block")
    wire = p.header_bytes()
    packed = msgpack.packb(p.header, use_bin_type=True)
    assert wire[:4] == b"\x28\xb5\x2f\xfd" and len(wire) * 4 < len(packed)
    assert Payload.from_header_bytes(wire, p.body).header == p.header
    assert Payload.from_header_bytes(packed, p.body).header == p.header  # a plain msgpack header still reads
    short = small_payload()
    assert short.header_bytes() == msgpack.packb(short.header, use_bin_type=True)  # too short to pay
    with pytest.raises(CodecError, match="header is not valid"):
        Payload.from_header_bytes(wire[:4] + b"\x00" * 20, b"")
    monkeypatch.setattr(codec, "MAX_HEADER_BYTES", 1 << 16)
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (1 << 20))  # 1 MiB of zeros in a few bytes
    with pytest.raises(CodecError, match="decompresses past MAX_HEADER_BYTES"):
        Payload.from_header_bytes(bomb, b"")


def test_headers_compress_from_many_threads_at_once() -> None:
    """One zstd compressor must not serve two threads at once (it crashed the process)."""
    ts = {f"layers.{i}.attention.wq.weight": sample((8, 8), i) for i in range(40)}
    p = encode(ts, "int8-block")
    want = p.header_bytes()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: p.header_bytes(), range(400)))
    assert all(g == want for g in got)


def test_lying_bodies_with_valid_sha_are_rejected() -> None:
    """An attacker controls header and body, so the sha proves nothing; sizes still hold."""
    p = small_payload("topk+int8")
    raw = raw_of(p)
    with pytest.raises(CodecError, match="more than raw_len=20"):
        decode(reseal(p.header, raw + b"\0" * 5000))
    with pytest.raises(CodecError, match="decompresses to 19 bytes, header says raw_len=20"):
        decode(reseal(p.header, raw[:-1]))
    garbage = b"not zstd at all"
    with pytest.raises(CodecError, match="not a valid zstd frame"):
        decode(
            Payload(
                dict(p.header, body_len=len(garbage), body_sha256=hashlib.sha256(garbage).hexdigest()),
                garbage,
            )
        )
    bad_index = bytearray(raw)
    bad_index[0:2] = np.array([299], np.uint16).tobytes()  # tensor 'w' has 300 elements; k=3
    with pytest.raises(CodecError, match="strictly increasing and < numel=300"):
        decode(reseal(p.header, bytes(bad_index)))
