"""The divergence guard: decides, before a round's outer step is committed, whether it looks sane.

Three checks, in order (docs/design.md step 8):

1. Non-finite: the aggregate g or the stepped θ_g holds a NaN or Inf. Every push is checked finite
   on arrival, but finite pushes can still overflow in the weighted sum or the momentum update.
2. Update-norm spike: ‖θ_g(after) − θ_g(before)‖ of the fragment exceeds `guard_norm_factor` ×
   the median of the last `guard_window` committed step norms of that fragment. A median needs no
   absolute scale (step norms shrink by orders of magnitude over a run) and ignores a minority of
   odd values; it applies once `guard_min_history` norms are known.
3. Loss spike: the round's loss as islands report it (their eval loss where they measured one, else
   their mean inner training loss over the round) exceeds `guard_loss_factor` × the median of the
   last `guard_window` committed rounds' losses (when that median is positive: objectives that
   hover around zero, as policy-gradient losses do, are not compared). Islands that trained from a
   bad θ_b show it first in their losses; their pseudo-gradients are then not worth applying.

A refused round is not committed: θ_g, θ_b and the outer momentum stay as they were, the round
moves on and islands are told (SKIPPED) to keep their θ_b. After `guard_max_refusals` refused
rounds in a row, the state the islands keep training from is itself suspect: the engine rolls back
to the newest checkpoint older than the current version and orders every island to reload.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

from coordinator.config import CoordinatorConfig


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or Inf, or None.

    One pass per tensor and no temporary when all is well: a NaN, or an Inf of either sign, makes
    the float64 sum NaN or Inf, and the float64 sum of float32 (or narrower) values cannot overflow
    (|x| ≤ 3.4e38, far fewer than 1e270 elements). A sum that is not finite is confirmed element by
    element, so a float64 tensor whose finite values overflow the sum is not refused."""
    for name, t in tensors.items():
        if not math.isfinite(float(t.sum(dtype=torch.float64))) and not bool(torch.isfinite(t).all()):
            return name
    return None


def round_loss(losses: list[tuple[float, float]]) -> float:
    """Mean over contributions of (eval loss if measured, else mean training loss); NaN if none."""
    values = [e if math.isfinite(e) else m for m, e in losses]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


class Guard:
    def __init__(self, cfg: CoordinatorConfig, num_fragments: int) -> None:
        self.cfg = cfg
        self.norms = [deque(maxlen=cfg.guard_window) for _ in range(num_fragments)]
        self.losses: deque[float] = deque(maxlen=cfg.guard_window)
        self.refusals = 0  # refused rounds in a row

    def check(self, fragment: int, grad: dict[str, torch.Tensor], stepped: dict[str, torch.Tensor],
              step_norm: float, loss: float) -> str | None:
        """Why this round must not be committed, or None to commit it."""
        bad = first_non_finite(grad)
        if bad is not None:
            return f"non-finite aggregate: tensor '{bad}' of the pseudo-gradient holds NaN or Inf"
        bad = first_non_finite(stepped)
        if bad is not None or not math.isfinite(step_norm):
            return f"non-finite outer step: tensor '{bad}' of θ_g would hold NaN or Inf"
        cfg = self.cfg
        history = self.norms[fragment]
        if cfg.guard_norm_factor > 0 and len(history) >= cfg.guard_min_history:
            median = statistics.median(history)
            if step_norm > cfg.guard_norm_factor * median:
                return (f"update-norm spike: ‖Δθ_g‖ {step_norm:.4g} > {cfg.guard_norm_factor:g} × median "
                        f"{median:.4g} of the last {len(history)} committed steps of fragment {fragment}")
        if cfg.guard_loss_factor > 0 and math.isfinite(loss) and len(self.losses) >= cfg.guard_min_history:
            median = statistics.median(self.losses)
            # A ratio to the median means something only for a positive loss (a policy-gradient
            # objective hovers around zero and changes sign); otherwise the check stands aside.
            if median > 0 and loss > cfg.guard_loss_factor * median:
                return (f"loss spike: islands report {loss:.4g} > {cfg.guard_loss_factor:g} × median "
                        f"{median:.4g} of the last {len(self.losses)} committed rounds")
        return None

    def committed(self, fragment: int, step_norm: float, loss: float) -> None:
        self.norms[fragment].append(step_norm)
        if math.isfinite(loss):
            self.losses.append(loss)
        self.refusals = 0

    def refused(self) -> int:
        """Count a refused round; returns how many in a row."""
        self.refusals += 1
        return self.refusals

    def should_roll_back(self) -> bool:
        return self.cfg.guard_max_refusals > 0 and self.refusals >= self.cfg.guard_max_refusals

    def state(self) -> dict[str, Any]:
        return {"norms": [list(d) for d in self.norms], "losses": list(self.losses), "refusals": self.refusals}

    def load(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        for history, saved in zip(self.norms, state["norms"], strict=True):
            history.clear()
            history.extend(saved)
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.refusals = int(state["refusals"])
