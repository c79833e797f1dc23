"""Fused outer step: the twin is the coordinator's weighted sum (`protos.accumulate.WeightedSum`) +
`coordinator.params.ParamState.outer_step` bit for bit; the Triton kernel matches the twin within fp32 rounding (torch's ``add(alpha=)`` may fuse a
multiply-add that the kernel, compiled without FMA fusion, rounds twice)."""

from __future__ import annotations

import pytest
import torch

from coordinator.params import ParamState
from kernels import outer_step as ko
from protos.accumulate import WeightedSum

WEIGHTS = [3.0, 1.0, 0.5]
SHAPE = (37, 101)  # 3737 elements: not a multiple of the 2048-element tile


def _state(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g) * 1e-2,
            torch.randn(len(WEIGHTS), *SHAPE, generator=g) * 1e-3)


@pytest.mark.parametrize(("mu", "nesterov"), [(0.9, True), (0.9, False), (0.0, True)])
def test_reference_is_bit_identical_to_the_coordinator(mu: float, nesterov: bool):
    theta, mom, deltas = _state(0)
    ps = ParamState({"w": theta}, num_fragments=1)
    ps.momentum["w"].copy_(mom)
    for _ in range(3):  # momentum carries across steps
        total = WeightedSum(ps.fragment_specs(0))
        for d, w in zip(deltas, WEIGHTS, strict=True):
            total.add_tensors({"w": d}, w)
        ps.outer_step(total.mean(), lr=0.7, momentum=mu, nesterov=nesterov)
    t, m = theta.clone(), mom.clone()
    for _ in range(3):
        ko.fused_outer_step(t, m, deltas, WEIGHTS, 0.7, mu, nesterov)
    assert torch.equal(t, ps.theta_g["w"]) and torch.equal(m, ps.momentum["w"])


def triton_check_matches_reference() -> None:
    for mu, nesterov in [(0.9, True), (0.9, False), (0.0, True)]:
        theta, mom, deltas = _state(1)
        t_ref, m_ref, t, m = theta.clone(), mom.clone(), theta.clone(), mom.clone()
        for _ in range(3):
            ko.outer_step_reference(t_ref, m_ref, deltas, WEIGHTS, 0.7, mu, nesterov)
            ko.outer_step_triton(t, m, deltas, WEIGHTS, 0.7, mu, nesterov)
        # fp32: a few ulps of |θ| (~4) and of |m| (~1e-2) at most.
        torch.testing.assert_close(t, t_ref, rtol=0, atol=4 * 2.0**-23 * 4)
        torch.testing.assert_close(m, m_ref, rtol=0, atol=4 * 2.0**-23 * 0.05)


def test_triton_matches_reference(interpreted):
    interpreted("test_outer_step.triton_check_matches_reference")
