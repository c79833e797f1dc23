"""SwiGLU gating: the Triton forward and backward against the twin's autograd (silu(g)·u), fp32
within 1e-5 of the largest value, bf16 within 2^-7 (the twin rounds silu(g) to bf16 before the
product, the kernel does not)."""

from __future__ import annotations

import torch

from kernels import swiglu as ks

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def test_reference_is_the_mlp_gating():
    g, u = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(ks.swiglu(g, u), torch.nn.functional.silu(g) * u)


def triton_check_forward_backward() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        g0, u0, dh = (torch.randn(37, 1001, generator=gen).mul(4).to(dtype) for _ in range(3))
        results = []
        for fn in (ks.SwiGLUFunction.apply, ks.swiglu_reference):
            g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
            h = fn(g, u)
            h.backward(dh)
            results.append((h, g.grad, u.grad))
        for a, b, name in zip(*results, ("h", "dg", "du"), strict=True):
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            assert a.dtype == dtype and err <= TOL[dtype], (dtype, name, err)


def test_triton_forward_backward(interpreted):
    interpreted("test_swiglu.triton_check_forward_backward")
