"""The faults across islands and the coordinator: schedule files (parsed, checked, drawn with the seed),
and the injector against a recording cluster, for the kinds whose order of actions matters. (The runs
that carry them out on real processes are tests/sim/test_chaos.py's and, for the etcd faults,
tests/coordinator/test_etcd_outage.py's.)"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from archipelago.config import ConfigError
from archipelago.procs import kill_group
from sim.chaos_cluster import injected
from sim.fault_schedule import check, draw, dump, load_schedule, parse_schedule
from sim.run_faults import Fault, FaultsSection, RunFaultInjector, durations, load_config

DURATIONS = durations(FaultsSection(), 100.0)


def drawn(name: str, seed: int = 7, islands: int = 3) -> list[Fault]:
    return draw(load_schedule(name), seed, islands, 100.0, DURATIONS)


def test_the_ci_schedule_is_seeded_and_holds_every_kind_once():
    a = drawn("faults-ci")
    assert [(f.kind, f.at_s, f.target) for f in a] == [(f.kind, f.at_s, f.target) for f in drawn("faults-ci")]
    assert [f.kind for f in a] == ["kill_island", "partition", "kill_coordinator", "slow", "corrupt"]
    assert all(0 < f.at_s < 100 for f in a)
    kill, cut, coordinator, slow, corrupt = a
    assert len({kill.target, cut.target, slow.target}) == 3 and corrupt.target == kill.target  # drawn-1 twice
    assert coordinator.target == "leader" and coordinator.when == "merging"
    assert slow.duration_s == 12.0 and kill.duration_s == 1.0  # 12% of the run; [faults].restart_after_s
    # the times and islands the seeded schedule drew before it was a file (seed 7)
    assert [(f.at_s, f.target) for f in a] == [(15.91, "island-1"), (27.43, "island-0"), (45.22, "leader"),
                                               (54.19, "island-2"), (72.35, "island-1")]
    assert [f.at_s for f in drawn("faults-ci", seed=8)] != [f.at_s for f in a]


def test_a_schedule_file_takes_seconds_percentages_several_targets_and_phases(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[fault]]\nkind = "pause_coordinator"\nat = 30\nduration = "10%"\n\n'
                    '[[fault]]\nkind = "kill_island"\nat = "12.5s"\ntarget = ["island-0", "island-2"]\n\n'
                    '[[fault]]\nkind = "kill_coordinator"\nat = "40%"\ntarget = "standby"\n')
    faults = draw(load_schedule(str(path)), 1, 3, 200.0, DURATIONS)
    assert [(f.kind, f.at_s, f.target, f.duration_s) for f in faults] == [
        ("kill_island", 12.5, ["island-0", "island-2"], 1.0), ("pause_coordinator", 30.0, "leader", 20.0),
        ("kill_coordinator", 80.0, "standby", 1.0)]
    # a drawn schedule written back is replayed exactly
    (tmp_path / "again.toml").write_text(dump(faults))
    again = draw(load_schedule(str(tmp_path / "again.toml")), 99, 3, 1.0, DURATIONS)
    assert [(f.kind, f.at_s, f.target, f.duration_s) for f in again] == [
        (f.kind, f.at_s, f.target, f.duration_s) for f in faults]
    check(load_schedule(str(path)), islands=3, etcd=True)
    with pytest.raises(ConfigError, match="needs a standby coordinator on etcd"):
        check(load_schedule(str(path)), islands=3, etcd=False)
    with pytest.raises(ConfigError, match="island-2 does not exist"):
        check(load_schedule(str(path)), islands=2, etcd=True)


@pytest.mark.parametrize("entry, error", [
    ('kind = "explode"\nat = 1', "not one of"),
    ('kind = "kill_island"', "has no `at`"),
    ('kind = "kill_island"\nat = "soon"', "seconds"),
    ('kind = "kill_island"\nat = -3', ">= 0"),
    ('kind = "kill_island"\nat = 1\ntarget = "leader"', "hits islands"),
    ('kind = "pause_coordinator"\nat = 1\ntarget = "island-1"', '"leader" or "standby"'),
    ('kind = "kill_island"\nat = 1\nwhen = "merging"', "kill_island: checkpointed"),
    ('kind = "kill_coordinator"\nat = 1\nwhen = "lunch"', "kill_coordinator: merging"),
    ('kind = "partition"\nat = 1\nwhen = "checkpointed"', "got 'checkpointed' for partition"),
    ('kind = "kill_island"\nat = 1\nafter = 2', "unknown key"),
    ('kind = "partition"\nat = 1\ntarget = ["island-1", "island-1"]', "twice"),
])
def test_a_broken_schedule_entry_is_an_error_naming_it(entry, error):
    import tomllib

    with pytest.raises(ConfigError, match=error):
        parse_schedule(tomllib.loads(f"[[fault]]\n{entry}\n"), "mine.toml")


def test_the_presets_name_their_schedule_files():
    assert load_config("ci", []).faults.schedule == "faults-ci"
    assert [f.kind for f in drawn("faults-etcd")] == ["kill_etcd", "cut_leader_etcd", "term_coordinator",
                                                      "etcd_outage"]
    zombie = drawn("configs/faults-two-kills-zombie.toml")
    assert [(f.kind, f.target) for f in zombie] == [("kill_island", ["island-0", "island-1"]),
                                                    ("pause_coordinator", "leader")]
    with pytest.raises(ConfigError, match="not found"):
        load_config("ci", ['faults.schedule="nowhere"'])


class FakeCluster:
    """What the injector calls, recorded (sim/chaos_cluster.py has the real one)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.calls: list[str] = []
        self.link = self
        self.version_at_kill = 4
        self.finished: dict[str, float] = {}
        self.down: set[str] = set()
        self.events: dict[str, list[dict]] = {}

    def acks(self, island: str) -> list[dict]:
        return list(self.events.get(island, []))

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

    def coordinator(self, role: str = "leader") -> tuple[str, int]:
        return ("coordinator-a", 1) if role == "leader" else ("coordinator-b", 2)

    def pid(self, name: str) -> int:
        return self.process.pid

    def term_coordinator(self, role: str = "leader") -> dict:
        self.calls.append(f"term {role}")
        return {"mode": "handover", "name": "coordinator-a", "port": 1, "exit_status": 0}

    def kill_coordinator(self, role: str = "leader", probe: bool = True) -> str:
        self.calls.append(f"kill {role} probe={probe}")
        return "failover" if role == "leader" else "standby"

    def wait_commit_writing(self, timeout_s: float) -> str:
        self.calls.append("wait commit")
        return "/state/checkpoints/.v00000007.tmp-123"

    def restart_coordinator(self, name=None, port=None) -> None:
        self.calls.append(f"restart {name}")

    def kill_island(self, island: str) -> None:
        self.calls.append(f"kill {island}")

    def restart_island(self, island: str) -> None:
        self.calls.append(f"restart {island}")


