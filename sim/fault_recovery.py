"""After a chaos run: whether the run recovered from each fault, when, and the evidence.

`recovered_at_s` (seconds from the start of training, as `injected_at_s`) is when the fault's target
was doing its work again:

    kill_island        the replacement process's first acknowledged push (each island's, the last)
    kill_coordinator   the first commit after the kill (the standby's, or the restarted one's)
    pause_coordinator  the first commit after the pause, by the standby that took over; the paused
                       coordinator, once woken, must not commit or accept a push, and must step down
                       (the log line that says so, or its exit, is the evidence)
    term_coordinator,  the first commit after the fault
    cut_leader_etcd
    kill_etcd,         the first commit after etcd answered again (or the election, if the islands
    etcd_outage        had finished meanwhile)
    partition          the island's first acknowledged push after its link came back
    slow               the end of the slow window (recovered: the island finished its run)
    corrupt            the island's first acknowledged push after the corrupted one was refused
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.run_faults import start_after

if TYPE_CHECKING:
    from sim.chaos_cluster import Cluster

TEMP_VERSION = re.compile(r"^\.v(\d+)")
STEPPED_DOWN = ("lost leadership", "no longer the leader", "not accepting pushes or commits")


def _targets(f: dict[str, Any]) -> list[str]:
    return [f["target"]] if isinstance(f["target"], str) else list(f["target"])


def recovery(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Decide, fault by fault, whether the run recovered from it, and when (with the evidence)."""
    out = []
    for f in run["faults"]:
        f = dict(f, detail=dict(f["detail"]))
        if f["injected_at_s"] is None:
            f["recovered"] = False
        else:
            wall = _KINDS[f["kind"]](f, run)
            f["recovered_at_s"] = round(wall - run["t_start"], 2) if wall is not None else None
        out.append(f)
    return out


def _pushes(run: dict[str, Any], island: str, after: float, pid: int | None = None) -> list[dict[str, Any]]:
    """The island's acknowledged pushes after wall time `after` (from process `pid`), in order."""
    return [a for a in run["acks"].get(island, []) if a["event"] == "push" and a["t"] > after
            and (pid is None or a["pid"] == pid)]


def _commits(run: dict[str, Any], after: float) -> list[tuple[int, float]]:
    return sorted((v, row["info"]["time"]) for v, row in run["versions"] if row["info"]["time"] > after)


def _all_done(run: dict[str, Any]) -> bool:
    return len(run["finished"]) == len(run["acks"])


def _log(run: dict[str, Any], name: str) -> Path:
    cluster: Cluster = run["cluster"]
    return cluster.out / f"{name}.log"


