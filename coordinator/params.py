"""The coordinator's parameter state: θ_g (fp32 master), θ_b (broadcast copy), outer momentum.

One outer step for one fragment (docs/design.md steps 7 and 9):
  g   = (Σ w_i Δ_i) / Σ w_i                     (weighted mean: coordinator/merge.py, in key order)
  m  ← μ m + g;  u = g + μ m (Nesterov) or m    (outer SGD, as torch.optim.SGD does it)
  θ_g ← θ_g − lr · u
  δ   = θ_g − θ_b, sent quantized;  θ_b ← θ_b + Q⁻¹(Q(δ))
Islands apply the same dequantized δ with the same fp32 add, so θ_b is bit-identical everywhere,
and what quantization left out stays in θ_g − θ_b and travels with the next δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protos.broadcast import apply_delta, l2_norm
from protos.codec import Payload, TensorSpec, decode, encode
from protos.fragments import split_fragments


@dataclass
class Contribution:
    """A validated, durable push: where its payload lies (its spill file) and its weight."""

    island_id: str
    round: int
    fragment: int
    base_version: int
    tokens: int
    weight: float
    path: str  # the spill file: the payload exactly as it arrived (coordinator/spool.py)
    loss_mean: float
    eval_loss: float
    compute_s: float
    last: bool = False  # the island's last push of its run for this fragment

    @property
    def key(self) -> tuple[str, int, int]:
        """The push's at-most-once key, and the order a round sums its pushes in."""
        return (self.island_id, self.round, self.fragment)


class ParamState:
    """θ_g, θ_b and the outer momentum of the fragments in `owned` (default: all of them).

    A coordinator shard (docs/design.md, "Sharded coordinator") holds only its own fragments'
    tensors; `fragments` still names every fragment's tensors, as both ends split them.
    """

    def __init__(self, theta: dict[str, torch.Tensor], num_fragments: int, owned: list[int] | None = None) -> None:
        self.fragments = split_fragments(list(theta), num_fragments)
        self.owned = list(range(num_fragments)) if owned is None else sorted(owned)
        mine = {n for f in self.owned for n in self.fragments[f]}
        self.names = [n for n in theta if n in mine]
        self.theta_g = {k: theta[k].detach().float().clone() for k in self.names}
        self.theta_b = {k: theta[k].detach().float().clone() for k in self.names}
        self.momentum = {k: torch.zeros_like(v) for k, v in self.theta_g.items()}
        self.specs = {k: TensorSpec(k, tuple(v.shape), "float32") for k, v in self.theta_g.items()}

    def fragment_specs(self, fragment: int) -> list[TensorSpec]:
        return [self.specs[n] for n in self.fragments[fragment]]

    def outer_step(self, grad: dict[str, torch.Tensor], lr: float, momentum: float,
                   nesterov: bool) -> dict[str, torch.Tensor]:
        """Apply the outer SGD to θ_g for the fragment's tensors; returns the new θ_g values."""
        for name, g in grad.items():
            m = self.momentum[name]
            if momentum > 0:
                m.mul_(momentum).add_(g)
                update = g.add(m, alpha=momentum) if nesterov else m
            else:
                update = g
            self.theta_g[name].sub_(update, alpha=lr)
        return {n: self.theta_g[n] for n in grad}

    def save_fragment(self, fragment: int) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the fragment's θ_g and outer momentum (what `outer_step` changes)."""
        names = self.fragments[fragment]
        return {"theta_g": {n: self.theta_g[n].clone() for n in names},
                "momentum": {n: self.momentum[n].clone() for n in names}}

    def restore_fragment(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        """Undo an outer step that was not committed."""
        for name, t in saved["theta_g"].items():
            self.theta_g[name].copy_(t)
        for name, t in saved["momentum"].items():
            self.momentum[name].copy_(t)

    def broadcast_delta(self, fragment: int, scheme: str) -> tuple[Payload, float]:
        """δ = θ_g − θ_b for the fragment, quantized; θ_b advances by what islands will decode."""
        names = self.fragments[fragment]
        delta = {n: self.theta_g[n] - self.theta_b[n] for n in names}
        payload = encode(delta, scheme)
        apply_delta(self.theta_b, decode(payload, [self.specs[n] for n in names]))
        return payload, l2_norm(delta)

    def full_payload(self) -> Payload:
        """θ_b, lossless, for islands that join or must reload."""
        return encode(self.theta_b, "fp32")

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"theta_g.safetensors": self.theta_g, "theta_b.safetensors": self.theta_b,
                "outer_momentum.safetensors": self.momentum}

    def load(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        self.theta_g = {n: files["theta_g.safetensors"][n].float().clone() for n in self.names}
        self.theta_b = {n: files["theta_b.safetensors"][n].float().clone() for n in self.names}
        self.momentum = {n: files["outer_momentum.safetensors"][n].float().clone() for n in self.names}
