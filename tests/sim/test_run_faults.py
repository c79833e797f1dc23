"""The faults across islands and the coordinator: the seeded schedule, and the injector's etcd kinds
against a recording cluster. (The runs that carry them out are tests/sim/test_chaos.py's and, for the
etcd faults on real processes, tests/coordinator/test_etcd_outage.py's.)"""

from __future__ import annotations

import threading
import time

import pytest

from archipelago.config import ConfigError
from sim.run_faults import Fault, FaultsSection, RunFaultInjector, load_config, schedule


def test_the_schedule_is_seeded_and_holds_every_kind_once():
    a = schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)
    assert [(f.kind, f.at_s, f.target) for f in a] == [
        (f.kind, f.at_s, f.target) for f in schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)]
    assert sorted(f.kind for f in a) == sorted(["kill_island", "partition", "kill_coordinator", "slow", "corrupt"])
    assert [f.at_s for f in a] == sorted(f.at_s for f in a) and all(0 < f.at_s < 100 for f in a)
    assert {f.target for f in a if f.kind != "kill_coordinator"} <= {"island-0", "island-1", "island-2"}
    other = schedule(FaultsSection(), seed=8, islands=3, expected_s=100.0)
    assert [f.at_s for f in other] != [f.at_s for f in a]


def test_the_etcd_kinds_are_scheduled_only_where_a_preset_sets_them():
    assert {f.kind for f in schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)} == {
        "kill_island", "partition", "kill_coordinator", "slow", "corrupt"}
    cfg = FaultsSection(kill_island_at=-1, partition_at=-1, kill_coordinator_at=-1, slow_at=-1, corrupt_at=-1,
                        kill_etcd_at=0.1, etcd_outage_at=0.7, cut_leader_etcd_at=0.3, term_coordinator_at=0.5)
    faults = schedule(cfg, seed=7, islands=3, expected_s=100.0)
    assert [(f.kind, f.target, f.duration_s) for f in faults] == [
        ("kill_etcd", "etcd", 5.0), ("cut_leader_etcd", "coordinator", 8.0),
        ("term_coordinator", "coordinator", 1.0), ("etcd_outage", "etcd", 90.0)]
    # a kind added to a schedule leaves the times of the others as they were (same seed)
    both = schedule(FaultsSection(term_coordinator_at=0.5), seed=7, islands=3, expected_s=100.0)
    assert [(f.kind, f.at_s) for f in both if f.kind != "term_coordinator"] == [
        (f.kind, f.at_s) for f in schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)]
    with pytest.raises(ConfigError, match="need faults.failover = etcd"):
        load_config("ci", ['faults.failover="restart"', "faults.kill_etcd_at=0.2"])


class FakeCluster:
    """What the injector calls for the etcd kinds, recorded (sim/chaos_cluster.py has the real one)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.calls: list[str] = []
        self.link = self

    def partition(self, on: bool, drop: bool = False) -> None:
        self.calls.append(f"partition {on} drop={drop}")

    def kill_etcd(self) -> None:
        self.calls.append("kill_etcd")

    def restart_etcd(self) -> tuple[float, float]:
        self.calls.append("restart_etcd")
        return 100.0, 100.5

    def wait_leader(self, after: float, timeout_s: float = 60.0) -> float:
        return after + 1.25

    def leader_etcd_link(self):
        return self, "coordinator-a"

    def term_coordinator(self) -> dict:
        self.calls.append("term")
        return {"mode": "handover", "name": "coordinator-a", "port": 1, "exit_status": 0}

    def restart_coordinator(self, name=None, port=None) -> None:
        self.calls.append(f"restart {name}")


def test_the_injector_carries_out_the_etcd_kinds():
    cluster = FakeCluster()
    faults = [Fault("kill_etcd", 0.0, "etcd", 0.05), Fault("cut_leader_etcd", 0.0, "coordinator", 0.05),
              Fault("term_coordinator", 0.0, "coordinator", 0.0)]
    injector = RunFaultInjector(faults, cluster, time.monotonic(), FaultsSection()).start()
    injector.join(10)
    assert not injector.errors, injector.errors
    assert cluster.calls == ["kill_etcd", "restart_etcd", "partition True drop=True", "partition False drop=False",
                             "term", "restart coordinator-a"]
    kill, cut, term = (f.detail for f in faults)
    assert kill["elected_after_ready_s"] == 1.25 and cut["takeover_s"] == 1.25 and cut["leader"] == "coordinator-a"
    assert term["exit_status"] == 0 and term["takeover_s"] == 1.25
