"""FP8 linear layers: `torch._scaled_mm` on CPU, FP8Linear against an fp32 linear within the
formats' rounding, the conversion's reach, and tiny-preset training with ``model.fp8=true``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archipelago import config as cfglib
from island.model import ModelConfig, build_model
from island.train import Trainer, TrainJobConfig
from kernels.fp8 import FP8Linear, convert_to_fp8
from kernels.fp8_cast import fp8_cast_reference
from tests.conftest import SMALL


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rowwise", [False, True])
def test_scaled_mm_runs_on_cpu_with_tensor_and_row_scales(rowwise: bool):
    """torch 2.13's CPU `_scaled_mm` (e4m3 × e4m3 and the backward's e5m2 × e4m3): no fallback."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 72, generator=g), torch.randn(40, 72, generator=g)
    a8, sa = fp8_cast_reference(a, rowwise=rowwise)
    b8, sb = fp8_cast_reference(b, rowwise=rowwise)
    out = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.t() if rowwise else sb, out_dtype=torch.float32)
    assert torch.allclose(out, (a8.float() * sa) @ (b8.float() * sb).t(), rtol=1e-5, atol=1e-5)
    g8, sg = fp8_cast_reference(a, torch.float8_e5m2)
    assert torch._scaled_mm(g8, b8.t(), scale_a=sg, scale_b=sb.amax(), out_dtype=torch.float32).shape == (33, 40)


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_linear_matches_fp32_within_fp8_rounding(scaling: str):
    """e4m3 rounds each input to ±2^-4 relative, e5m2 gradients to ±2^-3; over a dot product the
    errors average to their rms: output within 5%, gradients within 8% (relative Frobenius norm;
    measured ~3.6% and ~6% over seeds)."""
    torch.manual_seed(0)
    ref = nn.Linear(72, 40)
    fp8 = FP8Linear.from_linear(ref, scaling=scaling)
    assert fp8.weight is ref.weight and fp8.weight.dtype == torch.float32
    x = torch.randn(3, 11, 72)
    dy = torch.randn(3, 11, 40)
    results = []
    for layer in (fp8, ref):
        xr = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xr)
        y.backward(dy)
        results.append((y.detach(), xr.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    (y8, dx8, dw8, db8), (y, dx, dw, db) = results
    assert y8.shape == y.shape and y8.dtype == torch.float32
    assert _rel(y8, y) < 0.05
    assert _rel(dx8, dx) < 0.08 and _rel(dw8, dw) < 0.08
    assert torch.equal(db8, db), "the bias is added in high precision"


def test_conversion_covers_block_linears_but_not_router_embeddings_or_head():
    cfg = ModelConfig(dim=64, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4, moe_ffn_dim=32,
                      num_shared_experts=1, tie_embeddings=False)
    model = build_model(cfg, seed=0)
    names = {n for n, _ in model.named_parameters()}
    convert_to_fp8(model)
    assert {n for n, _ in model.named_parameters()} == names, "parameter names are unchanged"
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert plain == {"layers.0.mlp.gate", "layers.1.mlp.gate", "lm_head"}
    assert "layers.1.mlp.experts.3.down_proj" in fp8 and "layers.0.mlp.shared_experts.up_proj" in fp8
    assert len(fp8) == 2 * (4 + 3 * 5)  # per layer: q, k, v, o and 3 per expert (4 + 1 shared)


def test_fp8_model_forward_is_close_to_fp32():
    """Same seed, same weights: logits within 5% (relative norm) and the loss within 1% of fp32."""
    cfg = ModelConfig(vocab_size=512, dim=64, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=128)
    m32, m8 = build_model(cfg, seed=3), build_model(ModelConfig(**{**cfg.__dict__, "fp8": True}), seed=3)
    tokens = torch.randint(512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l32, l8 = m32(tokens), m8(tokens)
        assert _rel(l8, l32) < 0.05
        assert m8.loss(tokens, tokens) == pytest.approx(float(m32.loss(tokens, tokens)), rel=0.01)


@pytest.mark.slow  # ~10 s alone, plus the session's one-off corpus preparation (~30 s)
def test_tiny_preset_trains_with_fp8(data_cache):
    """`archipelago train --preset tiny --set model.fp8=true`, shrunk: the loss falls, and tracks
    the fp32 run's within 3% step for step."""
    losses = {}
    for fp8 in (False, True):
        job = cfglib.load(TrainJobConfig, "tiny", SMALL + [f"data.cache_dir={data_cache}",
                                                           f"model.fp8={str(fp8).lower()}"])
        trainer = Trainer(job, total_steps=10)
        assert any(isinstance(m, FP8Linear) for m in trainer.model.modules()) == fp8
        losses[fp8] = [trainer.train_step().loss for _ in range(10)]
    assert sum(losses[True][-3:]) / 3 < sum(losses[True][:3]) / 3 - 0.3  # nats, from ~8.3
    for a, b in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, rel=0.03)
