"""Prometheus metrics of the coordinator (a private registry, served when `metrics_port` is set).

Three sources (docs/design.md, Observability):
- the round engine tells its observer (`RoundObserver`) of every commit and every guard refusal,
  with the round's contributions and the commit's info (`merge_s`, `update_norm`, staleness);
- the gRPC services count pushes, refusals and bytes as they happen;
- the ticker (`observe`, every ~0.25 s) copies the engine's and membership's state: versions,
  open rounds, live islands, lease expiries, rollbacks (from the engine's history).

Names follow Prometheus' conventions: base units in the name (`_seconds`, `_bytes`), `_total` on
counters (added by the client library), labels only with bounded values (island ids are the run's
islands, fragments the run's fragments, reasons a fixed set); nothing is labelled by round or version.
`islands_progress` is what `coordinator status` reports per island from the same observations.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds: from a millisecond merge on a test model to a half-hour round of a large run.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
MERGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(5, 18))  # 1 KiB .. 16 GiB
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)

# The guard's reasons (coordinator/guard.py) start with one of these; the label is the key.
GUARD_REASONS = {"non-finite aggregate": "non_finite_aggregate", "non-finite outer step": "non_finite_step",
                 "update-norm spike": "update_norm_spike", "loss spike": "loss_spike"}


log = logging.getLogger(__name__)


def never_raises(method: Callable[..., None]) -> Callable[..., None]:
    """An observer runs inside a commit: a failure to count must never fail the commit."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("metrics: %s failed (the round goes on)", method.__name__)

    return guarded


def guard_reason(reason: str) -> str:
    """The bounded label of a guard refusal's reason ("other" for one this table does not know)."""
    return next((label for prefix, label in GUARD_REASONS.items() if reason.startswith(prefix)), "other")


class RoundObserver:
    """What the round engine tells about its rounds (coordinator/rounds.py); this base ignores it."""

    def on_commit(self, fragment: int, round_: int, contributions: list[Any], info: dict[str, Any],
                  opened_at: float) -> None:
        """A version was committed; `opened_at` is the monotonic time of the round's first push."""

    def on_refuse(self, fragment: int, round_: int, contributions: list[Any], event: dict[str, Any]) -> None:
        """The guard refused a round (`event` as recorded in the engine's history)."""


