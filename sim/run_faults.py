"""Faults across islands and the coordinator (`archipelago chaos --preset ci`): the `[faults]` table,
a seeded schedule, the injector that carries it out on real processes and links, and, after the
run, whether each fault was recovered from.

`schedule()` places one fault of each kind at fixed fractions of the expected run time (the
fault-free run's), each moved by a seeded jitter; the islands hit are drawn with the same seed.
The schedule and what actually happened (injection and recovery times) go into the report.

    kill_island       SIGKILL an island's process group; restart it `restart_after_s` later
    kill_coordinator  SIGKILL the leading coordinator: a standby takes over (etcd) or it is restarted
                      on its state directory after `restart_after_s`
    partition         cut an island's link (resets, refused connections) for `duration_s`
    slow              slow an island 5×: SIGSTOP/SIGCONT, running 1 of every 5 periods, for `duration_s`
    corrupt           flip a byte of the next large segment an island's link carries up (a push)
    kill_etcd         SIGKILL etcd; start it again on its data `etcd_restart_after_s` later
    etcd_outage       the same, for `etcd_outage_s` (90 s: longer than an island's former 60 s patience)
    cut_leader_etcd   drop everything on the leading coordinator's own link to etcd for `etcd_cut_s`
                      (islands still reach it): it must stop at its lease deadline, a standby take over
    term_coordinator  SIGTERM the leading coordinator: it hands over (etcd) and exits 0, and is started
                      again `restart_after_s` later (as a standby, or on its state without etcd)

A `*_at` below 0 leaves that kind out of the schedule; the etcd kinds are out by default (the `ci`
run schedules the first five) and need `failover` etcd.
The processes and links they act on are sim/chaos_cluster.py's `Cluster`; the faults inside one
island (a rank of a replica group) are sim/island_faults.py's.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from archipelago import config as cfglib
from archipelago.config import ConfigError
from archipelago.procs import signal_group
from sim.run import SimConfig

if TYPE_CHECKING:
    from sim.chaos_cluster import Cluster

KINDS = ("kill_island", "partition", "kill_coordinator", "slow", "corrupt", "kill_etcd", "etcd_outage",
         "cut_leader_etcd", "term_coordinator")
ETCD_KINDS = ("kill_etcd", "etcd_outage", "cut_leader_etcd")
# kinds after which another coordinator leads (with etcd) or the coordinator came back on its state
FAILOVER_KINDS = ("kill_coordinator", "cut_leader_etcd", "term_coordinator")
SLOW_FACTOR = 5


@dataclass
class FaultsSection:
    """The `[faults]` table: when each fault happens, as a fraction of the expected run time."""

    kill_island_at: float = 0.15
    partition_at: float = 0.30
    kill_coordinator_at: float = 0.45
    slow_at: float = 0.55
    corrupt_at: float = 0.75
    # etcd and a clean stop of the leader: off unless a preset schedules them (a negative `*_at`
    # leaves any kind out)
    kill_etcd_at: float = -1.0
    etcd_outage_at: float = -1.0
    cut_leader_etcd_at: float = -1.0
    term_coordinator_at: float = -1.0
    jitter: float = 0.03  # ± this fraction, drawn with the seed
    restart_after_s: float = 1.0  # a killed island (or, without etcd, coordinator) comes back after
    partition_s: float = 4.0
    slow_fraction: float = 0.12  # the slow window, as a fraction of the expected run time
    slow_period_s: float = 0.5  # SIGSTOP/SIGCONT period; the island runs 1/5 of it
    etcd_restart_after_s: float = 5.0  # kill_etcd: down this long
    etcd_outage_s: float = 90.0  # etcd_outage: down this long
    etcd_cut_s: float = 8.0  # cut_leader_etcd: the leader's link to etcd drops everything this long
    failover: str = "auto"  # auto (etcd if on PATH) | etcd | restart
    etcd_lease_ttl_s: int = 2
    dp_checkpoint_every_s: float = 0.0  # 0: one outer round of steps (measured)


@dataclass
class Fault:
    kind: str
    at_s: float  # seconds after the run's training started
    target: str  # "island-I" or "coordinator"
    duration_s: float = 0.0
    injected_at_s: float | None = None
    ended_at_s: float | None = None  # restart / heal / link restored
    recovered: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


def schedule(cfg: FaultsSection, seed: int, islands: int, expected_s: float) -> list[Fault]:
    rng = random.Random(seed)

    def when(fraction: float) -> float:
        return round(max(0.0, fraction + rng.uniform(-cfg.jitter, cfg.jitter)) * expected_s, 2)

    picks = rng.sample(range(islands), k=min(islands, 3))
    kill, cut, slow = (f"island-{picks[i % len(picks)]}" for i in range(3))
    plan = [("kill_island", cfg.kill_island_at, kill, cfg.restart_after_s),
            ("partition", cfg.partition_at, cut, cfg.partition_s),
            ("kill_coordinator", cfg.kill_coordinator_at, "coordinator", cfg.restart_after_s),
            ("slow", cfg.slow_at, slow, round(cfg.slow_fraction * expected_s, 2)),
            ("corrupt", cfg.corrupt_at, kill, 0.0),
            ("kill_etcd", cfg.kill_etcd_at, "etcd", cfg.etcd_restart_after_s),
            ("etcd_outage", cfg.etcd_outage_at, "etcd", cfg.etcd_outage_s),
            ("cut_leader_etcd", cfg.cut_leader_etcd_at, "coordinator", cfg.etcd_cut_s),
            ("term_coordinator", cfg.term_coordinator_at, "coordinator", cfg.restart_after_s)]
    # every kind draws its jitter, scheduled or not, so adding one leaves the others' times as they were
    faults = [Fault(kind, at, target, duration) for kind, fraction, target, duration in plan
              for at in [when(fraction)] if fraction >= 0]
    return sorted(faults, key=lambda f: f.at_s)


class RunFaultInjector:
    """Runs a schedule against a cluster on a background thread.

    `cluster` provides: kill_island(name), restart_island(name), kill_coordinator() -> str (what
    happened: "failover" or "restart"), restart_coordinator(name=None, port=None), links(name) -> list
    of LinkProxy, island_pid(name), and `done` (a threading.Event set when the run is over); for the
    etcd kinds also kill_etcd(), restart_etcd() -> (last probe down, first probe answered),
    wait_leader(after, timeout_s) -> the time a coordinator was elected, leader_etcd_link() ->
    (LinkProxy, name), term_coordinator() -> {"mode", "name", "port", "exit_status"}.
    """

    def __init__(self, faults: list[Fault], cluster: Any, t0: float, cfg: FaultsSection) -> None:
        self.faults = faults
        self.cluster = cluster
        self.t0 = t0
        self.cfg = cfg
        self.stopped: dict[str, list[tuple[float, float]]] = {}  # island -> SIGSTOP intervals (wall times)
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="injector", daemon=True)

    def start(self) -> RunFaultInjector:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _sleep_until(self, at_s: float) -> bool:
        while time.monotonic() - self.t0 < at_s:
            if self.cluster.done.wait(0.05):
                return False
        return True

    def _run(self) -> None:
        for fault in self.faults:
            if not self._sleep_until(fault.at_s):
                return
            fault.injected_at_s = round(time.monotonic() - self.t0, 2)
            try:
                self._inject(fault)
            except Exception as exc:  # recorded in the report; the run goes on
                self.errors.append(f"{fault.kind} on {fault.target}: {exc!r}")
            fault.ended_at_s = round(time.monotonic() - self.t0, 2)

    def _inject(self, fault: Fault) -> None:
        c = self.cluster
        if fault.kind == "kill_island":
            fault.detail["killed_at"] = time.time()
            c.kill_island(fault.target)
            time.sleep(fault.duration_s)
            c.restart_island(fault.target)
            fault.detail["restarted_at"] = time.time()
        elif fault.kind == "kill_coordinator":
            fault.detail["killed_at"] = time.time()
            fault.detail["mode"] = c.kill_coordinator()
            if fault.detail["mode"] == "restart":
                time.sleep(fault.duration_s)
                c.restart_coordinator()
        elif fault.kind == "partition":
            fault.detail["from"] = time.time()
            for link in c.links(fault.target):
                link.partition(True)
            time.sleep(fault.duration_s)
            for link in c.links(fault.target):
                link.partition(False)
            fault.detail["to"] = time.time()
        elif fault.kind in ("kill_etcd", "etcd_outage"):
            fault.detail["killed_at"] = time.time()
            c.kill_etcd()
            if self.cluster.done.wait(fault.duration_s):  # the islands finished: no point in waiting
                fault.detail["cut_short_at_s"] = round(time.time() - fault.detail["killed_at"], 2)
            down_before, ready_at = c.restart_etcd()
            fault.detail.update(down_before=down_before, ready_at=ready_at)
            elected = c.wait_leader(after=down_before)
            if elected is not None:
                fault.detail["elected_after_ready_s"] = round(elected - down_before, 2)
        elif fault.kind == "cut_leader_etcd":
            link, fault.detail["leader"] = c.leader_etcd_link()
            fault.detail["from"] = time.time()
            link.partition(True, drop=True)
            elected = c.wait_leader(after=fault.detail["from"], timeout_s=fault.duration_s)
            if elected is not None:
                fault.detail["takeover_s"] = round(elected - fault.detail["from"], 2)
            time.sleep(max(0.0, fault.detail["from"] + fault.duration_s - time.time()))
            link.partition(False)
            fault.detail["to"] = time.time()
        elif fault.kind == "term_coordinator":
            fault.detail["signalled_at"] = time.time()
            fault.detail.update(c.term_coordinator())
            if fault.detail["mode"] == "handover":
                elected = c.wait_leader(after=fault.detail["signalled_at"])
                if elected is not None:
                    fault.detail["takeover_s"] = round(elected - fault.detail["signalled_at"], 2)
            time.sleep(fault.duration_s)
            c.restart_coordinator(fault.detail["name"], fault.detail["port"])
        elif fault.kind == "slow":
            self._slow(fault)
        elif fault.kind == "corrupt":
            fault.detail["armed_at"] = time.time()
            c.links(fault.target)[c.leader_index()].corrupt_next()
        else:
            raise ValueError(f"unknown fault kind {fault.kind}")

    def _slow(self, fault: Fault) -> None:
        """Run the island 1/SLOW_FACTOR of the time: SIGSTOP for (k-1)/k of every period."""
        pid = self.cluster.island_pid(fault.target)
        period = self.cfg.slow_period_s
        end = time.monotonic() + fault.duration_s
        intervals = self.stopped.setdefault(fault.target, [])
        fault.detail["from"] = time.time()
        while time.monotonic() < end and not self.cluster.done.is_set():
            stopped_at = time.time()
            if not signal_group(pid, signal.SIGSTOP):
                break
            time.sleep(period * (SLOW_FACTOR - 1) / SLOW_FACTOR)
            signal_group(pid, signal.SIGCONT)
            intervals.append((stopped_at, time.time()))
            time.sleep(period / SLOW_FACTOR)
        signal_group(pid, signal.SIGCONT)
        fault.detail["to"] = time.time()
        fault.detail["stopped_s"] = round(sum(b - a for a, b in intervals), 2)

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
        etcd_faults = [k for k in ETCD_KINDS if getattr(self.faults, f"{k}_at") >= 0]
        if etcd_faults and (self.faults.failover == "restart"
                            or (self.faults.failover == "auto" and shutil.which("etcd") is None)):
            raise ConfigError(f"faults {etcd_faults} act on etcd: they need faults.failover = etcd (or auto with "
                              "an etcd binary on PATH)")


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
    """`ci` means configs/chaos-ci.toml where it exists (the ci run, set up for faults)."""
    if not preset.endswith(".toml") and (cfglib.configs_dir() / f"chaos-{preset}.toml").is_file():
        preset = f"chaos-{preset}"
    return cfglib.load(RunChaosConfig, preset, overrides)


def start_after(acks: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The first process start an island logged after wall time `t` (a replacement), or None."""
    return next((a for a in acks if a["event"] == "start" and a["t"] > t), None)


