"""The island gateway: the one process of an island that talks to the coordinator.

An island made of replica groups (island/replica.py) still runs the DiLoCo client exactly once:
in the gateway, a small process beside the groups that owns the gRPC link (lease, θ_b, error
feedback, rounds) and holds no optimizer. The coordinator sees one island whatever its inside;
a replica group can die and come back without the island leaving the coordinator's quorum.

    gateway (a DiLoCoClient with GroupSteps)         replica groups (island/group_link.py)
    register, pull θ_b ──── GET /start ────────────▶ every group starts from θ_b
    "inner steps": wait ◀── POST /sync/N ─────────── at sync point N each live group posts its
      for sync N                                      full θ_local (the first one is used; the
    Δ = θ_b − θ_local, push                           others' digests are checked against it)
    merge lands: θ_b += δ ─ GET /merge/N ──────────▶ each rank: θ_local ← θ_b + (θ_local − snap_N)
                                                      at a step fixed by the schedule

Every live group holds the same weights (torchft), so any one of them can speak for the island;
the gateway does not care which. Merges are applied by the groups at a step fixed in advance
(right after the sync without overlap, at the next sync point with overlap), never "when they
land", so the groups stay bit-identical. The gateway serves this over plain HTTP on the island's
network (tensors as safetensors, metadata in a header).

The gateway is also where a local launch (island/launch.py) hangs its status and restart controls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from island.diloco import DiLoCoClient, InnerSteps
from protos import archipelago_pb2 as pb
from protos.broadcast import digest

log = logging.getLogger(__name__)

META_HEADER = "X-Archipelago-Meta"
MERGES_KEPT = 4  # merges older than this many sync points are dropped (a group that far behind heals)


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()})


def unpack(body: bytes) -> dict[str, torch.Tensor]:
    return dict(st_load(body)) if body else {}


@dataclass
class SyncReport:
    """What a replica group posts at sync point N: its full θ_local and what it trained since N−1."""

    group: int
    step: int
    steps: int  # committed steps since the last sync
    loss_sum: float
    tokens: int
    compute_s: float
    tensors: dict[str, torch.Tensor]


@dataclass
class GatewayState:
    """What the gateway shares with the replica groups; every method is thread-safe."""

    num_groups: int
    start_timeout_s: float
    wake: threading.Event = field(default_factory=threading.Event)
    on_restart: Callable[[int], str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    start: tuple[str, bytes] | None = None
    released: bool = False
    asked: set[int] = field(default_factory=set)
    first_ask: float | None = None
    reports: dict[int, SyncReport] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    digests: dict[int, dict[int, str]] = field(default_factory=dict)
    sync_steps: dict[int, int] = field(default_factory=dict)
    merges: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)

    # -- start: every group begins from the gateway's θ_b, and (first time) all together --------

    def publish_start(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        body = pack(tensors)
        with self.lock:
            self.start = (json.dumps(meta), body)

    def ask_start(self, group: int) -> tuple[str, bytes] | None:
        """The start record once this group may begin: when every group has asked (so all are in
        the first quorum), or `start_timeout_s` after the first ask, or at once after that."""
        with self.lock:
            if self.start is None:
                return None
            self.asked.add(group)
            now = time.monotonic()
            self.first_ask = self.first_ask or now
            if not self.released and (len(self.asked) >= self.num_groups
                                      or now - self.first_ask > self.start_timeout_s):
                self.released = True
            return self.start if self.released else None

    # -- sync reports and merges ------------------------------------------------------------------

    def post_sync(self, n: int, report: SyncReport) -> None:
        sha = digest(report.tensors)
        with self.lock:
            self.digests.setdefault(n, {})[report.group] = sha
            self.sync_steps[n] = report.step
            first = n not in self.reports and n not in self.taken
            if first:
                self.reports[n] = report
        if first:
            self.wake.set()

    def has_sync(self, n: int) -> bool:
        with self.lock:
            return n in self.reports

    def take_sync(self, n: int) -> SyncReport:
        with self.lock:
            self.taken.add(n)
            return self.reports.pop(n)

    def publish_merge(self, n: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        body = pack(tensors)
        with self.lock:
            self.merges[n] = (json.dumps(meta), body)
            for old in [k for k in self.merges if k <= n - MERGES_KEPT]:
                del self.merges[old]

    def merge(self, n: int) -> tuple[str, bytes] | None:
        with self.lock:
            return self.merges.get(n)

    def add_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append({"t": time.time(), **event})

    def update(self, **progress: Any) -> None:
        with self.lock:
            self.progress.update(progress)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able view for status files and reports."""
        with self.lock:
            return {"progress": dict(self.progress),
                    "events": list(self.events),
                    "sync_digests": [{"sync": n, "step": self.sync_steps.get(n),
                                      "groups": {str(g): sha for g, sha in d.items()},
                                      "identical": len(set(d.values())) == 1}
                                     for n, d in sorted(self.digests.items())]}