class Metrics(RoundObserver):
    def __init__(self, port: int = 0, host: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.version = Gauge("archipelago_coordinator_version", "Committed global version", registry=r)
        self.timeline = Gauge("archipelago_coordinator_timeline", "Timeline (bumped by every rollback)", registry=r)
        self.rounds = Gauge("archipelago_coordinator_fragment_open_round", "Open round per fragment",
                            ["fragment"], registry=r)
        self.fragment_versions = Gauge("archipelago_coordinator_fragment_version",
                                       "Version of each fragment's last commit", ["fragment"], registry=r)
        self.live = Gauge("archipelago_coordinator_live_islands", "Islands holding a live lease", registry=r)
        self.pending = Gauge("archipelago_coordinator_pending_pushes",
                             "Accepted pushes waiting for their round to close", registry=r)
        self.pushes = Counter("archipelago_coordinator_pushes_accepted", "Accepted pushes", ["island"], registry=r)
        self.refused = Counter("archipelago_coordinator_pushes_refused",
                               "Refused pushes, by gRPC status", ["reason"], registry=r)
        self.bytes_in = Counter("archipelago_coordinator_received_bytes",
                                "Bytes of accepted pushes on the wire", ["island"], registry=r)
        self.bytes_out = Counter("archipelago_coordinator_sent_bytes",
                                 "Bytes sent to islands pulling θ_b or deltas", ["island"], registry=r)
        self.commits = Counter("archipelago_coordinator_rounds_committed", "Committed rounds", ["fragment"],
                               registry=r)
        self.round_latency = Histogram("archipelago_coordinator_round_latency_seconds",
                                       "Seconds from a round's first accepted push to its durable commit",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.merge = Histogram("archipelago_coordinator_merge_seconds",
                               "Seconds the aggregation of a round's pushes took (merge_s of the commit)",
                               buckets=MERGE_BUCKETS, registry=r)
        self.round_bytes_in = Histogram("archipelago_coordinator_round_received_bytes",
                                        "Push bytes received on the wire since the previous committed version",
                                        buckets=BYTES_BUCKETS, registry=r)
        self.round_bytes_out = Histogram("archipelago_coordinator_round_sent_bytes",
                                         "Pull bytes sent on the wire since the previous committed version",
                                         buckets=BYTES_BUCKETS, registry=r)
        self.staleness = Histogram("archipelago_coordinator_push_staleness_versions",
                                   "Versions between a merged push's base version and the version before its "
                                   "round's commit", buckets=STALENESS_BUCKETS, registry=r)
        self.guard = Counter("archipelago_coordinator_guard_decisions", "Guard decisions on closed rounds",
                             ["decision", "reason"], registry=r)
        self.rollbacks = Counter("archipelago_coordinator_rollbacks", "Rollbacks, by who ordered them",
                                 ["reason"], registry=r)
        self.expiries = Counter("archipelago_coordinator_lease_expiries",
                                "Leases that expired before the island finished its run", ["island"], registry=r)
        self.island_loss = Gauge("archipelago_coordinator_island_loss",
                                 "Loss each island reported with its last merged or refused push", ["island"],
                                 registry=r)
        self.round_loss = Gauge("archipelago_coordinator_round_loss",
                                "Loss of the last closed round, as the guard judges it", registry=r)
        self.update_norm = Gauge("archipelago_coordinator_outer_update_norm",
                                 "Norm of the last broadcast delta per fragment", ["fragment"], registry=r)
        self.step_norm = Gauge("archipelago_coordinator_outer_step_norm",
                               "Norm of the last outer step of θ_g per fragment", ["fragment"], registry=r)
        self.progress: dict[str, dict[str, Any]] = {}  # island -> what its last merged push said
        self._lock = threading.Lock()  # the engine's thread writes `progress`, status replies read it
        self._bytes_at_commit = (0.0, 0.0)
        self._timeline: int | None = None  # rollbacks up to this timeline are counted
        self._expired: set[tuple[str, int]] = set()  # (island, epoch) leases counted as expired
        self.port = port
        if port:
            start_http_server(port, addr=host, registry=r)

    # ---- the round engine's observer (called on its worker thread, under its lock) ---------------

    @never_raises
    def on_commit(self, fragment: int, round_: int, contributions: list[Any], info: dict[str, Any],
                  opened_at: float) -> None:
        self.commits.labels(fragment=str(fragment)).inc()
        self.round_latency.observe(max(0.0, time.monotonic() - opened_at))
        self.merge.observe(info.get("merge_s", 0.0))
        for staleness in info.get("staleness", []):
            self.staleness.observe(staleness)
        self.guard.labels(decision="commit", reason="none").inc()
        self.update_norm.labels(fragment=str(fragment)).set(info.get("update_norm", math.nan))
        self.step_norm.labels(fragment=str(fragment)).set(info.get("step_norm", math.nan))
        self._islands_reported(contributions, committed=True)
        received, sent = self._total(self.bytes_in), self._total(self.bytes_out)
        self.round_bytes_in.observe(received - self._bytes_at_commit[0])
        self.round_bytes_out.observe(sent - self._bytes_at_commit[1])
        self._bytes_at_commit = (received, sent)

    @never_raises
    def on_refuse(self, fragment: int, round_: int, contributions: list[Any], event: dict[str, Any]) -> None:
        self.guard.labels(decision="refuse", reason=guard_reason(str(event.get("reason", "")))).inc()
        self._islands_reported(contributions, committed=False)

    def _islands_reported(self, contributions: list[Any], committed: bool) -> None:
        losses = []
        with self._lock:
            self._record(contributions, committed, losses)
        if losses:
            self.round_loss.set(sum(losses) / len(losses))

    def _record(self, contributions: list[Any], committed: bool, losses: list[float]) -> None:
        for c in contributions:
            loss = c.eval_loss if math.isfinite(c.eval_loss) else c.loss_mean
            if math.isfinite(loss):
                self.island_loss.labels(island=c.island_id).set(loss)
                losses.append(loss)
            p = self.progress.setdefault(c.island_id, {"tokens": 0, "pushes_merged": 0})
            # PushHeader.compute_s is the island's compute so far: tokens over the compute seconds
            # between two of its pushes is its training rate.
            previous = p.get("compute_s")
            if previous is not None and c.compute_s > previous:
                p["tokens_per_s"] = c.tokens / (c.compute_s - previous)
            p.update(round=c.round, fragment=c.fragment, loss=loss, compute_s=c.compute_s, time=time.time())
            if committed:
                p["tokens"] += c.tokens
                p["pushes_merged"] += 1

    @staticmethod
    def _total(counter: Counter) -> float:
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    # ---- the ticker -----------------------------------------------------------------------------

    @never_raises
    def observe(self, coord: Any) -> None:
        engine = coord.engine
        self.version.set(engine.version)
        self.timeline.set(engine.timeline)
        for fragment in coord.params.owned:  # a shard's own fragments only
            self.rounds.labels(fragment=str(fragment)).set(engine.rounds[fragment])
            self.fragment_versions.labels(fragment=str(fragment)).set(engine.fragment_versions[fragment])
        self.live.set(len(coord.membership.live()))
        self.pending.set(sum(len(p) for p in engine.pending))
        done = engine.done_islands()
        for member in coord.membership.members.values():
            key = (member.island_id, member.epoch)
            if member.state == "expired" and key not in self._expired:
                self._expired.add(key)
                if member.island_id not in done:
                    self.expiries.labels(island=member.island_id).inc()
        if self._timeline is None:  # rollbacks before this process started are not counted again
            self._timeline = engine.timeline
        if engine.timeline > self._timeline:
            for event in engine.history:
                if event.get("kind") == "rollback" and event.get("timeline", 0) > self._timeline:
                    self.rollbacks.labels(reason="guard" if event.get("by") == "guard" else "operator").inc()
            self._timeline = engine.timeline

    def islands_progress(self) -> dict[str, dict[str, Any]]:
        """Per island: round, fragment, loss, tokens and tokens/s of its last reported pushes."""
        with self._lock:
            return {island: dict(p) for island, p in sorted(self.progress.items())}
