"""Quantization schemes: stated error bounds hold, layouts match, packing and top-k are exact."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archipelago.errors import UserError
from protos import codec_kernels, quant
from protos.quant import (
    SCHEMES,
    CodecError,
    Int2Block,
    Int4Block,
    Int8Block,
    Scheme,
    TopKInt8,
    get_scheme,
)
from tests.protos.reference_codec import pack_bits, unpack_bits

SPECIAL_SHAPES = [(0,), (1,), (), (127,), (128,), (129,), (2, 200), (3000,), (0, 7)]
MAGNITUDES = [1e-40, 1e-20, 1e-3, 1.0, 1e3, 1e20, 1e36]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Finite fp32 tensors of ≤3375 elements: normal, zero, log-uniform, spiky or constant."""
    shape = draw(st.one_of(st.sampled_from(SPECIAL_SHAPES), st.lists(st.integers(0, 15), max_size=3)))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "zeros", "loguniform", "spike", "const"]))
    mag = draw(st.sampled_from(MAGNITUDES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        x = torch.randn(n, generator=g) * mag
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind == "loguniform":  # mixed magnitudes across and within blocks
        x = torch.sign(torch.randn(n, generator=g)) * 10 ** (torch.rand(n, generator=g) * 60 - 30)
    elif kind == "spike":
        x = torch.randn(n, generator=g) * mag * 1e-6
        if n:
            x[torch.randint(n, (1,), generator=g)] = mag
    else:
        x = torch.full((n,), -mag)
    return x.to(torch.float32).reshape(shape)


def roundtrip(scheme: Scheme, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return scheme.dequantize(scheme.quantize(flat), flat.numel())


def max_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.reshape(-1).double() - y.reshape(-1).double()).abs().max()) if x.numel() else 0.0


@pytest.mark.parametrize("name", list(SCHEMES))
@settings(max_examples=60, deadline=None)
@given(x=tensors())
def test_roundtrip_within_stated_bound(name: str, x: torch.Tensor) -> None:
    scheme = SCHEMES[name]
    y = roundtrip(scheme, x)
    assert y.dtype == torch.float32 and y.shape == (x.numel(),)
    assert torch.isfinite(y).all()
    assert max_err(x, y) <= scheme.error_bound(x.reshape(-1))


@pytest.mark.parametrize("name", list(SCHEMES))
@settings(max_examples=20, deadline=None)
@given(x=tensors())
def test_parts_match_layout_and_are_deterministic(name: str, x: torch.Tensor) -> None:
    """The codec validates headers against `layout`, so quantize must produce exactly it."""
    scheme = SCHEMES[name]
    flat = x.reshape(-1)
    parts = scheme.quantize(flat)
    layout = scheme.layout(flat.numel())
    assert list(parts) == list(layout)
    for key, spec in layout.items():
        assert parts[key].dtype.name in spec.dtypes and parts[key].shape == (spec.count,), key
    again = scheme.quantize(flat.clone())
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


@settings(max_examples=30, deadline=None)
@given(x=tensors())
def test_fp32_is_bit_exact(x: torch.Tensor) -> None:
    y = roundtrip(SCHEMES["fp32"], x)
    assert torch.equal(y.view(torch.int32), x.reshape(-1).view(torch.int32))


def test_bf16_matches_torch_round_to_nearest_even() -> None:
    x = torch.randn(1000) * 1e3
    assert torch.equal(roundtrip(SCHEMES["bf16"], x), x.to(torch.bfloat16).float())


def test_bounds_are_not_vacuous() -> None:
    """Bounds should be close to the observed error on ordinary data, not just true."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for name in ["int8-block", "int4-block", "int2-block", "fp8-block", "bf16"]:
        scheme = SCHEMES[name]
        err, bound = max_err(x, roundtrip(scheme, x)), scheme.error_bound(x)
        assert 0.2 * bound < err <= bound, name


def test_zero_block_next_to_large_block_has_no_nan() -> None:
    x = torch.zeros(300)
    x[200] = 1e6  # fp16 scales would overflow at 1e6/127; ours are fp32
    for name in ["int8-block", "int4-block", "int2-block", "fp8-block"]:
        y = roundtrip(SCHEMES[name], x)
        assert torch.isfinite(y).all() and torch.equal(y[:128], torch.zeros(128)), name
        assert y[200] == pytest.approx(1e6, rel=1e-6), name


def test_block_size_is_configurable() -> None:
    scheme = Int8Block(block=32)
    x = torch.randn(100)
    parts = scheme.quantize(x)
    assert parts["scales"].shape == (4,)
    assert max_err(x, scheme.dequantize(parts, 100)) <= scheme.error_bound(x)


@pytest.mark.parametrize("bits, lo, hi", [(4, -8, 7), (2, -2, 1)])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_pack_unpack_exact(bits: int, lo: int, hi: int, data: st.DataObject) -> None:
    q = np.array(data.draw(st.lists(st.integers(lo, hi), max_size=300)), dtype=np.int8)
    packed = pack_bits(q, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-q.size * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, q.size), q)


def test_pack_layout_is_little_endian_within_byte() -> None:
    assert pack_bits(np.array([1, -1], dtype=np.int8), 4).tolist() == [0xF1]
    assert pack_bits(np.array([1, -1, 0, 1, -1], dtype=np.int8), 2).tolist() == [0b01001101, 0b11]
    # The codec's own kernels pack the same way (scale 1: the levels are the values).
    assert Int4Block().quantize(torch.tensor([1.0, -1.0, 7.0]))["values"].tolist() == [0xF1, 0x07]
    assert Int2Block().quantize(torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]))["values"].tolist() == [0b01001101, 0b11]


@pytest.mark.parametrize("name, qmax", [("int4-block", 7), ("int2-block", 1)])
def test_packed_levels_roundtrip_exactly(name: str, qmax: int) -> None:
    """Values that sit exactly on the levels (scale 1) come back bit-exact."""
    levels = torch.arange(-qmax, qmax + 1, dtype=torch.float32)
    x = levels.repeat(100)[:261]
    x[0] = qmax  # every block has absmax == qmax, so scale == 1
    x[128] = x[256] = -qmax
    assert torch.equal(roundtrip(SCHEMES[name], x), x)


@settings(max_examples=40, deadline=None)
@given(x=tensors(), density=st.sampled_from([0.001, 0.01, 0.3, 1.0]))
def test_topk_keeps_exactly_the_k_largest(x: torch.Tensor, density: float) -> None:
    scheme = TopKInt8(density)
    flat = x.reshape(-1)
    n = flat.numel()
    idx = np.cumsum(scheme.quantize(flat)["indices"].astype(np.int64))
    assert idx.size == scheme.k(n) == min(n, math.ceil(density * n))
    assert np.all(np.diff(idx) > 0)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.from_numpy(idx)] = True
    if 0 < idx.size < n:
        assert flat[kept].abs().min() >= flat[~kept].abs().max()
    assert max_err(flat, roundtrip(scheme, flat)) <= scheme.error_bound(flat)


def test_topk_ties_go_to_lower_index_and_wide_deltas_use_uint32() -> None:
    scheme = TopKInt8(0.01)
    parts = scheme.quantize(torch.ones(1000))
    assert np.cumsum(parts["indices"].astype(np.int64)).tolist() == list(range(10))
    x = torch.zeros(200_000)
    x[7], x[150_007] = -3.0, 2.0
    parts = TopKInt8(1e-5).quantize(x)
    assert parts["indices"].dtype == np.uint32 and parts["indices"].tolist() == [7, 150_000]
    y = TopKInt8(1e-5).dequantize(parts, x.numel())
    assert y[7] == -3.0 and y[150_007] == pytest.approx(2.0, rel=0.01) and int((y != 0).sum()) == 2


@pytest.mark.parametrize("deltas", [[0, 5, 2000], [3, 0, 1]])
def test_topk_rejects_bad_indices(deltas: list[int]) -> None:
    parts = {
        "indices": np.array(deltas, np.uint16),
        "values": np.ones(3, np.int8),
        "scale": np.ones(1, np.float32),
    }
    with pytest.raises(CodecError, match="strictly increasing and < numel=300"):
        TopKInt8(0.01).dequantize(parts, 300)


def test_unknown_scheme_lists_known_names() -> None:
    with pytest.raises(CodecError, match="unknown quantization scheme 'int3'.*int8-block.*topk\\+int8"):
        get_scheme("int3")
    assert issubclass(CodecError, UserError) and issubclass(CodecError, ValueError)
    assert set(SCHEMES) == {
        "fp32",
        "bf16",
        "int8-block",
        "fp8-block",
        "int4-block",
        "int2-block",
        "topk+int8",
    }


# ---------------------------------------------------------------- kernels: compiled or eager


def _big(scheme: Scheme) -> torch.Tensor:
    return torch.randn(4 * scheme.block * 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def compile_small(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every kernel call is large enough to compile; torch.compile is whatever the test makes it."""
    monkeypatch.setattr(codec_kernels, "COMPILE_MIN_NUMEL", 0)
    return monkeypatch


def _counting_compile(calls: list[str]):
    def fake_compile(fn, **kwargs):  # an "exact compiler": the eager function, counted
        def compiled(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return compiled
    return fake_compile


def test_kernels_compile_together_once_check_and_then_run_compiled(compile_small: pytest.MonkeyPatch) -> None:
    compile_small.setenv(quant.COMPILE_ENV, "1")
    calls: list[str] = []
    compile_small.setattr(torch, "compile", _counting_compile(calls))
    scheme = Int4Block()
    x = _big(scheme)
    want = SCHEMES["int4-block"].quantize(x)
    got = scheme.quantize(x)  # compiles all three kernels, the other two on inputs of their own
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert [k.state for k in scheme.kernels()] == ["ready"] * 3
    assert all(k.compile_s is not None for k in scheme.kernels())
    assert sorted(set(calls)) == ["_dequantize_kernel", "_feedback_kernel", "_quantize_kernel"]
    before = len(calls)
    again = scheme.quantize(x)
    assert calls[before:] == ["_quantize_kernel"] and all(np.array_equal(again[k], want[k]) for k in want)


def test_auto_compiles_only_for_error_feedback_on_the_main_thread(compile_small: pytest.MonkeyPatch) -> None:
    """torch.compile restores process-wide state (the RNGs) when it is done: from a second thread
    it would move the main thread's random draws; and a serving process should not stall on it."""
    from protos.codec import decode, encode
    from protos.error_feedback import ErrorFeedback

    compile_small.setenv(quant.COMPILE_ENV, "auto")
    calls: list[str] = []
    compile_small.setattr(torch, "compile", _counting_compile(calls))
    scheme = Int8Block()
    compile_small.setitem(SCHEMES, "int8-block", scheme)
    delta = {"d": _big(scheme)}
    decode(encode(delta, "int8-block"))  # plain encode and decode: never compile
    worker = threading.Thread(target=lambda: ErrorFeedback().encode(delta, "int8-block"))
    worker.start()
    worker.join()  # error feedback off the main thread: neither
    assert [k.state for k in scheme.kernels()] == ["eager"] * 3 and not calls
    ErrorFeedback().encode(delta, "int8-block")  # on the main thread (pytest's): compiles them all
    assert [k.state for k in scheme.kernels()] == ["ready"] * 3


def test_a_compile_leaves_the_rng_where_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes compiling from the main thread safe for training's random draws."""
    monkeypatch.setenv(quant.COMPILE_ENV, "1")
    monkeypatch.setattr(codec_kernels, "COMPILE_MIN_NUMEL", 0)
    scheme = Int2Block()
    torch.manual_seed(7)
    want = torch.rand(5)
    torch.manual_seed(7)
    scheme.quantize(_big(scheme))  # a real torch.compile of the three kernels
    assert torch.equal(torch.rand(5), want)


@pytest.mark.parametrize("broken", ["raises", "differs"])
def test_kernel_stays_eager_when_compiling_fails_or_differs(compile_small: pytest.MonkeyPatch, broken: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    compile_small.setenv(quant.COMPILE_ENV, "1")

    def fake_compile(fn, **kwargs):
        if broken == "raises":
            raise RuntimeError("no C++ compiler\nsecond line")
        return lambda *args: tuple(t + 1 if t.is_floating_point() else t for t in fn(*args))

    compile_small.setattr(torch, "compile", fake_compile)
    scheme, x = Int8Block(), _big(Int8Block())
    y = x.clone().view(-1, scheme.block)
    codes, scales = scheme.kernel("feedback")(y)  # the in-place kernel: a failed check must not touch y
    k = scheme.kernel("feedback")
    assert k.state == "failed" and k.compiled is None
    assert k.error == ("RuntimeError: no C++ compiler" if broken == "raises" else
                       "RuntimeError: compiled result differs from eager")
    assert "stays eager" in caplog.text
    want_codes, want_scales = SCHEMES["int8-block"].kernel("feedback").fn(ref_y := x.clone().view(-1, scheme.block))
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales) and torch.equal(y, ref_y)


def test_kernel_mode_0_never_compiles_and_bad_modes_are_refused(compile_small: pytest.MonkeyPatch) -> None:
    compile_small.setenv(quant.COMPILE_ENV, "0")
    compile_small.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled under mode 0"))
    scheme = Int2Block()
    scheme.quantize(_big(scheme))
    assert scheme.kernel("quantize").state == "eager"
    compile_small.setenv(quant.COMPILE_ENV, "sometimes")
    with pytest.raises(UserError, match="ARCHIPELAGO_CODEC_COMPILE must be 0, 1 or auto"):
        scheme.quantize(_big(scheme))
    assert quant.COMPILE_ENV == "ARCHIPELAGO_CODEC_COMPILE"


@pytest.mark.parametrize("block", [1, 3, 32, 100, 128])
@pytest.mark.parametrize("name", ["int8-block", "int4-block", "int2-block", "fp8-block"])
def test_any_block_size_matches_the_reference(name: str, block: int) -> None:
    """Blocks that are not whole bytes of codes (int4 with odd blocks, int2 with blocks not a
    multiple of 4) take the flat packing path; all of them agree with the reference twin."""
    from tests.protos import reference_codec as ref

    ours, theirs = type(SCHEMES[name])(block), type(ref.SCHEMES[name])(block)
    for n in [0, 1, block, 3 * block + 1, 1000]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 10.0 ** (n % 7 - 3)
        got, want = ours.quantize(x), theirs.quantize(x)
        assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want), n
        assert torch.equal(ours.dequantize(got, n).view(torch.int32), theirs.dequantize(want, n).view(torch.int32))
