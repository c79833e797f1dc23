"""The fused codec is the reference, bit for bit: payload bytes, decoded values, EF residuals.

`reference_codec` is the codec as it was before the fused kernels.  Every scheme, eager and
(slow) torch.compile'd kernels, random tensors of random shapes: sizes that are not a multiple
of the block, empty and 0-d tensors, zeros and negative zeros, subnormals, values near the fp32
limit, exact rounding ties, and source dtypes other than fp32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import codec, codec_kernels, quant, zstd_frames
from protos.codec import decode, encode
from protos.error_feedback import ErrorFeedback
from protos.quant import SCHEMES
from tests.protos import reference_codec as ref

BLOCK_SCHEMES = ["int8-block", "int4-block", "int2-block", "fp8-block"]
KINDS = ["normal", "zeros", "negzeros", "loguniform", "subnormal", "huge", "spike", "ties", "const"]


def make(kind: str, n: int, seed: int, mag: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g) * mag
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "negzeros":  # -0.0, some +0.0
        return torch.where(torch.rand(n, generator=g) < 0.8, -0.0, 0.0)
    if kind == "loguniform":  # 1e-45 .. 1e38 mixed within blocks, subnormals included
        return torch.sign(torch.randn(n, generator=g)) * 10 ** (torch.rand(n, generator=g) * 83 - 45)
    if kind == "subnormal":
        x = torch.randint(0, 1 << 23, (n,), generator=g).to(torch.int32).view(torch.float32)
        return x * torch.sign(torch.randn(n, generator=g))
    if kind == "huge":  # up to 3.4e38, next to fp32's limit: ŷ and the residual may overflow
        return (torch.rand(n, generator=g, dtype=torch.float64) * 6.8e38 - 3.4e38).float()
    if kind == "spike":
        x = torch.randn(n, generator=g) * mag * 1e-6
        if n:
            x[torch.randint(n, (1,), generator=g)] = -mag
        return x
    if kind == "ties":  # halves: with block absmax = qmax (scale 1) they are exact ties
        x = torch.randint(-254, 255, (n,), generator=g).float() / 2
        x[::128] = 127.0
        return x * torch.tensor([1.0, 7 / 127, 1 / 127])[torch.randint(3, (1,), generator=g)]
    return torch.full((n,), -mag)


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(draw(st.integers(0, 4))):
        shape = draw(st.one_of(
            st.sampled_from([(0,), (), (1,), (127,), (128,), (129,), (3, 85), (2, 0, 3), (1000,)]),
            st.lists(st.integers(0, 40), max_size=3),
        ))
        x = make(draw(st.sampled_from(KINDS)), math.prod(shape), draw(st.integers(0, 2**31 - 1)),
                 draw(st.sampled_from([1e-38, 1e-3, 1.0, 1e20, 1e36])))
        dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.bfloat16, torch.float16, torch.float64]))
        if dtype is torch.float16:
            x = x.clamp(-6e4, 6e4)
        elif dtype is torch.bfloat16:
            x = x.clamp(-3.3e38, 3.3e38)
        out[f"t{i}"] = x.reshape(shape).to(dtype)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_same_values(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name


def assert_same_payload(p: codec.Payload, want: codec.Payload, raw: bytes, zstd: bool) -> None:
    if zstd:  # level 3, as today: the very same bytes
        assert p.header == want.header and p.body == want.body
    else:  # stored blocks: same raw body, same header but for the body's length and digest
        keep = {k: v for k, v in p.header.items() if k not in ("body_len", "body_sha256")}
        assert keep == want.header
        assert zstandard.ZstdDecompressor().decompress(p.body) == raw


def check_encode_decode(ts: dict[str, torch.Tensor], scheme: str, zstd: bool) -> None:
    want, raw, layout = ref.quantize_payload(ts, scheme, zstd_level=3 if zstd else None)
    p = encode(ts, scheme, zstd=zstd)
    assert_same_payload(p, want, raw, zstd)
    assert_same_values(decode(p), ref.reconstruct(scheme, layout, raw))


def check_error_feedback(rounds: list[dict[str, torch.Tensor]], scheme: str, zstd: bool) -> None:
    ours, theirs = ErrorFeedback(), ref.ErrorFeedback()
    for deltas in rounds:
        try:
            want, raw, want_y_hat = theirs.encode(deltas, scheme, 3 if zstd else None)
        except codec.CodecError as e:  # Δ + e overflowed (values near fp32's limit): same refusal
            before = ours.state_dict()
            with pytest.raises(codec.CodecError) as got:
                ours.encode(deltas, scheme, zstd=zstd)
            assert str(got.value) == str(e)
            assert_same_values(ours.state_dict()["residuals"], before["residuals"])
            return
        p, y_hat = ours.encode(deltas, scheme, zstd=zstd)
        assert_same_payload(p, want, raw, zstd)
        assert_same_values(y_hat, want_y_hat)
        assert_same_values(ours.state_dict()["residuals"], theirs.residuals)
        assert_same_values(decode(p), want_y_hat)


def rounds_of(ts: dict[str, torch.Tensor], seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    """Three rounds of deltas with ``ts``'s names, shapes and dtypes (the residual carries over)."""
    out = [ts]
    for seed in seeds:
        out.append({n: (t.float() * 0.5 + make("normal", t.numel(), seed, 1e-3).reshape(t.shape)).to(t.dtype)
                    for n, t in ts.items()})
    return out


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("scheme", list(SCHEMES))
@PROPERTY
@given(ts=tensor_sets(), zstd=st.booleans())
def test_encode_decode_match_reference(scheme: str, ts: dict[str, torch.Tensor], zstd: bool) -> None:
    check_encode_decode(ts, scheme, zstd)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@PROPERTY
