"""The open round's merge for one fragment: pushes summed as they become durable, in key order.

A round's aggregate is ``g = Σ_i w_i Δ_i / Σ_i w_i`` over its pushes in key order (island, round,
fragment): float addition is not associative, and θ_g must be a function of the pushes, not of the
order they arrived in (docs/design.md step 7). `RoundMerge` keeps the running sum
(`protos/accumulate.py: WeightedSum`, one fp32 buffer for the fragment, each push decoded and
added in one pass from its spill file) over a prefix of the round's pushes in key order:

- a push is added as soon as every push before it in key order is in, and no live island that
  sorts before it can still send one (`mergeable`): pushes that arrive in key order are merged
  while the others are still streaming; the rest wait, as the bytes they arrived as;
- when the round closes, whatever is not yet summed is added, in order; a push that turned up
  before one already summed (an island that came back mid-round), or a weight the close capped
  (coordinator/admission.py: `capped_tokens`), restarts the sum from the spilled pushes, so the
  result is the key-order sum of the weights the round counts, whatever happened;
- each call names the round generation it was computed for, so a late background call cannot
  add an old round's push to the next round's sum.

Every addition runs on a worker thread, never on the event loop, under the merge's own lock; the
time spent adding is the round's `merge_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from coordinator.params import Contribution
from coordinator.store import Key
from protos.accumulate import WeightedSum
from protos.codec import Payload, TensorSpec


def mergeable(pending: Sequence[Key], expected: set[str]) -> list[Key]:
    """The longest prefix of ``pending`` (sorted keys) that no push still expected can precede:
    a key is mergeable once every island of ``expected`` (live, and not finished) that sorts
    before it has a pending push."""
    have = {k[0] for k in pending}
    waiting = sorted(i for i in expected if i not in have)
    if not waiting:
        return list(pending)
    return [k for k in pending if k[0] < waiting[0]]


class RoundMerge:
    """Σ w_i Δ_i over a prefix, in key order, of one fragment's pending pushes (see the module)."""

    def __init__(self, specs: Sequence[TensorSpec], read: Callable[[Contribution], Payload]) -> None:
        self.sum = WeightedSum(specs)
        self.read = read
        self.summed: list[tuple[Key, float]] = []  # (key, weight) of each push in the sum, in order
        self.generation = 0
        self.seconds = 0.0  # adding this round's pushes: the round's merge_s
        self.lock = threading.Lock()

    def reset(self) -> int:
        """A new round (or a rollback): an empty sum; the new generation."""
        with self.lock:
            self._zero()
            self.seconds = 0.0
            self.generation += 1
            return self.generation

    def _zero(self) -> None:
        self.sum.zero_()
        self.summed = []

    def _is_summed_prefix(self, contributions: Sequence[Contribution]) -> bool:
        return [(c.key, c.weight) for c in contributions[:len(self.summed)]] == self.summed

    def extend(self, target: Sequence[Contribution], generation: int) -> None:
        """Add what ``target`` (contributions in key order, computed for round ``generation``) has
        beyond the sum, if the sum is a prefix of it; else nothing (a stale call: the close sorts
        it out)."""
        with self.lock:
            if generation == self.generation and self._is_summed_prefix(target):
                self._add(target[len(self.summed):])

    def mean(self, contributions: Sequence[Contribution], generation: int) -> dict[str, torch.Tensor]:
        """g over exactly ``contributions`` (the whole round, in key order), starting the sum again
        if it holds anything else."""
        with self.lock:
            assert generation == self.generation, "the round's merge moved on under its close"
            if not self._is_summed_prefix(contributions):
                self._zero()  # something before what is summed turned up, or a weight was capped: again
            self._add(contributions[len(self.summed):])
            return self.sum.mean()

    def _add(self, contributions: Sequence[Contribution]) -> None:
        for c in contributions:
            start = time.perf_counter()
            self.sum.add(self.read(c), c.weight, verify_sha256=False)
            self.seconds += time.perf_counter() - start
            self.summed.append((c.key, c.weight))
