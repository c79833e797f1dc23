"""Faults across islands and the coordinator (`archipelago chaos --preset ci`): the `[faults]` table,
and the injector that carries a schedule out on real processes and links.

The schedule is a file (sim/fault_schedule.py: `faults.schedule` names the preset's,
`archipelago chaos --faults FILE` gives another), drawn once per run with the run's seed against
the expected run time (the fault-free run's). Each fault starts at its time on a thread of its own,
so faults may overlap (two islands killed at once, a coordinator paused while an island is down).

    kill_island        SIGKILL the islands' process groups; start them again `duration` later; with
                       `when = "checkpointed"`, once each has a local checkpoint to resume from
    kill_coordinator   SIGKILL the leader (or the standby): a standby takes over (etcd), or, without
                       etcd, it is started again on its state directory after `duration`; with
                       `when = "merging"`, at the leader's next commit (its files being written)
    pause_coordinator  SIGSTOP the leader (or the standby) for `duration`, then SIGCONT: with etcd a
                       standby takes over meanwhile, and the paused one wakes as a zombie whose lease
                       is gone; it must refuse to act as leader (it steps down and stands again)
    partition          cut the islands' links (resets, refused connections) for `duration`
    slow               run the islands 1/5 of the time (SIGSTOP/SIGCONT every `slow_period_s`)
    corrupt            flip a byte of the next large segment each island's link carries up (a push)
    kill_etcd          SIGKILL etcd; start it again on its data `duration` later
    etcd_outage        the same, for longer (90 s by default: beyond an island's former patience)
    cut_leader_etcd    drop everything on the leader's own link to etcd for `duration` (islands still
                       reach it): it must stop at its lease deadline, a standby take over
    term_coordinator   SIGTERM the leader (or the standby): it hands over (etcd) and exits 0, and is
                       started again `duration` later (as a standby, or on its state without etcd)

Whether each fault was recovered from, and when, is sim/fault_recovery.py's; the processes and
links are sim/chaos_cluster.py's `Cluster`; the faults inside one island (a rank of a replica group)
are sim/island_faults.py's.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from archipelago import config as cfglib
from archipelago.config import ConfigError
from archipelago.procs import signal_group
from sim.fault_schedule import ETCD_KINDS, KINDS, Fault, load_schedule
from sim.run import SimConfig

# kinds after which another coordinator leads (with etcd) or the coordinator came back on its state
FAILOVER_KINDS = ("kill_coordinator", "cut_leader_etcd", "term_coordinator", "pause_coordinator")
SLOW_FACTOR = 5
MERGE_WAIT_S = 120.0  # how long a kill timed to a commit (or to a local checkpoint) waits for one
__all__ = ["ETCD_KINDS", "FAILOVER_KINDS", "KINDS", "SLOW_FACTOR", "Fault", "FaultsSection", "RunChaosConfig",
           "RunFaultInjector", "durations", "handles", "load_config", "start_after"]


@dataclass
class FaultsSection:
    """The `[faults]` table: which schedule, each kind's default duration, how faults are carried out."""

    schedule: str = "faults-ci"  # a schedule file under configs/ (without .toml) or a path
    restart_after_s: float = 1.0  # kill_island, kill_coordinator, term_coordinator: down this long
    partition_s: float = 4.0
    slow_fraction: float = 0.12  # the slow window, as a fraction of the expected run time
    slow_period_s: float = 0.5  # SIGSTOP/SIGCONT period; the island runs 1/5 of it
    pause_s: float = 8.0  # pause_coordinator: SIGSTOPped this long (beyond 2 lease TTLs: a standby takes over)
    etcd_restart_after_s: float = 5.0  # kill_etcd: down this long
    etcd_outage_s: float = 90.0  # etcd_outage: down this long
    etcd_cut_s: float = 8.0  # cut_leader_etcd: the leader's link to etcd drops everything this long
    failover: str = "auto"  # auto (etcd if on PATH) | etcd | restart
    etcd_lease_ttl_s: int = 2
    dp_checkpoint_every_s: float = 0.0  # 0: one outer round of steps (measured)