def run_injector(faults: list[Fault], cluster: FakeCluster | None = None) -> FakeCluster:
    cluster = cluster or FakeCluster()
    injector = RunFaultInjector(faults, cluster, time.monotonic(), FaultsSection()).start()
    injector.join(10)
    assert not injector.errors, injector.errors
    return cluster


def test_the_injector_carries_out_the_etcd_kinds():
    faults = [Fault("kill_etcd", 0.0, "etcd", 0.05), Fault("cut_leader_etcd", 0.3, "leader", 0.05),
              Fault("term_coordinator", 0.6, "leader", 0.0)]
    cluster = run_injector(faults)
    assert cluster.calls == ["kill_etcd", "restart_etcd", "partition True drop=True", "partition False drop=False",
                             "term leader", "restart coordinator-a"]
    kill, cut, term = (f.detail for f in faults)
    assert kill["elected_after_ready_s"] == 1.25 and cut["takeover_s"] == 1.25 and cut["leader"] == "coordinator-a"
    assert term["exit_status"] == 0 and term["takeover_s"] == 1.25


def test_several_islands_die_together_and_a_kill_can_wait_for_a_commit():
    faults = [Fault("kill_island", 0.0, ["island-0", "island-2"], 0.1),
              Fault("kill_coordinator", 0.3, "leader", 0.0, when="merging"),
              Fault("kill_coordinator", 0.6, "standby", 0.05)]
    cluster = run_injector(faults)
    assert cluster.calls == ["kill island-0", "kill island-2", "restart island-0", "restart island-2",
                             "wait commit", "kill leader probe=False",  # no status call between the two
                             "kill standby probe=True", "restart coordinator-b"]
    assert faults[1].detail["writing"].endswith(".v00000007.tmp-123") and faults[1].detail["mode"] == "failover"
    # a kill timed to a commit is injected once, when the commit began (the live view prints it once)
    assert len(injected(faults)) == 3 and faults[1].injected_at_s >= 0.3


