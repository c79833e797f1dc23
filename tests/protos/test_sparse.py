"""The chunked top-k scheme of the sparse exchange (protos/sparse.py): what it keeps, how it packs
positions, what it refuses, and error feedback with a decaying buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.codec import CodecError, Payload, TensorSpec, decode, encode
from protos.error_feedback import ErrorFeedback
from protos.quant import get_scheme
from protos.sparse import ChunkTopK, pack, unpack

NAME = "sparse-64of4096-2bit"


def test_the_name_says_k_chunk_and_bits():
    s = get_scheme(NAME)
    assert isinstance(s, ChunkTopK) and (s.k, s.chunk, s.bits, s.index_bits) == (64, 4096, 2, 12)
    assert get_scheme(NAME) is s  # one instance per name
    assert s.bits_per_param() == pytest.approx(64 / 4096 * 14 + 32 / 4096)
    for bad, words in (("sparse-64of4000-2bit", "power of two"), ("sparse-0of4096-2bit", "k must be"),
                       ("sparse-64of4096-3bit", "value bits"), ("sparse-64-2bit", "unknown")):
        with pytest.raises(CodecError, match=words):
            get_scheme(bad)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3 * 64 + 17), k=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       levels=st.integers(2, 6))
def test_it_keeps_exactly_the_k_largest_of_every_chunk_ties_to_the_lower_position(numel, k, seed, levels):
    scheme = ChunkTopK(k, 64, 2)
    gen = torch.Generator().manual_seed(seed)
    # few distinct magnitudes: many ties
    x = (torch.randint(0, levels, (numel,), generator=gen).float() - levels / 2) * 0.5
    kept = scheme.select(x)
    want = []
    for start in range(0, numel, 64):
        a = x[start:start + 64].abs().tolist()
        share = k if len(a) == 64 else max(1, -(-k * len(a) // 64))  # a short last chunk: the same density
        order = sorted(range(len(a)), key=lambda i: (-a[i], i))[:share]  # ties: lower position first
        want += sorted(start + i for i in order)
    assert kept.tolist() == want
    assert torch.equal(scheme.select(x), kept)  # deterministic


def test_a_short_tensor_sends_at_the_same_density_as_a_long_one():
    scheme = get_scheme(NAME)  # 64 of 4,096
    assert scheme.counts(64) == [1] and scheme.counts(2048) == [32] and scheme.counts(4096 + 100) == [64, 2]
    assert scheme.kept(1) == 1 and scheme.kept(3 * 4096) == 3 * 64


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 3 * 4096 + 100), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1.0, 1e3]))
def test_round_trip_within_the_stated_bound(numel, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * scale
    payload = encode({"x": x}, NAME)
    y = decode(payload, [TensorSpec("x", (numel,), "float32")])["x"]
    assert float((y - x).abs().max()) <= get_scheme(NAME).error_bound(x)
    assert int((y != 0).sum()) <= get_scheme(NAME).kept(numel)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4095), max_size=300))
def test_twelve_bit_positions_round_trip(values):
    packed = pack(np.array(values, dtype=np.int64), 12)
    assert packed.size == -(-len(values) * 12 // 8)
    assert unpack(packed, 12, len(values)).tolist() == values


def crafted(positions: list[int], numel: int = 4096) -> Payload:
    """A well-formed sparse payload of one tensor whose chunk names ``positions``."""
    scheme = get_scheme("sparse-4of4096-2bit")
    payload = encode({"x": torch.zeros(numel)}, scheme.name)
    raw = bytearray(payload.body)
    t = payload.header["tensors"][0]
    parts = {p["key"]: p for p in t["parts"]}
    packed = pack(np.array(positions), 12).tobytes()
    body_at = len(raw) - payload.header["raw_len"]  # a frame of stored blocks: raw bytes at the end
    raw[body_at + parts["indices"]["offset"]:body_at + parts["indices"]["offset"] + len(packed)] = packed
    import hashlib

    body = bytes(raw)
    return Payload(dict(payload.header, body_sha256=hashlib.sha256(body).hexdigest()), body)


def test_a_repeated_or_out_of_range_position_is_refused_naming_it():
    spec = [TensorSpec("x", (4096,), "float32")]
    assert decode(crafted([1, 5, 9, 4095]), spec)["x"].shape == (4096,)
    with pytest.raises(CodecError, match="strictly increase; position 5 follows 5"):
        decode(crafted([1, 5, 5, 9]), spec)
    with pytest.raises(CodecError, match="strictly increase; position 2 follows 9"):
        decode(crafted([1, 9, 2, 30]), spec)
    short = [TensorSpec("x", (3000,), "float32")]  # 3 of its values kept, as ⌈4·3000/4096⌉
    with pytest.raises(CodecError, match="position 3000, past its 3000 values"):
        decode(crafted([1, 2, 3000], numel=3000), short)
    with pytest.raises(CodecError, match="cannot pack"):
        pack(np.array([4096]), 12)


@pytest.mark.parametrize("beta", [1.0, 0.95, 0.5])
def test_with_decay_the_decayed_sum_sent_tracks_the_decayed_sum_meant(beta):
    """Σ β^(T−t) ŷ_t = Σ β^(T−t) Δ_t − e_T exactly (up to fp32 rounding), and for β < 1,
    ‖e_T‖∞ ≤ max_t ‖Δ_t‖∞ / (1 − β) whatever the top-k dropped."""
    gen = torch.Generator().manual_seed(3)
    ef = ErrorFeedback(decay=beta)
    meant = sent = torch.zeros(9000, dtype=torch.float64)
    biggest = 0.0
    for _ in range(30):
        delta = torch.randn(9000, generator=gen) * 1e-2
        biggest = max(biggest, float(delta.abs().max()))
        _, y_hat = ef.encode({"w": delta}, NAME)
        meant = beta * meant + delta.double()
        sent = beta * sent + y_hat["w"].double()
    residual = ef.state_dict()["residuals"]["w"].double()
    torch.testing.assert_close(sent + residual, meant, rtol=0, atol=1e-5)
    if beta < 1:
        assert float(residual.abs().max()) <= biggest / (1 - beta)