@given(ts=tensor_sets(), seeds=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2), zstd=st.booleans())
def test_error_feedback_matches_reference(scheme: str, ts: dict[str, torch.Tensor], seeds: list[int],
                                          zstd: bool) -> None:
    check_error_feedback(rounds_of(ts, seeds), scheme, zstd)


def test_default_zstd_per_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int block schemes go as stored blocks by default; the others are compressed at level 3."""
    ts = {"w": make("normal", 3000, 1, 1.0).reshape(30, 100)}
    for scheme in SCHEMES:
        want, raw, _ = ref.quantize_payload(ts, scheme, zstd_level=3)
        zstd = scheme not in ("int8-block", "int4-block", "int2-block")
        assert zstd_frames.zstd_enabled(SCHEMES[scheme]) is zstd
        p = encode(ts, scheme)
        assert (p.body == want.body) is zstd
        assert zstandard.ZstdDecompressor().decompress(p.body) == raw
    monkeypatch.setenv(zstd_frames.ZSTD_ENV, "int8-block=1, fp8-block=0")
    assert zstd_frames.zstd_enabled(SCHEMES["int8-block"]) and not zstd_frames.zstd_enabled(SCHEMES["fp8-block"])
    assert encode(ts, "int8-block").body == ref.quantize_payload(ts, "int8-block")[0].body
    monkeypatch.setenv(zstd_frames.ZSTD_ENV, "int8-block=yes")
    with pytest.raises(codec.CodecError, match="int8-block=0 or int8-block=1"):
        encode(ts, "int8-block")


@pytest.mark.parametrize("n", [0, 1, (128 << 10) - 1, 128 << 10, (128 << 10) * 2 + 5])
def test_stored_frame_is_a_zstd_frame(n: int) -> None:
    raw = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    frame = zstd_frames.stored_frame([raw[: n // 3], memoryview(raw)[n // 3 : n // 2], np.frombuffer(raw[n // 2 :], np.uint8)])
    assert zstandard.frame_content_size(frame) == n
    assert zstandard.ZstdDecompressor().decompress(frame) == raw
    assert zstd_frames.decompress(frame, n) == raw
    assert len(frame) <= zstd_frames.zstd_bound(n)


def test_large_payload_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the compile threshold (eager here), several tensors: the island's and the bench's path."""
    monkeypatch.setenv(quant.COMPILE_ENV, "0")
    n = codec_kernels.COMPILE_MIN_NUMEL // 7 + 11
    ts = {"a": make("normal", 7 * n, 1, 1e-3).reshape(n, 7), "b": make("loguniform", 3001, 2, 1.0),
          "c": make("negzeros", 130, 3, 1.0)}
    for scheme in BLOCK_SCHEMES:
        check_encode_decode(ts, scheme, zstd=scheme == "int4-block")
        check_error_feedback(rounds_of(ts, [4, 5]), scheme, zstd=False)


# ---------------------------------------------------------------- compiled kernels


