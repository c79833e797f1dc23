"""Permute / unpermute by expert: with the model's experts in between, exactly
`MoE.local_experts_forward`; the Triton gather/combine kernels against the twin, values and
gradients (bit-exact for k = 2, fp32 rounding for k = 3)."""

from __future__ import annotations

import torch

from island.model import ModelConfig
from island.moe import MoE
from kernels import moe_permute as kp

CFG = ModelConfig(dim=74, num_heads=1, num_kv_heads=1, num_experts=5, num_experts_per_tok=2, moe_ffn_dim=23)


def _routing(n: int, experts: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(n, experts, generator=g).topk(k, dim=-1)
    return top.indices, top.values.softmax(-1)


def test_twin_with_experts_is_local_experts_forward():
    torch.manual_seed(0)
    moe = MoE(CFG)
    x = torch.randn(41, CFG.dim)
    routing = moe.route(x)
    p = kp.plan(routing.experts, CFG.num_experts)
    xp = kp.permute(x, p)
    ys, start = [], 0
    for e, count in enumerate(p.counts.tolist()):
        ys.append(moe.experts[e](xp[start:start + count]))
        start += count
    out = kp.unpermute(torch.cat(ys), p, routing.weights)
    assert torch.equal(out, moe.local_experts_forward(x, routing))
    assert torch.equal(p.counts, torch.bincount(routing.experts.reshape(-1), minlength=CFG.num_experts))


def _round_trip(permute, unpermute, x0, w0, experts, num_experts):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    p = kp.plan(experts, num_experts)
    xp = permute(x, p)
    scale = torch.linspace(0.5, 2.0, xp.shape[0], dtype=x.dtype)[:, None]  # a row-dependent "expert"
    out = unpermute(xp * scale, p, w)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out).to(out.dtype))
    return xp.detach(), out.detach(), x.grad, w.grad


def triton_check_round_trip() -> None:
    """fp32: bit-exact for k = 2, within 1e-6 for k = 3; bf16: within 2^-6 of the largest value
    (two ulps: the kernel sums in fp32 and rounds once, the twin rounds every partial result, and
    the interpreter's fp32→bf16 cast truncates)."""
    for dtype, k, exact in ((torch.float32, 2, True), (torch.float32, 3, False), (torch.bfloat16, 3, False)):
        experts, weights = _routing(n=45, experts=7, k=k)
        x = torch.randn(45, 129, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = _round_trip(kp.permute, kp.unpermute, x, weights, experts, 7)
        want = _round_trip(kp.permute_reference, kp.unpermute_reference, x, weights, experts, 7)
        for a, b, name in zip(got, want, ("permuted", "out", "dx", "dw"), strict=True):
            assert a.dtype == b.dtype, (dtype, k, name)
            if exact and name in ("permuted", "out"):
                assert torch.equal(a, b), (k, name)
            tol = 1e-6 if dtype == torch.float32 else 2.0**-6
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            assert err <= tol, (dtype, k, name, err)


def test_triton_round_trip(interpreted):
    interpreted("test_moe_permute.triton_check_round_trip")
