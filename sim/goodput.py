"""Goodput under faults: what the chaos run's islands kept, and what synchronous data parallel would
keep under the same failure trace (`archipelago chaos --preset ci`).

Chaos run. From each island's push log (`diloco.ack_log`): every push the coordinator acknowledged,
with the seconds of inner compute that produced it; from the coordinator's state store: the push
keys of every committed version (sim/chaos_cluster.py reads both).

    updates_lost            acknowledged pushes that no committed version applied
    updates_applied_twice   push keys listed by more than one committed version
    goodput                 compute seconds of applied pushes (less any time the island was
                            SIGSTOPped inside them) / island-seconds from the first island's start
                            to each island's exit
    goodput_breakdown       where the other island-seconds went (`breakdown`): work a kill destroyed,
                            restarts, SIGSTOPped time, pushes not applied, and the rest
    dp_goodput_same_trace   `dp_goodput`, with this run's step time, round length and measured island
                            restart time

Data-parallel model. Synchronous data parallel over the same workers for the same wall time, with
one all-reduce per step, stops as a whole whenever any worker, its link or the job's master fails:
every failure in the trace (a killed island, a killed coordinator standing for the job's master, a
partition, a corrupted all-reduce payload that fails its checksum) stalls every worker until the
job restarts from its last checkpoint, which loses the steps since that checkpoint and costs the
restart time (measured here: the time from killing an island to its replacement's first step); a
SIGTERM of the coordinator counts as such a failure too, while etcd faults do not stop a running
data-parallel job (its rendezvous store matters only when it restarts) and count for nothing, nor
do faults of a standby coordinator (data parallel has none). A partition, and a paused coordinator
(its master, SIGSTOPped), stall the job for their duration before the restart. A 5× straggler sets the pace of every
worker while it is slow. Checkpoints are taken every `checkpoint_every_s` of progress (by default
one outer round's worth of steps, the cadence at which the coordinator makes its state durable),
for free; the all-reduce itself is free too. Both choices favour the baseline. Its goodput is the
progress it keeps (seconds of full-speed compute) over the wall time.
"""

from __future__ import annotations

import statistics
from typing import Any

from sim.run_faults import ETCD_KINDS, SLOW_FACTOR, RunChaosConfig, start_after


def accounting(run: dict[str, Any]) -> dict[str, Any]:
    """Lost and doubly applied updates, and goodput, from push logs against committed state."""
    pushes = [a for acks in run["acks"].values() for a in acks if a["event"] == "push"]
    acked = {(a["island"], a["round"], a["fragment"]) for a in pushes}
    listed = [tuple(k) for _, row in run["versions"] for k in row["keys"]]
    twice = len(listed) - len(set(listed))
    useful = 0.0
    for a in pushes:
        if (a["island"], a["round"], a["fragment"]) not in run["applied"]:
            continue
        window = (a["synced_at"] - a["compute_s"], a["synced_at"])
        stopped = overlap(window, run["stopped"].get(a["island"], []))
        useful += max(0.0, a["compute_s"] - stopped)
    available = sum(end - run["t_start"] for end in run["finished"].values())
    return {"updates_acknowledged": len(acked), "updates_lost": len(acked - run["applied"]),
            "lost_keys": sorted(acked - run["applied"]), "updates_applied_twice": twice,
            "useful_compute_s": useful, "available_s": available,
            "goodput": useful / available if available else 0.0,
            "wall_s": max(run["finished"].values()) - run["t_start"],
            "goodput_breakdown": breakdown(run, useful, available)}


def breakdown(run: dict[str, Any], useful: float, available: float) -> dict[str, float]:
    """Where the island-seconds that did not reach the global model went (seconds):

        killed_work_s   a killed process's training since its last acknowledged push, or its start, or
                        the local checkpoint its replacement resumed from (island/local_checkpoint.py)
        restart_s       from a kill to the replacement's start (registered, θ_b pulled)
        stopped_s       SIGSTOPped time of the slowed island
        not_applied_s   compute of pushes that were acknowledged but not applied, or dropped as stale
        other_s         the rest: process start and exit, syncs that blocked, evaluation
    """
    killed_work = restart = 0.0
    for f in run.get("faults", []):
        if f["kind"] != "kill_island" or f["injected_at_s"] is None:
            continue
        killed_at = f["detail"]["killed_at"]
        for island in [f["target"]] if isinstance(f["target"], str) else f["target"]:
            acks = run["acks"].get(island, [])
            before = [a for a in acks if a["t"] <= killed_at]
            replacement = start_after(acks, killed_at)
            resumed = (replacement or {}).get("resumed_from")
            if before:
                pid = before[-1]["pid"]
                marks = [a["synced_at"] if a["event"] == "push" else a["t"] for a in before
                         if a["pid"] == pid and a["event"] in ("push", "start")]
                marks += [resumed["captured_at"]] if resumed else []
                killed_work += max(0.0, killed_at - max(marks)) if marks else 0.0
            restart += replacement["t"] - killed_at if replacement else 0.0
    stopped = sum(b - a for intervals in run.get("stopped", {}).values() for a, b in intervals)
    not_applied = sum(a["compute_s"] for acks in run["acks"].values() for a in acks
                      if (a["event"] == "push" and (a["island"], a["round"], a["fragment"]) not in run["applied"])
                      or a["event"] == "dropped")
    parts = {"killed_work_s": killed_work, "restart_s": restart, "stopped_s": stopped, "not_applied_s": not_applied}
    parts["other_s"] = available - useful - sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


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
        # etcd faults stop no running job; nothing stands for a standby coordinator in data parallel
        if f["injected_at_s"] is None or f["kind"] in ETCD_KINDS or f.get("target") == "standby":
            continue
        if f["kind"] == "slow":
            events.append((f["injected_at_s"], "slow", f["duration_s"]))
        else:
            stall = f["duration_s"] if f["kind"] in ("partition", "pause_coordinator") else 0.0
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


def step_seconds(run: dict[str, Any], cfg: RunChaosConfig) -> float:
    """Measured seconds of one inner step in the fault-free run (compute only)."""
    pushes = [a for acks in run["acks"].values() for a in acks if a["event"] == "push" and a["compute_s"] > 0]
    steps = cfg.diloco.inner_steps / cfg.diloco.fragments  # a push's steps, on average
    return statistics.median(a["compute_s"] for a in pushes) / steps if pushes else 0.0
