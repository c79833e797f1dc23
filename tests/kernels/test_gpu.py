"""The Triton kernels compiled for a real GPU, against their torch twins on CPU: bit for bit
where the math allows it (quantizers, fp8 casts: the hardware's fp32→fp8 cast is exact RNE,
unlike the interpreter's), within stated rounding otherwise. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels import cross_entropy as kce
from kernels import fp8_cast as kc
from kernels import moe_permute as kp
from kernels import outer_step as ko
from kernels import quantize as kq
from kernels import rmsnorm as kr
from kernels import swiglu as ks
from kernels.fp8 import FP8Linear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", list(kq.SCHEMES))
def test_quantize_bit_exact_on_gpu(scheme: str):
    delta, resid = _randn(1_000_003) * 1e-3, _randn(1_000_003, seed=1) * 1e-5
    want, want_e = kq.quantize_ef_reference(delta, resid, scheme)
    got, got_e = kq.quantize_with_feedback(delta.cuda(), resid.cuda(), scheme)
    assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
    assert torch.equal(got_e.cpu(), want_e)
    assert torch.equal(kq.dequantize(got, scheme).cpu(), kq.dequantize_reference(want, scheme))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_cast_bit_exact_on_gpu(fp8: torch.dtype, rowwise: bool):
    x = (_randn(1001, 4099) * 7).bfloat16()
    want, want_s = kc.fp8_cast_reference(x, fp8, rowwise)
    got, got_s = kc.fp8_cast(x.cuda(), fp8, rowwise)
    assert torch.equal(got_s.cpu(), want_s)
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


def test_outer_step_on_gpu():
    theta, mom, deltas = _randn(300_007), _randn(300_007, seed=1) * 1e-2, _randn(4, 300_007, seed=2) * 1e-3
    t, m = theta.cuda(), mom.cuda()
    ko.fused_outer_step(t, m, deltas.cuda(), [1.0, 2.0, 0.5, 0.5], 0.7, 0.9, True)
    ko.outer_step_reference(theta, mom, deltas, [1.0, 2.0, 0.5, 0.5], 0.7, 0.9, True)
    torch.testing.assert_close(t.cpu(), theta, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.cpu(), mom, rtol=0, atol=1e-8)


def _moe_round_trip(permute, unpermute, chosen: torch.Tensor, mix: torch.Tensor):
    def run(x: torch.Tensor) -> torch.Tensor:
        p = kp.plan(chosen.to(x.device), 16)
        return unpermute(permute(x, p) * 2.0, p, mix.to(x.device))
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differentiable_kernels_on_gpu(dtype: torch.dtype):
    """rmsnorm, swiglu, permute round trip: values and input gradients vs the twins' autograd;
    bf16 within two ulps of the largest value (the kernels round once, the twins at every op)."""
    tol = 1e-5 if dtype == torch.float32 else 2.0**-6
    x, u = _randn(2053, 1031).to(dtype), _randn(2053, 1031, seed=2).to(dtype)
    w = (1 + 0.1 * _randn(1031, seed=1)).to(dtype)
    top = torch.rand(2053, 16, generator=torch.Generator().manual_seed(3)).topk(4, dim=-1)
    chosen, mix = top.indices, top.values.softmax(-1)
    pairs = {
        "rmsnorm": (lambda a: kr.rms_norm(a, w.to(a.device), 1e-6),
                    lambda a: kr.rmsnorm_reference(a, w, 1e-6)),
        "swiglu": (lambda a: ks.swiglu(a, u.to(a.device)), lambda a: ks.swiglu_reference(a, u)),
        "moe_permute": (_moe_round_trip(kp.permute, kp.unpermute, chosen, mix),
                        _moe_round_trip(kp.permute_reference, kp.unpermute_reference, chosen, mix)),
    }
    for name, (kernel, twin) in pairs.items():
        outs = []
        for fn, device in ((kernel, "cuda"), (twin, "cpu")):
            a = x.detach().to(device).requires_grad_()  # a fresh leaf, even on CPU
            y = fn(a)
            y.backward(torch.ones_like(y))
            outs.append((y.detach().float().cpu(), a.grad.float().cpu()))
        for got, want in zip(*outs, strict=True):
            assert float((got - want).abs().max() / want.abs().max()) <= tol, name


def test_cross_entropy_on_gpu():
    h, w = _randn(4099, 257).cuda(), (_randn(32_003, 257, seed=1) * 257**-0.5).cuda()
    y = torch.randint(32_003, (4099,), generator=torch.Generator().manual_seed(2)).cuda()
    y[::9] = -100
    got = kce.linear_cross_entropy(h, w, y, chunk_rows=1000)
    torch.testing.assert_close(got, kce.cross_entropy_reference(h, w, y), rtol=1e-5, atol=1e-5)


def test_fp8_linear_trains_on_gpu_under_autocast():
    torch.manual_seed(0)
    layer = FP8Linear(1024, 2048, bias=False).cuda()
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.detach() @ layer.weight.detach().t()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.05  # measured ~0.037 (CPU twin)
    y.float().square().mean().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
