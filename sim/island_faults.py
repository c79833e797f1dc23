"""Faults inside an island (`archipelago chaos --preset island-ci`): a rank of a replica group killed
and restarted, checked end to end.

The run is `archipelago sim` on islands of replica groups (e.g. `island-parallel`); while it
runs, the injector

    1. waits until island I has pushed `kill_after_pushes` pseudo-gradients,
    2. SIGKILLs rank R of its replica group G by PID (the island launcher then stops the group's
       other ranks: a group fails as a unit, as under torchelastic),
    3. waits until the island has pushed `restart_after_pushes` more while G is down, and asks the
       island's gateway to start G again (`POST /groups/G/restart`),
    4. waits until G has healed from its live peer (torchft's state transfer).

The report (`chaos_fields`) adds what the run must have kept: the island went on pushing while G
was down (`pushes_while_down`, each one applied by the coordinator); no push the coordinator
acknowledged is missing from the global model (`updates_lost`, from the coordinator's sqlite state
against the islands' push logs); the healed group holds its peer's state bit for bit (digests of
each rank's shard at the transfer, and of the full model at every later sync point, where both
groups post it). The faults across islands and the coordinator are sim/run_faults.py's.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archipelago.config import ConfigError
from archipelago.console import console
from sim.run import SimConfig


@dataclass
class ChaosSection:
    """Which rank to kill, and when (counted in the target island's acknowledged pushes)."""

    island: int = 0
    group: int = 1
    rank: int = 0
    kill_after_pushes: int = 1
    restart_after_pushes: int = 1  # pushes the island makes with the group down before it restarts
    timeout_s: float = 1200.0  # for each stage of the injection


@dataclass
class IslandChaosConfig(SimConfig):
    chaos: ChaosSection = field(default_factory=ChaosSection)


def check_chaos(cfg: IslandChaosConfig) -> None:
    """The `[chaos]` table against the run's layout (here, not in `__post_init__`: the simulation
    derives one-process copies of the config, which have no replica groups)."""
    c = cfg.chaos
    if cfg.island.num_replica_groups < 2:
        raise ConfigError("chaos needs islands of at least 2 replica groups (island.num_replica_groups)")
    if not 0 <= c.island < cfg.sim.islands:
        raise ConfigError(f"chaos.island must be in [0, {cfg.sim.islands}), got {c.island}")
    if not 0 <= c.group < cfg.island.num_replica_groups:
        raise ConfigError(f"chaos.group must be in [0, {cfg.island.num_replica_groups}), got {c.group}")
    if not 0 <= c.rank < cfg.parallel.num_ranks:
        raise ConfigError(f"chaos.rank must be in [0, {cfg.parallel.num_ranks}), got {c.rank}")
    if c.kill_after_pushes < 0 or c.restart_after_pushes < 1:
        raise ConfigError("chaos.kill_after_pushes must be >= 0 and chaos.restart_after_pushes >= 1")


class IslandFaultInjector:
    """The fault injector thread; `record` is what it did, `error` why it stopped short."""

    def __init__(self, cfg: IslandChaosConfig, out: Path) -> None:
        self.c = cfg.chaos
        self.status_path = out / f"island-{self.c.island}.status.json"
        self.record: dict[str, Any] = {"island": f"island-{self.c.island}", "group": self.c.group,
                                       "rank": self.c.rank}
        self.error: str | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> IslandFaultInjector:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)

    def _status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _wait(self, what: str, ready) -> dict[str, Any]:
        deadline = time.monotonic() + self.c.timeout_s
        while not self.stop_event.wait(0.2):
            status = self._status()
            if status is not None:
                if ready(status):
                    return status
                if status.get("final"):
                    raise RuntimeError(f"the island finished before {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.c.timeout_s:g}s for {what}")
        raise RuntimeError(f"stopped while waiting for {what}")

    def _run(self) -> None:
        try:
            self._inject()
        except Exception as exc:  # reported, and the run's checks then fail
            self.error = f"{type(exc).__name__}: {exc}"

    def _inject(self) -> None:
        c, g = self.c, str(self.c.group)
        status = self._wait(f"{c.kill_after_pushes} pushes with group {c.group} running", lambda s: (
            s.get("pushes", 0) >= c.kill_after_pushes and s["groups"].get(g, {}).get("state") == "running"))
        pid = status["groups"][g]["pids"][c.rank]
        os.kill(pid, signal.SIGKILL)
        self.record.update({"pid": pid, "incarnation": status["groups"][g]["incarnation"], "t_kill": time.time(),
                            "pushes_at_kill": status.get("pushes", 0), "step_at_kill": status.get("step", 0)})
        console.print(f"[bold red]chaos[/]: SIGKILL rank {c.rank} (pid {pid}) of replica group {c.group} "
                      f"of island-{c.island} after {status.get('pushes', 0)} pushes")
        status = self._wait(f"group {c.group} to be reported down", lambda s: s["groups"][g]["state"] != "running"
                            or s["groups"][g]["incarnation"] > self.record["incarnation"])
        self.record["t_down"] = time.time()
        target = self.record["pushes_at_kill"] + c.restart_after_pushes
        status = self._wait(f"{target} pushes with group {c.group} down", lambda s: s.get("pushes", 0) >= target)
        self.record.update({"t_restart": time.time(), "pushes_at_restart": status.get("pushes", 0)})
        if status["groups"][g]["state"] == "down":
            with urllib.request.urlopen(urllib.request.Request(
                    f"{status['gateway']}/groups/{c.group}/restart", data=b"", method="POST"), timeout=30) as r:
                self.record["restart_reply"] = r.read().decode()
        console.print(f"[bold green]chaos[/]: restarting replica group {c.group} of island-{c.island} after "
                      f"{status.get('pushes', 0)} pushes")
        self._wait(f"group {c.group} to heal from a peer", lambda s: any(
            e.get("kind") == "healed" and e.get("group") == c.group and e["t"] >= self.record["t_restart"]
            for e in s.get("events", [])))
        self.record["t_healed"] = time.time()


