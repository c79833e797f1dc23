"""The open round's merge (coordinator/merge.py): pushes summed in key order whatever order they
arrive in, the longest safe prefix summed early, stale calls ignored."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from coordinator.merge import RoundMerge, mergeable
from coordinator.params import Contribution
from coordinator.spool import read_payload, write_payload
from protos.accumulate import WeightedSum
from protos.codec import TensorSpec, decode, encode

SPECS = [TensorSpec("w", (64, 33), "float32"), TensorSpec("b", (33,), "float32")]


def test_mergeable_is_the_prefix_no_expected_island_can_precede():
    pending = [("a", 0, 0), ("c", 0, 0), ("d", 0, 0)]
    assert mergeable(pending, {"a", "c", "d"}) == pending
    assert mergeable(pending, {"a", "b", "c", "d"}) == [("a", 0, 0)]  # b may still push before c
    assert mergeable(pending, {"0", "a", "c"}) == []
    assert mergeable(pending, set()) == pending  # nobody else is live: all of it
    assert mergeable([], {"a"}) == []


def contributions(tmp_path: Path, islands: list[str]) -> list[Contribution]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for k, island in enumerate(islands):
        payload = encode({s.name: torch.randn(s.shape, generator=gen) * 1e-3 for s in SPECS}, "int8-block")
        path = write_payload(tmp_path / f"{island}.bin", payload)
        out.append(Contribution(island, 0, 0, 0, 1000 + k, 1000.0 + 17 * k, str(path), 3.0, math.nan, 1.0))
    return out


def key_order_mean(cs: list[Contribution]) -> dict[str, torch.Tensor]:
    total = WeightedSum(SPECS)
    for c in sorted(cs, key=lambda c: c.key):
        total.add_tensors(decode(read_payload(c.path), SPECS), c.weight)
    return total.mean()


def test_the_mean_is_the_key_order_sum_whatever_was_merged_early(tmp_path):
    cs = contributions(tmp_path, ["island-0", "island-1", "island-2", "island-3"])
    want = key_order_mean(cs)
    merge = RoundMerge(SPECS, lambda c: read_payload(c.path))
    gen = merge.reset()
    merge.extend(cs[:2], gen)  # the first two in key order arrived first: summed early
    assert merge.summed == [(c.key, c.weight) for c in cs[:2]]
    merge.extend(cs[:1], gen)  # a stale, shorter call changes nothing
    assert len(merge.summed) == 2
    merge.extend([cs[0], cs[2]], gen)  # not an extension of what is summed: left to the close
    assert len(merge.summed) == 2
    mean = merge.mean(cs, gen)
    assert all(torch.equal(mean[n], want[n]) for n in ("w", "b")) and merge.seconds > 0


def test_an_earlier_key_arriving_late_restarts_the_sum(tmp_path):
    cs = contributions(tmp_path, ["island-0", "island-1", "island-2"])
    merge = RoundMerge(SPECS, lambda c: read_payload(c.path))
    gen = merge.reset()
    merge.extend(cs[1:], gen)  # island-0 was not expected (its lease had run out), then came back
    mean, want = merge.mean(cs, gen), key_order_mean(cs)
    assert all(torch.equal(mean[n], want[n]) for n in ("w", "b"))


def test_a_call_for_an_old_round_adds_nothing(tmp_path):
    cs = contributions(tmp_path, ["island-0", "island-1"])
    merge = RoundMerge(SPECS, lambda c: read_payload(c.path))
    old = merge.reset()
    new = merge.reset()  # the round closed meanwhile
    merge.extend(cs, old)
    assert merge.summed == [] and not merge.sum.flat.any() and new == old + 1