def test_a_kill_can_wait_until_the_islands_have_written_a_local_checkpoint():
    cluster = FakeCluster()
    start = {"event": "start"}
    # island-0's checkpoint is its previous process's (before its last start): it does not count
    cluster.events = {"island-0": [start, {"event": "checkpoint", "step": 3, "captured_at": 1.0}, start],
                      "island-1": [start]}
    fault = Fault("kill_island", 0.0, ["island-0", "island-1"], 0.0, when="checkpointed")

    def write_checkpoints() -> None:
        time.sleep(0.3)
        cluster.events["island-1"].append({"event": "checkpoint", "step": 3, "captured_at": 2.0})
        time.sleep(0.3)
        # island-0 checkpoints, then the coordinator answers a push: that checkpoint does not count it
        cluster.events["island-0"] += [{"event": "checkpoint", "step": 5, "captured_at": 3.0},
                                       {"event": "push", "t": 3.5}]
        time.sleep(0.3)
        cluster.events["island-0"].append({"event": "checkpoint", "step": 6, "captured_at": 4.0})

    writer = threading.Thread(target=write_checkpoints)
    writer.start()
    run_injector([fault], cluster)
    writer.join()
    assert cluster.calls == ["kill island-0", "kill island-1", "restart island-0", "restart island-1"]
    assert fault.detail["checkpointed"] == {"island-0": 6, "island-1": 3}
    assert fault.injected_at_s >= 0.9  # stamped at the kill, not at `at`


def test_a_kill_waiting_for_a_checkpoint_needs_a_run_that_takes_them(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[fault]]\nkind = "kill_island"\nat = 1\ntarget = "island-0"\nwhen = "checkpointed"\n')
    check(load_schedule(str(path)), islands=3, etcd=False, local_checkpoints=True)
    with pytest.raises(ConfigError, match="set diloco.local_checkpoint_every"):
        check(load_schedule(str(path)), islands=3, etcd=False, local_checkpoints=False)


def test_a_paused_coordinator_is_woken_after_its_duration():
    cluster = FakeCluster()
    cluster.process = subprocess.Popen(["sleep", "30"], start_new_session=True)  # stands for the leader
    try:
        fault = Fault("pause_coordinator", 0.0, "leader", 0.3)
        run_injector([fault], cluster)
        assert cluster.process.poll() is None  # woken (SIGCONT), still running
        state = open(f"/proc/{cluster.process.pid}/stat").read().split()[2]
        assert state != "T", "still stopped"
    finally:
        kill_group(cluster.process)
    d = fault.detail
    assert d["name"] == "coordinator-a" and d["takeover_s"] == 1.25
    assert d["woke_at"] - d["paused_at"] >= 0.3
