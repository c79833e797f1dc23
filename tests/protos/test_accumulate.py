"""The merge's weighted sum: a payload added straight from its bytes is bit for bit its decoded
values added (for every scheme, eager and compiled), whatever order its tensors come in."""

from __future__ import annotations

import pytest
import torch

from protos import codec_kernels
from protos.accumulate import WeightedSum
from protos.codec import CodecError, Payload, TensorSpec, decode, encode
from protos.quant import SCHEMES

SHAPES = {"a": (37, 101), "b": (1000,), "c": (129,), "d": (3, 5, 7), "e": (64,)}
SPECS = [TensorSpec(n, s, "float32") for n, s in SHAPES.items()]


def tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * scale for n, s in SHAPES.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_adding_a_payload_is_adding_its_decoded_values(scheme):
    fused, reference = WeightedSum(SPECS), WeightedSum(SPECS)
    for k, w in enumerate([3.0, 1.7, 51200.0, 0.3]):
        payload = encode(tensors(k, 10.0 ** (k - 3)), scheme)
        fused.add(payload, w)
        reference.add_tensors(decode(payload, SPECS), w)
    assert fused.count == reference.count == 4 and fused.weight == reference.weight == 3.0 + 1.7 + 51200.0 + 0.3
    assert torch.equal(bits(fused.flat), bits(reference.flat))
    mean = fused.mean()
    for spec in SPECS:
        assert mean[spec.name].shape == spec.shape
        assert torch.equal(bits(mean[spec.name]), bits(reference.tensors[spec.name] / reference.weight))


@pytest.mark.parametrize("scheme", ["int8-block", "int4-block", "int2-block", "fp8-block"])
def test_the_compiled_accumulate_kernel_gives_the_same_bits(monkeypatch, scheme):
    monkeypatch.setenv(codec_kernels.COMPILE_ENV, "1")
    big = [TensorSpec("w", (300, 1024), "float32"), TensorSpec("v", (777,), "float32")]
    gen = torch.Generator().manual_seed(1)
    payloads = [encode({s.name: torch.randn(s.shape, generator=gen) * 1e-2 for s in big}, scheme) for _ in range(3)]
    fused, reference = WeightedSum(big), WeightedSum(big)
    for payload, w in zip(payloads, [1024.0, 512.0, 7.5], strict=True):
        fused.add(payload, w)
        reference.add_tensors(decode(payload, big), w)
    kernel = SCHEMES[scheme].kernel("accumulate")
    assert kernel.state == "ready", kernel.error
    assert torch.equal(bits(fused.flat), bits(reference.flat))


def test_tensors_in_another_order_than_the_specs_land_where_their_names_say():
    values = tensors(0, 1e-2)
    shuffled = encode({n: values[n] for n in reversed(SHAPES)}, "int8-block")
    ordered = encode(values, "int8-block")
    a, b = WeightedSum(SPECS), WeightedSum(SPECS)
    a.add(shuffled, 2.0)
    b.add(ordered, 2.0)
    assert torch.equal(bits(a.flat), bits(b.flat))


def test_a_payload_that_does_not_fit_is_refused_and_adds_nothing():
    total = WeightedSum(SPECS)
    wrong = encode({"a": torch.zeros(5)}, "int8-block")
    with pytest.raises(CodecError, match="lacks expected tensors"):
        total.add(wrong, 1.0)
    payload = encode(tensors(0, 1.0), "int8-block")
    corrupt = Payload(payload.header, payload.body[:-1] + bytes([payload.body[-1] ^ 1]))
    with pytest.raises(CodecError, match="sha256"):
        total.add(corrupt, 1.0)
    assert total.count == 0 and total.weight == 0 and not total.flat.any()


def test_the_mean_is_the_weighted_mean_to_a_few_ulps():
    values = [tensors(k, 1e-3) for k in range(5)]
    weights = [51200.0, 51200.0, 25600.0, 1024.0, 3.5]
    total = WeightedSum(SPECS)
    for v, w in zip(values, weights, strict=True):
        total.add(encode(v, "fp32"), w)
    mean = total.mean()
    for spec in SPECS:
        terms = [v[spec.name].double() * w / sum(weights) for v, w in zip(values, weights, strict=True)]
        exact, size = sum(terms), sum(t.abs() for t in terms)  # rounding scales with the terms, not the sum
        assert ((mean[spec.name].double() - exact).abs() <= 8 * 2.0**-24 * size).all()
