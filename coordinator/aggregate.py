"""One round's contributions → one pseudo-gradient g for the outer step (docs/design.md step 7).

Default, the weighted mean  g = (Σ w_i Δ_i) / Σ w_i  (w_i = tokens × staleness discount, summed in
key order), which the round engine takes from the merge it kept while the pushes arrived
(coordinator/merge.py) without ever decoding a push into a tensor of its own. Two optional
defences against a faulty or malicious island need every push's values at once, so with either
on the round's pushes are decoded when it closes, one fp32 copy each (n × 4 bytes a parameter
of the fragment, and one more pass over them): what robust aggregation costs.

Norm clipping (``clip_update_norm = c > 0``): Δ_i ← Δ_i · min(1, c·m / ‖Δ_i‖), where m is the median
of the fragment's recent update norms: the norms of the last ``clip_window`` contributions of
committed rounds together with this round's own. A median needs no absolute scale (update norms
shrink by orders of magnitude over a run) and holds while fewer than half of the norms it sees
are garbage; counting this round's norms lets it clip from the very first round.

Coordinate-wise trimmed mean (``aggregation = "trimmed_mean"``, with n ≥ 4 contributions): for
every coordinate, sort the n values, drop the k = ⌊trim_fraction · n⌋ smallest and largest, and take
the weighted mean of the rest with their contributions' weights (Yin et al., "Byzantine-robust
distributed learning", arXiv:1803.01498, unweighted there). Below 4 contributions trimming one at
each end would leave too little to average, so the (clipped) weighted mean is used.

The weights come from the tokens each island reports. Clipping bounds how far one contribution
can move θ; it does not bound its say: an island that over-reports its tokens still weighs more on
the coordinates where it is not trimmed.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from coordinator.config import CoordinatorConfig
from coordinator.params import Contribution
from protos.accumulate import WeightedSum
from protos.broadcast import l2_norm
from protos.codec import TensorSpec

MIN_TRIMMED = 4  # contributions a round needs before the trimmed mean applies
_TRIM_STEP = 1 << 22  # coordinates × contributions per sort: bounds the trimmed mean's scratch memory


def clip_scales(norms: Sequence[float], bound: float) -> list[float]:
    """Per contribution, the factor min(1, bound / norm) that brings its norm within ``bound``."""
    return [bound / n if n > bound else 1.0 for n in norms]


def trimmed_mean(values: torch.Tensor, weights: torch.Tensor, trim: int) -> torch.Tensor:
    """``values: [n, m]``, ``weights: [n]`` → ``[m]``: per column, the weighted mean of the values
    left after dropping the ``trim`` smallest and ``trim`` largest (ties broken by row order)."""
    n = values.shape[0]
    assert 0 <= 2 * trim < n, f"cannot trim {trim} from each end of {n} values"
    ordered, rows = torch.sort(values, dim=0, stable=True)
    kept = ordered[trim:n - trim]  # [n - 2 trim, m]
    w = weights[rows[trim:n - trim]]  # [n - 2 trim, m]: each kept value's own weight
    return (kept * w).sum(dim=0) / w.sum(dim=0)


def trimmed_mean_tensors(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                         names: Sequence[str], trim_fraction: float) -> dict[str, torch.Tensor]:
    """`trimmed_mean` of every named tensor over the contributions, a slice of coordinates at a time."""
    n = len(deltas)
    trim = math.floor(trim_fraction * n)
    w = torch.tensor(list(weights), dtype=torch.float64)
    step = max(1, _TRIM_STEP // n)
    out = {}
    for name in names:
        flat = [d[name].reshape(-1) for d in deltas]
        result = torch.empty(flat[0].numel(), dtype=torch.float32)
        for start in range(0, result.numel(), step):
            stacked = torch.stack([f[start:start + step] for f in flat]).double()  # [n, step]
            result[start:start + step] = trimmed_mean(stacked, w, trim).float()
        out[name] = result.view(deltas[0][name].shape)
    return out


class Aggregator:
    """The configured aggregation, and the per-fragment history of update norms clipping uses."""

    def __init__(self, cfg: CoordinatorConfig, num_fragments: int) -> None:
        self.cfg = cfg
        self.norms: list[deque[float]] = [deque(maxlen=cfg.clip_window) for _ in range(num_fragments)]

    @property
    def robust(self) -> bool:
        """Whether a round needs its pushes decoded (clipping or the trimmed mean is on)."""
        return self.cfg.clip_update_norm > 0 or self.cfg.aggregation == "trimmed_mean"

    def __call__(self, specs: Sequence[TensorSpec], contributions: Sequence[Contribution],
                 deltas: Sequence[Mapping[str, torch.Tensor]], fragment: int) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, Any]]:
        """g for the fragment from the contributions' decoded ``deltas`` (in the same order), and
        what the robust steps did (empty when both are off: then g is the weighted mean, the same
        bits as the merge's)."""
        info: dict[str, Any] = {}
        weights = [c.weight for c in contributions]
        if self.cfg.clip_update_norm > 0:
            deltas = self.clip(contributions, deltas, fragment, info)
        names = [s.name for s in specs]
        if self.cfg.aggregation == "trimmed_mean" and len(contributions) >= MIN_TRIMMED:
            info["aggregation"] = "trimmed_mean"
            return trimmed_mean_tensors(deltas, weights, names, self.cfg.trim_fraction), info
        total = WeightedSum(specs)
        for d, w in zip(deltas, weights, strict=True):
            total.add_tensors(d, w)
        return total.mean(), info

    def clip(self, contributions: Sequence[Contribution], deltas: Sequence[Mapping[str, torch.Tensor]],
             fragment: int, info: dict[str, Any]) -> list[Mapping[str, torch.Tensor]]:
        norms = [l2_norm(d) for d in deltas]
        bound = self.cfg.clip_update_norm * statistics.median([*self.norms[fragment], *norms])
        self.norms[fragment].extend(norms)
        scales = clip_scales(norms, bound)
        info["clip_bound"] = bound
        info["clipped"] = {c.island_id: s for c, s in zip(contributions, scales, strict=True) if s < 1}
        return [d if s == 1 else {n: t * s for n, t in d.items()} for d, s in zip(deltas, scales, strict=True)]

    def state(self) -> list[list[float]]:
        return [list(d) for d in self.norms]

    def load(self, state: list[list[float]]) -> None:
        for history, saved in zip(self.norms, state, strict=True):
            history.clear()
            history.extend(saved)