def recovery(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Decide, fault by fault, whether the run recovered from it (with the evidence)."""
    out = []
    cluster: Cluster = run["cluster"]
    for f in run["faults"]:
        f = dict(f)
        target_acks = run["acks"].get(f["target"], [])
        pushed_after = _pushed_after(target_acks)

        if f["injected_at_s"] is None:
            f["recovered"] = False
        elif f["kind"] == "kill_island":
            start = start_after(target_acks, f["detail"]["killed_at"])
            f["detail"]["replacement_started_s"] = round(start["t"] - f["detail"]["killed_at"], 2) if start else None
            f["recovered"] = start is not None and pushed_after(start["t"], start["pid"]) \
                and f["target"] in run["finished"]
        elif f["kind"] == "kill_coordinator":
            f["detail"]["version_at_kill"] = getattr(cluster, "version_at_kill", None)
            later = [v for v, row in run["versions"] if row["info"]["time"] > f["detail"]["killed_at"]]
            f["detail"]["versions_after"] = len(later)
            f["recovered"] = bool(later) and min(later) > (f["detail"]["version_at_kill"] or 0)
        elif f["kind"] in ("kill_etcd", "etcd_outage"):
            ready = f["detail"].get("ready_at")
            f["detail"]["versions_after"] = len([v for v, row in run["versions"]
                                                 if ready is not None and row["info"]["time"] > ready])
            elected = f["detail"].get("elected_after_ready_s") is not None
            f["recovered"] = elected and (f["detail"]["versions_after"] > 0 or _all_done(run))
        elif f["kind"] in ("cut_leader_etcd", "term_coordinator"):
            at = f["detail"].get("from", f["detail"].get("signalled_at", 0.0))
            f["detail"]["versions_after"] = len([v for v, row in run["versions"] if row["info"]["time"] > at])
            handed_over = (f["detail"].get("takeover_s") is not None if f["kind"] == "cut_leader_etcd"
                           else f["detail"].get("exit_status") == 0)
            f["recovered"] = handed_over and (f["detail"]["versions_after"] > 0 or _all_done(run))
        elif f["kind"] == "partition":
            f["recovered"] = pushed_after(f["detail"]["to"]) or f["target"] in run["finished"]
        elif f["kind"] == "slow":
            f["recovered"] = f["target"] in run["finished"]
        elif f["kind"] == "corrupt":
            corrupted = sum(p.stats.corrupted for p in cluster.proxies[f["target"]])
            refused = sum(len(re.findall(r"push refused: DATA_LOSS", text)) for name, text in run["logs"].items()
                          if name.startswith("coordinator"))
            f["detail"].update(corrupted_segments=corrupted, data_loss_refusals=refused)
            if not corrupted:
                f["injected_at_s"] = None  # armed, but no push crossed the link afterwards
            f["recovered"] = corrupted > 0 and refused > 0 and pushed_after(f["detail"]["armed_at"])
        out.append(f)
    return out


def _all_done(run: dict[str, Any]) -> bool:
    return len(run["finished"]) == len(run["acks"])


def _pushed_after(acks: list[dict[str, Any]]):
    def pushed_after(t: float, pid: int | None = None) -> bool:
        """Did the island get a push acknowledged after wall time `t` (from process `pid`)?"""
        return any(a["event"] == "push" and a["t"] > t and (pid is None or a["pid"] == pid) for a in acks)

    return pushed_after
