"""What an island counts (`IslandStats`, in its report) and tells the outside while it runs
(docs/design.md, Observability):

- Prometheus metrics on `diloco.metrics_port` (0: none): step time, tokens/s, loss, seconds
  blocked on the coordinator, bytes sent and received, the error-feedback residual norm per
  fragment, reconnects; every series labelled with the island's id (one value per process);
- a progress file, `diloco.progress_file` ("{island_id}" replaced; empty: none): a small JSON with
  round, the steps done of it, rounds done, step, last loss, tokens/s, θ_b version, replaced atomically at most twice a second and at
  every sync, which `archipelago sim` reads to show the run live.

The DiLoCo client calls `steps` after inner steps, `synced` after each sync and `finished` when it
closes, all on its training thread. Nothing here touches the model or its training: the residual
norm only reads the error-feedback state, and only when metrics are served.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from archipelago.live import publish_json
from protos.broadcast import l2_norm

if TYPE_CHECKING:
    from island.diloco import DiLoCoClient

PUBLISH_EVERY_S = 0.5
RATE_WINDOW = 20  # reports (inner steps, or a replica group's sync reports) in the tokens/s window
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class IslandStats:
    rounds: int = 0
    pushes: int = 0
    compute_s: float = 0.0
    blocked_s: float = 0.0
    reconnects: int = 0  # a coordinator answered again after none did, or another one did (a failover)
    coordinator_switches: int = 0  # answers came from another coordinator address than before
    coordinator_wait_s: float = 0.0  # seconds without a coordinator (summed over shards)
    rejoins: int = 0  # registrations after the first (lease lost: coordinator restart, failover)
    skipped_rounds: int = 0  # rounds the coordinator's guard refused
    reloads: int = 0  # full θ_b reloads ordered by a rollback
    dropped_pushes: int = 0  # pushes of an abandoned timeline, never applied
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    sync_log: list[dict[str, float]] = field(default_factory=list)


# Counters read from the client when Prometheus scrapes: (name, help, how to read it).
COUNTERS: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
    ("archipelago_island_tokens", "Tokens trained on", lambda c: c.telemetry.tokens),
    ("archipelago_island_compute_seconds", "Seconds of inner-step compute", lambda c: c.stats.compute_s),
    ("archipelago_island_blocked_seconds", "Seconds the training thread waited on the coordinator",
     lambda c: c.stats.blocked_s),
    ("archipelago_island_sent_bytes", "Bytes sent to the coordinator (pushes, on the wire)",
     lambda c: getattr(c.link, "bytes_sent", 0)),
    ("archipelago_island_received_bytes", "Bytes received from the coordinator (θ_b and deltas, on the wire)",
     lambda c: getattr(c.link, "bytes_received", 0)),
    ("archipelago_island_reconnects", "Times a coordinator answered again after none did, or another one did",
     lambda c: getattr(c.link, "reconnects", 0)),
    ("archipelago_island_pushes", "Pushes the coordinator acknowledged", lambda c: c.stats.pushes),
    ("archipelago_island_dropped_pushes", "Pushes dropped (too stale, or an abandoned timeline)",
     lambda c: c.stats.dropped_pushes),
    ("archipelago_island_skipped_rounds", "Rounds the coordinator's guard refused", lambda c: c.stats.skipped_rounds),
    ("archipelago_island_rejoins", "Registrations after the first", lambda c: c.stats.rejoins),
)


class _ClientCounters(Collector):
    """The client's running totals, read at scrape time (they change on several threads)."""

    def __init__(self, island: str) -> None:
        self.island = island
        self.client: DiLoCoClient | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, help_text, read in COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["island"])
            if self.client is not None:
                family.add_metric([self.island], float(read(self.client)))
            yield family