def durations(cfg: FaultsSection, expected_s: float) -> dict[str, float]:
    """Each kind's duration (seconds) where a schedule entry gives none."""
    return {"kill_island": cfg.restart_after_s, "partition": cfg.partition_s,
            "kill_coordinator": cfg.restart_after_s, "pause_coordinator": cfg.pause_s,
            "slow": round(cfg.slow_fraction * expected_s, 2), "corrupt": 0.0,
            "kill_etcd": cfg.etcd_restart_after_s, "etcd_outage": cfg.etcd_outage_s,
            "cut_leader_etcd": cfg.etcd_cut_s, "term_coordinator": cfg.restart_after_s}


class RunFaultInjector:
    """Runs a schedule against a cluster, each fault on a thread of its own from its time on.

    `cluster` provides: kill_island(name), restart_island(name), coordinator(role) -> (name, port),
    kill_coordinator(role) -> str ("failover" or "restart"), restart_coordinator(name=None, port=None),
    pid(name), wait_commit_writing(after, timeout_s) -> the path being written, or None, links(name)
    -> list of LinkProxy, leader_index(), island_pid(name), and `done` (a threading.Event set when the
    run is over); for the etcd kinds also kill_etcd(), restart_etcd() -> (last probe down, first probe
    answered), wait_leader(after, timeout_s) -> the time a coordinator was elected, leader_etcd_link()
    -> (LinkProxy, name), term_coordinator(role) -> {"mode", "name", "port", "exit_status"}.
    """

    def __init__(self, faults: list[Fault], cluster: Any, t0: float, cfg: FaultsSection) -> None:
        self.faults = faults
        self.cluster = cluster
        self.t0 = t0
        self.cfg = cfg
        self.stopped: dict[str, list[tuple[float, float]]] = {}  # island -> SIGSTOP intervals (wall times)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(f,), name=f"fault-{i}-{f.kind}", daemon=True)
                         for i, f in enumerate(faults)]

    def start(self) -> RunFaultInjector:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def _sleep_until(self, at_s: float) -> bool:
        while time.monotonic() - self.t0 < at_s:
            if self.cluster.done.wait(0.05):
                return False
        return True

    def _run(self, fault: Fault) -> None:
        if not self._sleep_until(fault.at_s):
            return
        if not fault.when:  # those with a `when`: once what they wait for happened
            fault.injected_at_s = self.now()
        try:
            self._inject(fault)
        except Exception as exc:  # recorded in the report; the run goes on
            with self._lock:
                self.errors.append(f"{fault.kind} on {fault.target}: {exc!r}")
        if fault.injected_at_s is not None:
            fault.ended_at_s = self.now()

    def _wait_checkpointed(self, islands: list[str], timeout_s: float) -> dict[str, int] | None:
        """Wait (bounded) until each of `islands` has a local checkpoint a restart could resume from:
        written by its current process (after its last start) and taken after the last push the
        coordinator answered it (a checkpoint from before that answer does not count the push the
        coordinator holds, and a replacement would pull θ_b instead). The step of each island's
        newest, or None at the deadline or when the run ends first."""
        deadline = time.monotonic() + timeout_s
        while True:
            steps: dict[str, int] = {}
            for island in islands:
                events = self.cluster.acks(island)
                starts = [i for i, e in enumerate(events) if e["event"] == "start"]
                current = events[starts[-1] if starts else 0:]
                written = [e for e in current if e["event"] == "checkpoint"]
                answered = [e["t"] for e in current if e["event"] == "push"]
                if written and (not answered or written[-1]["captured_at"] >= answered[-1]):
                    steps[island] = written[-1]["step"]
            if len(steps) == len(islands):
                return steps
            if time.monotonic() > deadline or self.cluster.done.wait(0.05):
                return None

    def _inject(self, fault: Fault) -> None:
        c, d = self.cluster, fault.detail
        if fault.kind == "kill_island":
            if fault.when == "checkpointed":
                d["checkpointed"] = self._wait_checkpointed(fault.targets, MERGE_WAIT_S)
            gone = [i for i in fault.targets if i in c.finished or i in c.down]
            if gone:  # finished its run, or down from another fault: nothing to kill
                fault.injected_at_s, d["skipped"] = None, f"{', '.join(gone)} finished or already down"
                return
            if fault.when == "checkpointed":
                if d["checkpointed"] is None:
                    raise TimeoutError(f"{', '.join(fault.targets)} wrote no local checkpoint within "
                                       f"{MERGE_WAIT_S:.0f}s of the fault's time")
                fault.injected_at_s = self.now()
            d["killed_at"] = time.time()
            for island in fault.targets:
                c.kill_island(island)
            time.sleep(fault.duration_s)
            for island in fault.targets:
                c.restart_island(island)
            d["restarted_at"] = time.time()
        elif fault.kind == "kill_coordinator":
            if fault.when == "merging":
                d["writing"] = c.wait_commit_writing(timeout_s=MERGE_WAIT_S)
                if d["writing"] is None:
                    raise TimeoutError(f"no commit began within {MERGE_WAIT_S:.0f}s of the fault's time")
                fault.injected_at_s = self.now()
            d["name"], d["port"] = c.coordinator(fault.target)
            d["killed_at"] = time.time()
            d["mode"] = c.kill_coordinator(fault.target, probe=fault.when != "merging")
            d["version_at_kill"] = getattr(c, "version_at_kill", None)
            if d["mode"] == "restart" or fault.target == "standby":
                time.sleep(fault.duration_s)
                c.restart_coordinator(d["name"], d["port"])
        elif fault.kind == "pause_coordinator":
            d["name"], d["port"] = c.coordinator(fault.target)
            pid = c.pid(d["name"])
            d["paused_at"] = time.time()
            signal_group(pid, signal.SIGSTOP)
            try:
                elected = c.wait_leader(after=d["paused_at"], timeout_s=fault.duration_s) \
                    if fault.target == "leader" else None
                if elected is not None:
                    d["takeover_s"] = round(elected - d["paused_at"], 2)
                time.sleep(max(0.0, d["paused_at"] + fault.duration_s - time.time()))
            finally:
                signal_group(pid, signal.SIGCONT)
                d["woke_at"] = time.time()
        elif fault.kind == "partition":
            d["from"] = time.time()
            for island in fault.targets:
                for link in c.links(island):
                    link.partition(True)
            time.sleep(fault.duration_s)
            for island in fault.targets:
                for link in c.links(island):
                    link.partition(False)
            d["to"] = time.time()
        elif fault.kind in ("kill_etcd", "etcd_outage"):
            d["killed_at"] = time.time()
            c.kill_etcd()
            if self.cluster.done.wait(fault.duration_s):  # the islands finished: no point in waiting
                d["cut_short_at_s"] = round(time.time() - d["killed_at"], 2)
            down_before, ready_at = c.restart_etcd()
            d.update(down_before=down_before, ready_at=ready_at)
            elected = c.wait_leader(after=down_before)
            if elected is not None:
                d["elected_after_ready_s"] = round(elected - down_before, 2)
        elif fault.kind == "cut_leader_etcd":
            link, d["leader"] = c.leader_etcd_link()
            d["from"] = time.time()
            link.partition(True, drop=True)
            elected = c.wait_leader(after=d["from"], timeout_s=fault.duration_s)
            if elected is not None:
                d["takeover_s"] = round(elected - d["from"], 2)
            time.sleep(max(0.0, d["from"] + fault.duration_s - time.time()))
            link.partition(False)
            d["to"] = time.time()
        elif fault.kind == "term_coordinator":
            d["signalled_at"] = time.time()
            d.update(c.term_coordinator(fault.target))
            if d["mode"] == "handover" and fault.target == "leader":
                elected = c.wait_leader(after=d["signalled_at"])
                if elected is not None:
                    d["takeover_s"] = round(elected - d["signalled_at"], 2)
            time.sleep(fault.duration_s)
            c.restart_coordinator(d["name"], d["port"])
        elif fault.kind == "slow":
            threads = [threading.Thread(target=self._slow, args=(fault, island), daemon=True)
                       for island in fault.targets]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elif fault.kind == "corrupt":
            d["armed_at"] = time.time()
            for island in fault.targets:
                c.links(island)[c.leader_index()].corrupt_next()
        else:
            raise ValueError(f"unknown fault kind {fault.kind}")

    def _slow(self, fault: Fault, island: str) -> None:
        """Run the island 1/SLOW_FACTOR of the time: SIGSTOP for (k-1)/k of every period."""
        pid = self.cluster.island_pid(island)
        period = self.cfg.slow_period_s
        end = time.monotonic() + fault.duration_s
        with self._lock:
            intervals = self.stopped.setdefault(island, [])
        fault.detail["from"] = time.time()
        mine: list[tuple[float, float]] = []
        while time.monotonic() < end and not self.cluster.done.is_set():
            stopped_at = time.time()
            if not signal_group(pid, signal.SIGSTOP):
                break
            time.sleep(period * (SLOW_FACTOR - 1) / SLOW_FACTOR)
            signal_group(pid, signal.SIGCONT)
            mine.append((stopped_at, time.time()))
            time.sleep(period / SLOW_FACTOR)
        signal_group(pid, signal.SIGCONT)
        with self._lock:
            intervals.extend(mine)
            fault.detail["to"] = time.time()
            fault.detail["stopped_s"] = round(fault.detail.get("stopped_s", 0.0) + sum(b - a for a, b in mine), 2)

    def report(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.faults]


