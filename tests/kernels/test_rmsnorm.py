"""RMSNorm: the twin is `island.model.RMSNorm` exactly; the Triton forward and backward match
the twin's autograd within fp32 rounding (rtol 1e-5) or one-to-two bf16 ulps (2^-7)."""

from __future__ import annotations

import pytest
import torch

from island.model import RMSNorm
from kernels import rmsnorm as kr

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def _inputs(dtype: torch.dtype, rows: int = 37, dim: int = 259) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    dy = torch.randn(rows, dim, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_norm(dtype: torch.dtype):
    x, w, _ = _inputs(dtype)
    norm = RMSNorm(x.shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        assert torch.equal(kr.rms_norm(x, w, 1e-6), norm(x))


def _fwd_bwd(fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, 1e-6)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def triton_check_forward_backward() -> None:
    for dtype, shape in [(torch.float32, (37, 259)), (torch.bfloat16, (37, 259)), (torch.float32, (5, 3, 1000))]:
        x, w, dy = _inputs(dtype, rows=shape[0] * (shape[1] if len(shape) == 3 else 1), dim=shape[-1])
        x, dy = x.view(shape), dy.view(shape)
        got = _fwd_bwd(kr.RMSNormFunction.apply, x, w, dy)
        want = _fwd_bwd(kr.rmsnorm_reference, x, w, dy)
        for a, b, name in zip(got, want, ("y", "dx", "dw"), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            scale = b.float().abs().max()
            err = float((a.float() - b.float()).abs().max() / scale)
            assert err <= TOL[dtype], (dtype, shape, name, err)


def test_triton_forward_backward(interpreted):
    interpreted("test_rmsnorm.triton_check_forward_backward")