class GatewayServer:
    """HTTP endpoints of the gateway (see the module docstring); `url` once started."""

    def __init__(self, state: GatewayState, host: str, port: int = 0) -> None:
        self.state = state
        handler = _handler_for(state)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="gateway-http", daemon=True)

    def start(self) -> GatewayServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler_for(state: GatewayState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            log.debug("gateway http: " + format, *args)

        def _reply(self, code: int, body: bytes = b"", meta: str | None = None,
                   ctype: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if meta is not None:
                self.send_header(META_HEADER, meta)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            query = parse_qs(url.query)
            if parts == ["start"]:
                record = state.ask_start(int(query["group"][0]))
                return self._reply(503) if record is None else self._reply(200, record[1], record[0])
            if len(parts) == 2 and parts[0] == "merge":
                record = state.merge(int(parts[1]))
                return self._reply(404) if record is None else self._reply(200, record[1], record[0])
            if parts == ["status"]:
                return self._reply(200, json.dumps(state.snapshot()).encode(), ctype="application/json")
            self._reply(404)

        def do_POST(self) -> None:
            parts = urlparse(self.path).path.strip("/").split("/")
            body = self._body()
            if len(parts) == 2 and parts[0] == "sync":
                meta = json.loads(self.headers[META_HEADER])
                state.post_sync(int(parts[1]), SyncReport(
                    group=int(meta["group"]), step=int(meta["step"]), steps=int(meta["steps"]),
                    loss_sum=float(meta["loss_sum"]), tokens=int(meta["tokens"]),
                    compute_s=float(meta["compute_s"]), tensors=unpack(body)))
                return self._reply(204)
            if parts == ["event"]:
                state.add_event(json.loads(body))
                return self._reply(204)
            if len(parts) == 3 and parts[0] == "groups" and parts[2] == "restart":
                if state.on_restart is None:
                    return self._reply(409, b"this gateway does not launch its groups")
                return self._reply(200, state.on_restart(int(parts[1])).encode(), ctype="text/plain")
            self._reply(404)

    return Handler


class GroupSteps(InnerSteps):
    """The inner steps of an island of replica groups: the groups train; the gateway's DiLoCo client
    (`DiLoCoClient(..., steps=GroupSteps(...))`) waits for their sync reports and hands them the
    merges.

    The client's `trainer` is then a one-process Trainer of the same job: its model holds θ_local as
    last reported by the groups (and is where island 0 evaluates θ_b); it never trains.
    """

    def __init__(self, state: GatewayState, health_check: Callable[[], None] | None = None) -> None:
        self.state = state
        self.health_check = health_check  # raises when the island's groups cannot go on
        self.next_sync = 0
        self.sync_of_fragment: dict[int, int] = {}
        self.tokens_trained = 0
        self.push_log: list[dict[str, Any]] = []

    def joined(self, client: DiLoCoClient) -> None:
        self.state.wake = client.arrived
        self.state.publish_start({"version": client.version, "order": client.fragment_order(),
                                  "fragments": client.fragments}, client.local)
        self.state.update(version=client.version, pushes=0, step=0)

    def train(self, client: DiLoCoClient, steps: int, fragment: int) -> None:
        """Wait for the groups' report of the sync point and take their θ_local."""
        n = self.next_sync

        def reported() -> bool:
            if self.health_check is not None:
                self.health_check()
            return self.state.has_sync(n)

        client.wait_until(reported, f"the replica groups' sync point {n}")
        report = self.state.take_sync(n)
        with torch.no_grad():
            for name, t in client.local.items():
                t.copy_(report.tensors[name])
        client.record_steps(report.loss_sum, report.steps, report.tokens, report.compute_s)
        self.tokens_trained += report.tokens
        client.trainer.step = report.step
        self.sync_of_fragment[fragment] = n
        self.next_sync += 1
        self.state.update(step=report.step)

    def pushed(self, client: DiLoCoClient, record: dict[str, Any]) -> None:
        self.push_log.append(record)
        self.state.update(pushes=len(self.push_log))

    def before_apply(self, client: DiLoCoClient, header: pb.PayloadHeader) -> None:
        if header.full and self.state.start is not None:
            # The groups only follow fragment merges at fixed steps; restarting their local state
            # from a new full θ_b (a coordinator rollback) is not wired through the group link.
            raise RuntimeError("a full θ_b arrived after the replica groups started (a rollback?); an "
                               "island of replica groups must be restarted as a whole to follow it")

    def applied(self, client: DiLoCoClient, header: pb.PayloadHeader) -> None:
        if not header.full:
            n = self.sync_of_fragment.pop(header.fragment)
            names = client.fragments[header.fragment]
            self.state.publish_merge(n, {"version": header.version, "fragment": header.fragment},
                                     {name: client.theta_b[name] for name in names})
            self.state.update(version=header.version)


__all__ = ["GatewayServer", "GatewayState", "GroupSteps", "SyncReport", "META_HEADER", "pack", "unpack"]