@dataclass
class RunChaosConfig(SimConfig):
    """A sim job plus the `[faults]` table."""

    faults: FaultsSection = field(default_factory=FaultsSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.faults.failover not in ("auto", "etcd", "restart"):
            raise ConfigError(f"faults.failover must be auto, etcd or restart, got {self.faults.failover!r}")
        if self.faults.failover == "etcd" and shutil.which("etcd") is None:
            raise ConfigError("faults.failover = etcd needs an etcd binary on PATH (apt-get install etcd-server)")
        if self.sim.islands < 3:
            raise ConfigError(f"the chaos run needs sim.islands >= 3 (got {self.sim.islands})")

    @property
    def use_etcd(self) -> bool:
        return self.faults.failover == "etcd" or (self.faults.failover == "auto" and bool(shutil.which("etcd")))


def handles(preset: str) -> bool:
    """Is `preset` one of these runs (configs/chaos-PRESET.toml exists, or it has a [faults] table)?
    The island presets (a [chaos] table: a rank killed inside an island) belong to sim/island_faults.py."""
    if not preset.endswith(".toml") and (cfglib.configs_dir() / f"chaos-{preset}.toml").is_file():
        return True
    try:
        return "faults" in cfglib.load_preset(preset)
    except ConfigError:
        return False


def load_config(preset: str, overrides: list[str]) -> RunChaosConfig:
    """`ci` means configs/chaos-ci.toml where it exists (the ci run, set up for faults). The preset's
    schedule is read here too, so a broken one stops the command before anything runs."""
    if not preset.endswith(".toml") and (cfglib.configs_dir() / f"chaos-{preset}.toml").is_file():
        preset = f"chaos-{preset}"
    cfg = cfglib.load(RunChaosConfig, preset, overrides)
    load_schedule(cfg.faults.schedule)
    return cfg


def start_after(acks: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The first process start an island logged after wall time `t` (a replacement), or None."""
    return next((a for a in acks if a["event"] == "start" and a["t"] > t), None)