class IslandMetrics:
    """The island's registry; served on `port` when it is not 0."""

    def __init__(self, island: str, port: int = 0, host: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["island"]
        self.counters = _ClientCounters(island)
        r.register(self.counters)
        self.step_time = Histogram("archipelago_island_step_seconds", "Seconds of one inner step", labels,
                                   buckets=STEP_BUCKETS, registry=r).labels(island)
        self.tokens_per_s = Gauge("archipelago_island_tokens_per_second",
                                  f"Tokens per second of compute over the last {RATE_WINDOW} step reports",
                                  labels, registry=r).labels(island)
        self.loss = Gauge("archipelago_island_loss", "Training loss of the last inner step", labels,
                          registry=r).labels(island)
        self.round = Gauge("archipelago_island_round", "Outer round being trained or synced (0-based, as the coordinator numbers them)", labels,
                           registry=r).labels(island)
        self.step = Gauge("archipelago_island_step", "Inner steps done", labels, registry=r).labels(island)
        self.version = Gauge("archipelago_island_version", "Version of the θ_b this island holds", labels,
                             registry=r).labels(island)
        self.residual = Gauge("archipelago_island_error_feedback_residual_norm",
                              "Norm of the error-feedback residual (what quantization has yet to send) per "
                              "fragment", ["island", "fragment"], registry=r)
        self.island = island
        if port:
            start_http_server(port, addr=host, registry=r)


class Telemetry:
    """The island's metrics and progress file (see the module docstring); off by default."""

    def __init__(self, client: DiLoCoClient) -> None:
        self.client = client
        self.cfg = cfg = client.cfg
        self.island_id = island_id = client.island_id
        self.path = cfg.progress_file.replace("{island_id}", island_id) if cfg.progress_file else ""
        self.metrics = IslandMetrics(island_id, cfg.metrics_port, cfg.metrics_host) if cfg.metrics_port else None
        if self.metrics is not None:
            self.metrics.counters.client = client
        self.tokens = 0
        self.window: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)  # (tokens, compute seconds)
        self.loss = float("nan")
        self.state = "starting"
        self._published = 0.0

    @property
    def tokens_per_s(self) -> float:
        seconds = sum(s for _, s in self.window)
        return sum(t for t, _ in self.window) / seconds if seconds > 0 else 0.0

    def steps(self, loss_sum: float, steps: int, tokens: int, compute_s: float) -> None:
        """`steps` inner steps were done: their summed loss, tokens and compute seconds."""
        self.tokens += tokens
        self.window.append((tokens, compute_s))
        self.loss = loss_sum / steps if steps else self.loss
        self.state = "training"
        if self.metrics is not None:
            for _ in range(steps):
                self.metrics.step_time.observe(compute_s / steps)
            self.metrics.tokens_per_s.set(self.tokens_per_s)
            self.metrics.loss.set(self.loss)
        if time.monotonic() - self._published >= PUBLISH_EVERY_S:
            self.publish()

    def synced(self, fragment: int) -> None:
        """A sync of `fragment` is done (pushed; merged too, without overlap)."""
        if self.metrics is not None:
            residuals = self.client.feedback[fragment].state_dict()["residuals"]
            self.metrics.residual.labels(self.island_id, str(fragment)).set(l2_norm(residuals) if residuals else 0.0)
        self.publish()

    def finished(self) -> None:
        """The client closed: its run is done, or it stopped short (an error, a shutdown)."""
        self.state = "done" if self.client.trainer.step >= self.cfg.total_steps else "stopped"
        self.publish()

    def rounds_done(self, step: int) -> int:
        """Outer rounds whose inner steps are all among the first `step`."""
        return sum(1 for r in range(self.cfg.rounds) if self.cfg.steps_before(r + 1) <= step)

    def round_of(self, step: int) -> int:
        """The (0-based) outer round being trained, or synced, after `step` inner steps."""
        return min(self.rounds_done(max(0, step - 1)), self.cfg.rounds - 1)

    def publish(self) -> None:
        """Update the gauges that follow the client, and replace the progress file."""
        client = self.client
        self._published = time.monotonic()
        step = client.trainer.step
        if self.metrics is not None:
            self.metrics.round.set(self.round_of(step))
            self.metrics.step.set(step)
            self.metrics.version.set(client.version)
        if not self.path:
            return
        round_ = self.round_of(step)
        first = self.cfg.steps_before(round_)
        publish_json(self.path, {
            "island": self.island_id, "pid": os.getpid(), "state": self.state, "round": round_,
            "round_step": step - first, "round_steps": self.cfg.steps_before(round_ + 1) - first,
            "rounds_done": self.rounds_done(step), "rounds": self.cfg.rounds, "step": step, "steps": self.cfg.total_steps,
            "loss": self.loss if self.loss == self.loss else None, "tokens_per_s": self.tokens_per_s,
            "tokens": self.tokens, "version": client.version, "pushes": client.stats.pushes,
            "compute_s": client.stats.compute_s, "blocked_s": client.stats.blocked_s,
            "metrics_port": self.cfg.metrics_port, "t": time.time()})