def _kill_island(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    killed_at, ok, last = f["detail"]["killed_at"], True, None
    per_island = {}
    for island in _targets(f):
        start = start_after(run["acks"].get(island, []), killed_at)
        pushes = _pushes(run, island, start["t"], start["pid"]) if start else []
        per_island[island] = {"replacement_started_s": round(start["t"] - killed_at, 2) if start else None,
                              "resumed_from": start.get("resumed_from") if start else None,
                              "first_push_after_s": round(pushes[0]["t"] - killed_at, 2) if pushes else None}
        ok = ok and bool(pushes) and island in run["finished"]
        last = max(last or 0.0, pushes[0]["t"]) if pushes else last
    f["detail"]["islands"] = per_island
    if len(per_island) == 1:  # the fields of one island at the top, as before
        f["detail"].update(next(iter(per_island.values())))
    f["recovered"] = ok
    return last if ok else None


def _kill_coordinator(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    d = f["detail"]
    later = _commits(run, d["killed_at"])
    d["versions_after"] = len(later)
    if d.get("writing"):
        m = TEMP_VERSION.match(Path(d["writing"]).name)
        interrupted = int(m.group(1)) if m else None
        committed = [t for v, t in later if v == interrupted]
        if interrupted is not None and d.get("version_at_kill") is None:
            d["version_at_kill"] = interrupted - 1
        d.update(interrupted_version=interrupted, left_behind=Path(d["writing"]).exists(),
                 interrupted_version_committed_after_s=round(committed[0] - d["killed_at"], 2) if committed else None)
    f["recovered"] = bool(later) and later[0][0] > (d.get("version_at_kill") or 0) or (
        f["target"] == "standby" and (bool(later) or _all_done(run)))
    return later[0][1] if later else None


def _pause_coordinator(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    from sim.chaos_cluster import log_times

    d = f["detail"]
    log = _log(run, d["name"])
    woke = d.get("woke_at", 0.0)
    down = sorted(t for text in STEPPED_DOWN for t in log_times(log, text) if t >= d["paused_at"])
    zombie = {
        "woke_after_s": round(woke - d["paused_at"], 2),
        "lease_lapsed_before_wake": d.get("takeover_s") is not None and d["paused_at"] + d["takeover_s"] < woke,
        "stepped_down_after_wake_s": round(down[0] - woke, 2) if down else None,
        "commits_after_wake": len([t for t in log_times(log, ": fragment ") if t >= woke]),
        "pushes_accepted_after_wake": len([t for t in log_times(log, "push accepted") if t >= woke]),
        "exit_status": run["cluster"].group.procs[d["name"]].poll(),
    }
    d["zombie"] = zombie
    later = _commits(run, d["paused_at"])
    d["versions_after"] = len(later)
    refused = zombie["commits_after_wake"] == 0 and zombie["pushes_accepted_after_wake"] == 0 and (
        zombie["stepped_down_after_wake_s"] is not None or zombie["exit_status"] is not None)
    took_over = f["target"] != "leader" or d.get("takeover_s") is not None
    f["recovered"] = took_over and refused and (bool(later) or _all_done(run))
    return later[0][1] if later else None


def _handover(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    d = f["detail"]
    at = d.get("from", d.get("signalled_at", 0.0))
    later = _commits(run, at)
    d["versions_after"] = len(later)
    handed_over = (d.get("takeover_s") is not None if f["kind"] == "cut_leader_etcd" or f["target"] == "leader"
                   else True) and (f["kind"] == "cut_leader_etcd" or d.get("exit_status") == 0)
    f["recovered"] = handed_over and (bool(later) or _all_done(run))
    if later:
        return later[0][1]
    return at + d["takeover_s"] if d.get("takeover_s") is not None else None


def _etcd(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    d = f["detail"]
    ready = d.get("ready_at")
    later = _commits(run, ready) if ready is not None else []
    d["versions_after"] = len(later)
    elected = d.get("elected_after_ready_s") is not None
    f["recovered"] = elected and (bool(later) or _all_done(run))
    if later:
        return later[0][1]
    return d["down_before"] + d["elected_after_ready_s"] if elected else None


def _partition(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    firsts = []
    for island in _targets(f):
        pushes = _pushes(run, island, f["detail"]["to"])
        if pushes:
            firsts.append(pushes[0]["t"])
        elif island not in run["finished"]:
            f["recovered"] = False
            return None
        else:
            firsts.append(f["detail"]["to"])
    f["recovered"] = True
    return max(firsts)


def _slow(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    f["recovered"] = all(island in run["finished"] for island in _targets(f))
    return f["detail"].get("to")


def _corrupt(f: dict[str, Any], run: dict[str, Any]) -> float | None:
    from sim.chaos_cluster import log_times

    cluster: Cluster = run["cluster"]
    d = f["detail"]
    corrupted = sum(p.stats.corrupted for island in _targets(f) for p in cluster.proxies[island])
    refusals = sorted(t for name in run["logs"] if name.startswith("coordinator")
                      for t in log_times(_log(run, name), "push refused: DATA_LOSS") if t >= d["armed_at"])
    d.update(corrupted_segments=corrupted, data_loss_refusals=len(refusals))
    if not corrupted:
        f["injected_at_s"] = None  # armed, but no push crossed the link afterwards
        f["recovered"] = False
        return None
    after = refusals[0] if refusals else d["armed_at"]
    firsts = [p[0]["t"] for island in _targets(f) if (p := _pushes(run, island, after))]
    f["recovered"] = bool(refusals) and bool(firsts)
    return max(firsts) if firsts else None


_KINDS = {"kill_island": _kill_island, "kill_coordinator": _kill_coordinator, "pause_coordinator": _pause_coordinator,
          "term_coordinator": _handover, "cut_leader_etcd": _handover, "kill_etcd": _etcd, "etcd_outage": _etcd,
          "partition": _partition, "slow": _slow, "corrupt": _corrupt}
