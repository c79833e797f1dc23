"""The quality cost of DiLoCo that the published scaling law predicts.

Charles et al., "Scaling Laws for DiLoCo" (arXiv:2503.09799), fit the final eval loss of each
method as a power law of the parameter count, L = A·N^α, over models of 35M to 2.4B parameters
trained from scratch on 20 tokens per parameter (their Table 7). Data parallel and DiLoCo with M
replicas each have their own fit, so the gap DiLoCo pays at N parameters and M islands is

    gap(N, M) = A_M·N^α_M / (A_DP·N^α_DP) − 1

(relative, as `loss_gap_rel` in the sim report). At 35M it gives their Table 4's measured gaps to
about 0.2 points (+0.7% for M = 2, +1.9% for M = 4 against a measured +2.0%); the gap falls with N
for every M. Outside 35M–2.4B it is an extrapolation and says so; an M between two fitted ones
takes log A and α interpolated in log M; an M outside 2–8 has no prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SOURCE = "Charles et al. 2025, arXiv:2503.09799, Table 7"
FIT_MIN_PARAMS = 35e6
FIT_MAX_PARAMS = 2.4e9


@dataclass(frozen=True)
class PowerLaw:
    a: float
    alpha: float

    def loss(self, params: float) -> float:
        return self.a * params ** self.alpha


DATA_PARALLEL = PowerLaw(18.129, -0.0953)
DILOCO = {2: PowerLaw(18.768, -0.0969), 4: PowerLaw(19.762, -0.0992), 8: PowerLaw(21.051, -0.1018)}


@dataclass(frozen=True)
class Prediction:
    gap: float | None  # DiLoCo's eval loss over data parallel's, minus 1; None: no fit for this M
    note: str  # where the figure comes from and whether it is an extrapolation

    def fields(self) -> dict[str, float | str | None]:
        """The report's and the plan's fields."""
        return {"law_predicted_gap": self.gap, "law_predicted_gap_note": self.note}


def diloco_law(islands: int) -> tuple[PowerLaw | None, str]:
    """The fit for M islands: the paper's own, one interpolated in log M between two, or none."""
    if islands in DILOCO:
        return DILOCO[islands], f"the M = {islands} fit"
    fitted = sorted(DILOCO)
    if not fitted[0] < islands < fitted[-1]:
        return None, f"no fit for M = {islands} (the paper fits M = {', '.join(map(str, fitted))})"
    lo = max(m for m in fitted if m < islands)
    hi = min(m for m in fitted if m > islands)
    t = (math.log(islands) - math.log(lo)) / (math.log(hi) - math.log(lo))
    a = math.exp((1 - t) * math.log(DILOCO[lo].a) + t * math.log(DILOCO[hi].a))
    alpha = (1 - t) * DILOCO[lo].alpha + t * DILOCO[hi].alpha
    return PowerLaw(a, alpha), f"the M = {lo} and M = {hi} fits interpolated in log M"


def predicted_gap(params: float, islands: int) -> Prediction:
    """The law's relative gap to data parallel for `params` parameters on `islands` islands."""
    if not params > 0:
        raise ValueError(f"params must be positive, got {params}")
    law, which = diloco_law(islands)
    if law is None:
        return Prediction(None, f"{SOURCE}: {which}")
    gap = law.loss(params) / DATA_PARALLEL.loss(params) - 1
    fitted = f"{count(FIT_MIN_PARAMS)}–{count(FIT_MAX_PARAMS)}"
    if params < FIT_MIN_PARAMS:
        where = f"an extrapolation below the fitted {fitted}"
    elif params > FIT_MAX_PARAMS:
        where = f"an extrapolation above the fitted {fitted}"
    else:
        where = f"within the fitted {fitted}"
    return Prediction(gap, f"{SOURCE}: {which} over the data-parallel fit at N = {count(params)}, {where}")


def count(n: float) -> str:
    """2.4e9 -> '2.4B', 217792 -> '0.218M'."""
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    return f"{n / 1e6:.3g}M"
