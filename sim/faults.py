"""Faults for the chaos runs: a seeded schedule, the injector that carries it out on real processes
and links, and the model of synchronous data parallel under the same failure trace.

Schedule. `schedule()` places one fault of each kind at fixed fractions of the expected run time
(the fault-free run's), each moved by a seeded jitter; the islands hit are drawn with the same seed.
The schedule and what actually happened (injection and recovery times) go into the report.

    kill_island       SIGKILL an island's process group; restart it `restart_after_s` later
    kill_coordinator  SIGKILL the leading coordinator: a standby takes over (etcd) or it is restarted
                      on its state directory after `restart_after_s`
    partition         cut an island's link (resets, refused connections) for `duration_s`
    slow              slow an island 5×: SIGSTOP/SIGCONT, running 1 of every 5 periods, for `duration_s`
    corrupt           flip a byte of the next large segment an island's link carries up (a push)

Data-parallel model. Synchronous data parallel over the same workers for the same wall time, with
one all-reduce per step, stops as a whole whenever any worker, its link or the job's master fails:
every failure in the trace (a killed island, a killed coordinator standing for the job's master, a
partition, a corrupted all-reduce payload that fails its checksum) stalls every worker until the
job restarts from its last checkpoint, which loses the steps since that checkpoint and costs the
restart time (measured here: the time from killing an island to its replacement's first step). A
partition stalls the job for its duration before the restart. A 5× straggler sets the pace of every
worker while it is slow. Checkpoints are taken every `checkpoint_every_s` of progress (by default
one outer round's worth of steps, the cadence at which the coordinator makes its state durable),
for free; the all-reduce itself is free too. Both choices favour the baseline. Its goodput is the
progress it keeps (seconds of full-speed compute) over the wall time.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("kill_island", "partition", "kill_coordinator", "slow", "corrupt")
SLOW_FACTOR = 5


@dataclass
class FaultsSection:
    """The `[faults]` table: when each fault happens, as a fraction of the expected run time."""

    kill_island_at: float = 0.15
    partition_at: float = 0.30
    kill_coordinator_at: float = 0.45
    slow_at: float = 0.55
    corrupt_at: float = 0.75
    jitter: float = 0.03  # ± this fraction, drawn with the seed
    restart_after_s: float = 1.0  # a killed island (or, without etcd, coordinator) comes back after
    partition_s: float = 4.0
    slow_fraction: float = 0.12  # the slow window, as a fraction of the expected run time
    slow_period_s: float = 0.5  # SIGSTOP/SIGCONT period; the island runs 1/5 of it
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
    faults = [Fault("kill_island", when(cfg.kill_island_at), kill, cfg.restart_after_s),
              Fault("partition", when(cfg.partition_at), cut, cfg.partition_s),
              Fault("kill_coordinator", when(cfg.kill_coordinator_at), "coordinator", cfg.restart_after_s),
              Fault("slow", when(cfg.slow_at), slow, round(cfg.slow_fraction * expected_s, 2)),
              Fault("corrupt", when(cfg.corrupt_at), kill)]
    return sorted(faults, key=lambda f: f.at_s)


class Injector:
    """Runs a schedule against a cluster on a background thread.

    `cluster` provides: kill_island(name), restart_island(name), kill_coordinator() -> str (what
    happened: "failover" or "restart"), restart_coordinator(), links(name) -> list of LinkProxy,
    island_pid(name), and `done` (a threading.Event set when the run is over).
    """

    def __init__(self, faults: list[Fault], cluster: Any, t0: float, cfg: FaultsSection) -> None:
        self.faults = faults
        self.cluster = cluster
        self.t0 = t0
        self.cfg = cfg
        self.stopped: dict[str, list[tuple[float, float]]] = {}  # island -> SIGSTOP intervals (wall times)
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="injector", daemon=True)

    def start(self) -> Injector:
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
            if not _signal(pid, signal.SIGSTOP):
                break
            time.sleep(period * (SLOW_FACTOR - 1) / SLOW_FACTOR)
            _signal(pid, signal.SIGCONT)
            intervals.append((stopped_at, time.time()))
            time.sleep(period / SLOW_FACTOR)
        _signal(pid, signal.SIGCONT)
        fault.detail["to"] = time.time()
        fault.detail["stopped_s"] = round(sum(b - a for a, b in intervals), 2)

    def report(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.faults]


def _signal(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False


def overlap(a: tuple[float, float], intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a[1], b) - max(a[0], s)) for s, b in intervals)


def dp_goodput(faults: list[dict[str, Any]], wall_s: float, restart_s: float,
               checkpoint_every_s: float) -> dict[str, Any]:
    """Goodput of synchronous data parallel under this failure trace (see the module docstring).

    `faults` are the report's fault records (injected ones count, at `injected_at_s`); returns the
    goodput and the time lost to each cause.
    """
    events: list[tuple[float, str, float]] = []  # (time, kind, duration)
    for f in faults:
        if f["injected_at_s"] is None:
            continue
        if f["kind"] == "slow":
            events.append((f["injected_at_s"], "slow", f["duration_s"]))
        else:
            stall = f["duration_s"] if f["kind"] == "partition" else 0.0
            events.append((f["injected_at_s"], "fail", stall))
    events.sort()
    t = progress = checkpointed = 0.0
    lost = {"rollback_s": 0.0, "stall_s": 0.0, "straggler_s": 0.0}

    def advance(until: float, rate: float) -> None:
        nonlocal t, progress, checkpointed
        until = min(until, wall_s)
        if until <= t:
            return
        progress += (until - t) * rate
        t = until
        checkpointed = max(checkpointed, (progress // checkpoint_every_s) * checkpoint_every_s)

    for at, kind, duration in events:
        advance(at, 1.0)
        if t >= wall_s:
            break
        if kind == "slow":
            start = t
            advance(at + duration, 1.0 / SLOW_FACTOR)
            lost["straggler_s"] += (t - start) * (1 - 1.0 / SLOW_FACTOR)
        else:
            lost["rollback_s"] += progress - checkpointed
            progress = checkpointed
            stall = min(duration + restart_s, max(0.0, wall_s - t))
            lost["stall_s"] += stall
            t += stall
    advance(wall_s, 1.0)
    return {"goodput": progress / wall_s if wall_s > 0 else 0.0, "progress_s": progress, "wall_s": wall_s,
            "restart_s": restart_s, "checkpoint_every_s": checkpoint_every_s,
            **{k: round(v, 3) for k, v in lost.items()}}


Callback = Callable[[], None]