@pytest.fixture(scope="module")
def compiled_kernels():
    """Every block scheme's kernels compiled (synchronously, at any size) for this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv(quant.COMPILE_ENV, "1")
    mp.setattr(codec_kernels, "COMPILE_MIN_NUMEL", 0)
    yield
    mp.undo()
    for scheme in BLOCK_SCHEMES:
        SCHEMES[scheme]._kernels.clear()


def assert_compiled(scheme: str) -> None:
    s = SCHEMES[scheme]
    for kind in ("quantize", "feedback", "dequantize"):
        k = s.kernel(kind)
        want = "never" if kind in s.eager_only else "ready"
        assert k.state == want, (k.name, k.state, k.error)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", BLOCK_SCHEMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ts=tensor_sets(), seeds=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2), zstd=st.booleans())
def test_compiled_kernels_match_reference(compiled_kernels, scheme: str, ts: dict[str, torch.Tensor],
                                          seeds: list[int], zstd: bool) -> None:
    check_encode_decode(ts, scheme, zstd)
    check_error_feedback(rounds_of(ts, seeds), scheme, zstd)
    if ts and any(t.numel() for t in ts.values()):
        assert_compiled(scheme)


@pytest.mark.slow
def test_compiled_kernels_on_every_kind(compiled_kernels) -> None:
    """Each hard case, deterministically, in one batch with a large tensor."""
    ts = {k: make(k, 5000 + i, i, 1e3).reshape(-1) for i, k in enumerate(KINDS)}
    for scheme in BLOCK_SCHEMES:
        check_encode_decode(ts, scheme, zstd=False)
        check_error_feedback(rounds_of(ts, [7, 8]), scheme, zstd=False)
        assert_compiled(scheme)


@pytest.mark.parametrize("scheme", BLOCK_SCHEMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ts=tensor_sets(), plan=st.lists(st.tuples(st.integers(0, 15), st.booleans(), st.integers(0, 2**31 - 1)),
                                         min_size=1, max_size=6))
def test_error_feedback_rounds_of_fragments_and_refusals(scheme: str, ts: dict[str, torch.Tensor],
                                                         plan: list[tuple[int, bool, int]]) -> None:
    """Rounds over changing subsets of the tensors (streaming fragments), some refused for a NaN:
    the residual buffers the fused path reuses never leak into the state."""
    ours, theirs = ErrorFeedback(), ref.ErrorFeedback()
    names = list(ts)
    for mask, poison, seed in plan:
        picked = [n for i, n in enumerate(names) if mask >> i & 1] or names
        deltas = {n: (ts[n].float() + make("normal", ts[n].numel(), seed, 1e-2).reshape(ts[n].shape)).to(ts[n].dtype)
                  for n in picked}
        if poison and (big := [n for n in picked if deltas[n].numel()]):
            deltas[big[0]].view(-1)[0] = float("nan")
        try:
            want = theirs.encode(deltas, scheme)
        except codec.CodecError as e:
            with pytest.raises(codec.CodecError, match="non-finite") as got:
                ours.encode(deltas, scheme)
            assert str(got.value) == str(e)
        else:
            p, y_hat = ours.encode(deltas, scheme, zstd=True)
            assert p.header == want[0].header and p.body == want[0].body
            assert_same_values(y_hat, want[2])
        assert_same_values(ours.state_dict()["residuals"], theirs.residuals)


@pytest.mark.parametrize("scheme", BLOCK_SCHEMES)
def test_a_refused_round_leaves_no_trace_in_the_reused_buffers(scheme: str) -> None:
    """A NaN round writes its (garbage) residual into the spare buffer, padding included; the
    rounds after it must neither see that garbage nor differ from the reference."""
    ts = {"a": make("normal", 100, 1, 1.0), "b": make("normal", 300, 2, 1.0).reshape(3, 100)}
    ours, theirs = ErrorFeedback(), ref.ErrorFeedback()
    for r in range(8):
        deltas = {n: t * (r + 1) for n, t in ts.items()}
        if r in (2, 3, 5):
            deltas["a"] = deltas["a"].clone()
            deltas["a"][r % 3] = float("nan")
            with pytest.raises(codec.CodecError, match="'a' has 1 non-finite"):
                ours.encode(deltas, scheme)
            continue
        p, _ = ours.encode(deltas, scheme, zstd=True)
        want = theirs.encode(deltas, scheme)[0]
        assert p.header == want.header and p.body == want.body, r
        assert_same_values(ours.state_dict()["residuals"], theirs.residuals)


def test_stored_blocks_are_read_in_place_only_when_exactly_ours() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    frame = zstd_frames.stored_frame([raw])
    blocks = zstd_frames.stored_blocks(frame, len(raw))
    assert blocks is not None and [b[2] for b in blocks] == [128 << 10, 128 << 10, 300_000 - (256 << 10)]
    dest = np.empty(200_000, np.uint8)
    zstd_frames.reader(None, frame, blocks)(dest, 50_000)  # across a block boundary
    assert dest.tobytes() == raw[50_000:250_000]
    compressed = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    for body, raw_len in [(frame, len(raw) + 1), (frame + b"\0", len(raw)), (frame[:-1], len(raw)),
                          (compressed, len(raw)), (b"\x28\xb5\x2f\xfd\xe0" + bytes(11), 0)]:
        assert zstd_frames.stored_blocks(body, raw_len) is None
    ts = {"w": make("normal", 70_000, 3, 1.0)}
    p = encode(ts, "int8-block")
    assert zstd_frames.stored_blocks(p.body, p.header["raw_len"]) is not None
    _, raw, layout = ref.quantize_payload(ts, "int8-block", zstd_level=None)
    assert_same_values(decode(p), ref.reconstruct("int8-block", layout, raw))