def applied_keys(coord_dir: Path) -> set[tuple[str, int, int]]:
    """(island, round, fragment) of every push in a committed version, from the coordinator's state."""
    db = sqlite3.connect(f"file:{coord_dir / 'state.sqlite'}?mode=ro", uri=True)
    try:
        return {(i, int(r), int(f)) for i, r, f in db.execute("SELECT island_id, round, fragment FROM applied")}
    finally:
        db.close()


def chaos_fields(cfg: IslandChaosConfig, out: Path, injector: IslandFaultInjector) -> dict[str, Any]:
    c, rec = cfg.chaos, injector.record
    islands = {f"island-{i}": json.loads((out / f"island-{i}.json").read_text()) for i in range(cfg.sim.islands)}
    applied = applied_keys(out / "coordinator")
    acked = [(name, p["round"], p["fragment"], p["t"]) for name, r in islands.items() for p in r["push_log"]]
    lost = [{"island": i, "round": r, "fragment": f} for i, r, f, _ in acked if (i, r, f) not in applied]
    target = islands[rec["island"]]
    t_kill, t_restart = rec.get("t_kill", float("inf")), rec.get("t_restart", float("-inf"))
    while_down = [(i, r, f) for i, r, f, t in acked if i == rec["island"] and t_kill < t < t_restart]
    heals = [h for h in target["heals"] if h["group"] == c.group and h.get("t", 0) >= t_restart]
    healed_step = min((h["step"] for h in heals), default=None)
    after = [s for s in target["sync_digests"]
             if healed_step is not None and s["step"] >= healed_step and str(c.group) in s["groups"]]
    report = {
        "killed": rec,
        "injector_error": injector.error,
        "pushes_while_down": len(while_down),
        "pushes_while_down_applied": sum(1 for k in while_down if k in applied),
        "acknowledged_pushes": len(acked),
        "updates_lost": len(lost), "lost_pushes": lost,
        "recovery_digests": [{k: h[k] for k in ("rank", "from_step", "step", "peer_sha256", "own_sha256")}
                             for h in heals],
        "recovered_bit_identical": bool(heals) and all(h["peer_sha256"] == h["own_sha256"] for h in heals),
        "syncs_after_recovery": after,
        "recovered_equals_peer_at_sync": bool(after) and all(s["identical"] and len(s["groups"]) > 1
                                                            for s in after),
    }
    report["checks"] = {
        "injected": injector.error is None,
        "intra_island_failures>=1": target["intra_island_failures"] >= 1,
        "intra_island_recoveries>=1": target["intra_island_recoveries"] >= 1,
        "pushed_while_down": report["pushes_while_down"] >= 1
        and report["pushes_while_down_applied"] == report["pushes_while_down"],
        "updates_lost==0": not lost,
        "recovered_bit_identical": report["recovered_bit_identical"],
        "recovered_equals_peer_at_sync": report["recovered_equals_peer_at_sync"],
    }
    report["passed"] = all(report["checks"].values())
    return report
