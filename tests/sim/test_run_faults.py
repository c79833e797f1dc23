"""The faults across islands and the coordinator: the seeded schedule. (The run that carries it out is
tests/sim/test_chaos.py's.)"""

from __future__ import annotations

from sim.run_faults import FaultsSection, schedule


def test_the_schedule_is_seeded_and_holds_every_kind_once():
    a = schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)
    assert [(f.kind, f.at_s, f.target) for f in a] == [
        (f.kind, f.at_s, f.target) for f in schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)]
    assert sorted(f.kind for f in a) == sorted(["kill_island", "partition", "kill_coordinator", "slow", "corrupt"])
    assert [f.at_s for f in a] == sorted(f.at_s for f in a) and all(0 < f.at_s < 100 for f in a)
    assert {f.target for f in a if f.kind != "kill_coordinator"} <= {"island-0", "island-1", "island-2"}
    other = schedule(FaultsSection(), seed=8, islands=3, expected_s=100.0)
    assert [f.at_s for f in other] != [f.at_s for f in a]
