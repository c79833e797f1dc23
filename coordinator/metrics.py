"""Prometheus metrics of the coordinator (a private registry, served when a port is given)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self, port: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.version = Gauge("archipelago_global_version", "Committed global version", registry=r)
        self.rounds = Gauge("archipelago_fragment_round", "Open round per fragment", ["fragment"], registry=r)
        self.live = Gauge("archipelago_live_islands", "Islands holding a live lease", registry=r)
        self.pushes = Counter("archipelago_pushes", "Accepted pushes", ["island"], registry=r)
        self.refused = Counter("archipelago_pushes_refused", "Refused pushes", ["reason"], registry=r)
        self.bytes_in = Counter("archipelago_push_bytes", "Push bytes received", ["island"], registry=r)
        self.rollbacks = Counter("archipelago_rollbacks", "Rollbacks", registry=r)
        self.port = port
        if port:
            start_http_server(port, registry=r)

    def observe(self, coord: Any) -> None:
        self.version.set(coord.engine.version)
        for fragment in coord.params.owned:  # a shard's own fragments only
            self.rounds.labels(fragment=str(fragment)).set(coord.engine.rounds[fragment])
        self.live.set(len(coord.membership.live()))
