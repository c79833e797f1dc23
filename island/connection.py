"""An island's connection to the coordinator: every gRPC call the outer loop makes, and riding out
the coordinator's absences (docs/design.md, steps 1, 2, 5 and 9).

The outer loop (island/diloco.py) sees a small interface: `register`, `push(header, payload)`,
`fetch(since, full)`, `heartbeat`, and a queue of coordinator `events`. Behind it:

- every RPC retries with exponential backoff (at most `retry_max_delay_s` between attempts) while
  the coordinator is unreachable, trying each address of `--coordinator a:1,b:2` in turn (a standby
  that took over); by default for as long as it takes (`reconnect_timeout_s = 0`), with an ERROR
  line every minute without a coordinator; with `reconnect_timeout_s > 0` the call gives up (and
  the island stops) after that long. `Presence` counts the seconds spent without a coordinator and
  the reconnections (a coordinator back, or another one answering), which the island reports;
- a refusal whose trailing metadata `archipelago-action` says `register` (lease unknown, fenced or
  expired: a restarted or new leader) registers again, a new epoch, and tells the outer loop;
- a push that arrived corrupted (DATA_LOSS) is sent again, and so is one the coordinator had no
  room for (`archipelago-action: retry`: at its limit of concurrent push streams, or the same
  push still in flight on an older stream);
- a subscribe thread keeps the event stream open (after a gap it queues a resync event, since
  commits may have been missed), and a heartbeat thread renews the lease every TTL/3 and hands each
  reply to the outer loop, which compares it with what it holds.

One `CoordinatorLink` talks to one coordinator (or one shard of a sharded one, with its failover
addresses); every registration checks that the coordinator is the shard the link expects, so an
island given the shards' addresses in the wrong order, or one address of a sharded coordinator,
fails at once. island/shard_link.py joins one link per shard.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from archipelago.errors import UserError
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.codec import Payload
from protos.framing import frame, read_stream
from protos.transport import open_channel

if TYPE_CHECKING:
    from island.diloco_config import DiLoCoConfig

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ACTION_KEY = "archipelago-action"
LOUD_EVERY_S = 60.0  # while no coordinator answers, an ERROR line this often


class Presence:
    """Whether a link has a coordinator, how long it went without one, and how often it got one back
    (the same one, or another: a failover). Every thread of the link reports what its calls saw."""

    def __init__(self, island_id: str, patience_s: float) -> None:
        self.island_id = island_id
        self.patience_s = patience_s
        self.reconnects = 0  # a coordinator answered again after none did, or another one answered
        self.switches = 0  # answers came from another address than before (a failover)
        self._waited_s = 0.0
        self._away_since: float | None = None
        self._loud_at = 0.0
        self._answered_by = ""
        self._lock = threading.Lock()

    @property
    def waited_s(self) -> float:
        """Seconds without a coordinator, the current absence included."""
        with self._lock:
            away = 0.0 if self._away_since is None else time.monotonic() - self._away_since
            return self._waited_s + away

    def failed(self, address: str, what: str) -> bool:
        """A call found no coordinator at `address`. True when this starts an absence."""
        with self._lock:
            now = time.monotonic()
            if self._away_since is None:
                self._away_since = self._loud_at = now
                return True
            if now - self._loud_at >= LOUD_EVERY_S:
                self._loud_at = now
                limit = (f"gives up after {self.patience_s:.0f}s (diloco.reconnect_timeout_s)" if self.patience_s > 0
                         else "waits as long as it takes (diloco.reconnect_timeout_s = 0)")
                log.error("island %s: NO COORDINATOR for %.0fs (last tried %s: %s); the island keeps training "
                          "where it can and %s", self.island_id, now - self._away_since, address, what, limit)
            return False

    def answered(self, address: str) -> None:
        """A coordinator at `address` answered (whatever it said)."""
        with self._lock:
            back = self._away_since is not None
            moved = bool(self._answered_by) and address != self._answered_by
            if back:
                gone = time.monotonic() - self._away_since
                self._waited_s += gone
                self._away_since = None
                log.warning("island %s: coordinator %s answers after %.1fs without one", self.island_id, address, gone)
            if back or moved:
                self.reconnects += 1
            if moved:
                self.switches += 1
                log.warning("island %s: now talking to coordinator %s (was %s)", self.island_id, address,
                            self._answered_by)
            self._answered_by = address


@dataclass(frozen=True)
class Registration:
    """What the coordinator said when the island registered."""

    epoch: int
    version: int
    timeline: int
    rounds: list[int]  # each fragment's open round
    theta_b_sha256: str
    received_pushes: int  # pushes the coordinator holds from this island (a restarted process resumes after them)
    num_shards: int = 1  # the coordinator is shard `shard_index` of `num_shards` (docs/design.md)
    shard_index: int = 0
    round_of: dict[int, int] = field(default_factory=dict)  # fragment -> open round, as the coordinator listed them
    staleness_limit: int = 0  # versions a push's base may lag (0: the coordinator did not say)


class ShardMismatch(UserError):
    """The coordinator reached is not the shard the island expects there."""


@dataclass(frozen=True)
class PushOutcome:
    """How a push ended: `accepted`, `already_received` (a retry of one the coordinator holds: done),
    `stale` (too old to apply: dropped) or `other_timeline` (computed before a rollback: dropped,
    the island must reload θ_b)."""

    status: str
    message: str
    version: int = -1


class CoordinatorLink:
    """The gRPC side of one island's DiLoCo client (see the module docstring)."""

    def __init__(self, cfg: DiLoCoConfig, address: str, island_id: str, token: str = "",
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.cfg = cfg
        self.shard = shard  # (index, count): the coordinator shard these addresses must lead to
        self.island_id = island_id
        self.token = token
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError(f"no coordinator address in {address!r}")
        self.events: queue.Queue[pb.Event] = queue.Queue()
        self.lease: pb.Lease | None = None
        self.ttl_s = 10.0
        self.bytes_sent = 0  # push messages on the wire, every attempt (island/telemetry.py)
        self.bytes_received = 0  # pulled θ_b and delta messages on the wire
        self.presence = Presence(island_id, cfg.reconnect_timeout_s)
        self.config_hash = ""
        self.on_heartbeat: Callable[[pb.HeartbeatReply], None] = lambda reply: None
        self.on_rejoin: Callable[[pb.RegisterReply], None] = lambda reply: None
        self._stop = threading.Event()
        self._join_lock = threading.RLock()
        self._address_index = 0
        self._old_channels: list[grpc.Channel] = []
        self._threads: list[threading.Thread] = []
        self.address = self.addresses[0]
        self.channel = self._open(self.address)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    @property
    def reconnects(self) -> int:
        return self.presence.reconnects

    @property
    def coordinator_switches(self) -> int:
        return self.presence.switches

    @property
    def coordinator_wait_s(self) -> float:
        return self.presence.waited_s

    # ---- the interface the outer loop uses ------------------------------------------------------

    def register(self, config_hash: str) -> Registration:
        """Register (the first time); `config_hash` is sent again on every re-registration."""
        self.config_hash = config_hash
        reply = self._register()
        self.ttl_s = reply.lease_ttl_s
        return Registration(reply.epoch, reply.version, reply.timeline,
                            [fs.round for fs in sorted(reply.fragments, key=lambda f: f.fragment)],
                            reply.theta_b_sha256, reply.received_pushes, max(1, reply.num_shards),
                            reply.shard_index, {fs.fragment: fs.round for fs in reply.fragments},
                            reply.staleness_limit)

    def start(self, on_heartbeat: Callable[[pb.HeartbeatReply], None],
              on_rejoin: Callable[[pb.RegisterReply], None]) -> None:
        """Start the subscribe and heartbeat threads. `on_heartbeat` gets every heartbeat reply,
        `on_rejoin` every re-registration's reply (both on those threads)."""
        self.on_heartbeat, self.on_rejoin = on_heartbeat, on_rejoin
        self.start_thread(self._subscribe, "subscribe")
        self.start_thread(self._heartbeat, "heartbeat")

    def heartbeat(self) -> pb.HeartbeatReply:
        return self.call(lambda: self.stub.Heartbeat(pb.HeartbeatRequest(lease=self.lease), timeout=self.ttl_s))

    def push(self, header: pb.PushHeader, payload: Payload) -> PushOutcome:
        """Stream one pseudo-gradient: `header` (without the lease and the body's fields) and the
        payload's chunks. Every attempt carries the lease held at that moment."""
        parts = frame(pb.PushPart, header, payload, self.cfg.chunk_bytes)

        def attempt() -> pb.PushReply:
            parts[0].header.lease.CopyFrom(self.lease)
            self.bytes_sent += sum(p.ByteSize() for p in parts)
            return self.stub.PushPseudoGrad(iter(parts))

        try:
            reply = self.call(attempt, resend=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return PushOutcome("already_received", exc.details())
            action = _action(exc)
            if action == "drop":
                return PushOutcome("stale", exc.details())
            if action == "reload":
                return PushOutcome("other_timeline", exc.details())
            raise
        return PushOutcome("accepted", reply.message, reply.version)

    def fetch(self, since: int, full: bool = False, patient: bool = True) -> list[tuple[pb.PayloadHeader, Payload]]:
        """Every outer delta after version `since` (or, with `full` or when the coordinator no longer
        holds them all, the full θ_b), in version order, each as its header and payload.
        `patient=False`: no retries while the coordinator is unreachable (see `call`). A `since`
        the coordinator never produced (it rolled back past it) gets the full θ_b."""
        try:
            parts = self.call(lambda: list(self.stub.PullParams(
                pb.PullRequest(lease=self.lease, full=full, since_version=since))), patient=patient)
        except grpc.RpcError as exc:
            if full or _action(exc) != "reload":
                raise
            return self.fetch(since, full=True, patient=patient)
        self.bytes_received += sum(p.ByteSize() for p in parts)
        return read_stream(parts)

    def start_thread(self, target: Callable[[], None], name: str) -> None:
        """A daemon thread that `close` joins."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self, timeout_s: float) -> list[str]:
        """Stop and join (bounded) the threads; the names of those still running after `timeout_s`.
        A thread still inside gRPC or torch while the interpreter shuts down can abort the process."""
        self._stop.set()
        self.channel.close()  # cancels the event stream and any call in flight
        for channel in self._old_channels:
            channel.close()
        others = [t for t in self._threads if t is not threading.current_thread()]
        deadline = time.monotonic() + timeout_s
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in others if t.is_alive()]

    # ---- retries, re-registration, failover ----------------------------------------------------

    def call(self, fn: Callable[[], Any], register: bool = True, resend: bool = False, patient: bool = True) -> Any:
        """Run an RPC, retrying with exponential backoff while the coordinator is unreachable
        (trying each address in turn), registering again when the lease is gone, and, with
        `resend`, sending again what arrived corrupted (DATA_LOSS). Not `patient`: an unreachable
        coordinator raises at once (the next call tries its next address). Retries go on for
        `reconnect_timeout_s` (0: without end) or until the link is closed."""
        patience = self.cfg.reconnect_timeout_s
        deadline = time.monotonic() + patience if patience > 0 else math.inf
        delay = 0.2
        while True:
            lease, stub, address = self.lease, self.stub, self.address
            try:
                result = fn()
            except grpc.RpcError as exc:
                unreachable = exc.code() in RETRYABLE
                if unreachable:
                    first = self.presence.failed(address, f"{exc.code().name}: {exc.details()}")
                else:
                    first = True
                    self.presence.answered(address)
                if register and _action(exc) == "register" and time.monotonic() < deadline:
                    self.rejoin(lease)
                    continue
                busy = _action(exc) == "retry"  # at its stream limit, or this push is in flight already
                retry = busy or unreachable or (resend and exc.code() == grpc.StatusCode.DATA_LOSS)
                if not patient and unreachable and stub is self.stub:
                    self._next_address()
                if not retry or not patient or time.monotonic() + delay > deadline or self._stop.is_set():
                    raise
                log.log(logging.WARNING if first else logging.DEBUG, "coordinator call failed (%s: %s); retrying "
                        "in %.1fs", exc.code(), exc.details(), delay)
                if unreachable and stub is self.stub:
                    self._next_address()
                self._stop.wait(delay)
                delay = min(delay * 2, self.cfg.retry_max_delay_s)
            else:
                self.presence.answered(address)
                return result

    def _register(self) -> pb.RegisterReply:
        reply = self.call(lambda: self.stub.Register(pb.RegisterRequest(
            island_id=self.island_id, token=self.token, config_hash=self.config_hash)), register=False)
        index, count = self.shard
        if (reply.shard_index, max(1, reply.num_shards)) != (index, count):
            where = "an unsharded coordinator" if count == 1 else f"shard {index} of {count}"
            raise ShardMismatch(
                f"island {self.island_id}: the coordinator at {self.addresses[self._address_index]} is shard "
                f"{reply.shard_index} of {max(1, reply.num_shards)}, but the island expects {where} there: give "
                "every shard's addresses in shard order, separated by ';' (docs/design.md, Sharded coordinator)")
        self.lease = pb.Lease(island_id=self.island_id, lease_id=reply.lease_id, epoch=reply.epoch)
        return reply

    def rejoin(self, stale: pb.Lease | None) -> None:
        """Register again (a new epoch) unless another thread already did since `stale` failed."""
        with self._join_lock:
            if self.lease is not stale:
                return
            reply = self._register()
            log.warning("island %s registered again (epoch %d) at coordinator version %d, timeline %d",
                        self.island_id, reply.epoch, reply.version, reply.timeline)
            self.on_rejoin(reply)

    def _open(self, address: str) -> grpc.Channel:
        backoff_ms = max(100, int(self.cfg.retry_max_delay_s * 1000))
        return open_channel(address, options=[
            ("grpc.max_send_message_length", self.cfg.max_message_bytes),
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            # A fresh channel must not inherit a shared subchannel's grown reconnect backoff (gRPC's
            # default grows to 120 s), or a coordinator that is back stays unreachable for a while.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 200)),
            ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 200)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms)],
            ca=self.cfg.tls_ca, cert=self.cfg.tls_cert, key=self.cfg.tls_key)

    def _next_address(self) -> None:
        """Try the next coordinator address (with one address: keep the channel, it reconnects)."""
        if len(self.addresses) < 2:
            return
        with self._join_lock:
            self._address_index = (self._address_index + 1) % len(self.addresses)
            self._old_channels.append(self.channel)  # calls in flight on it finish or fail by themselves
            self.address = self.addresses[self._address_index]
            self.channel = self._open(self.address)
            self.stub = pb_grpc.CoordinatorStub(self.channel)
            log.info("island %s: trying coordinator %s", self.island_id, self.address)

    # ---- background threads ---------------------------------------------------------------------

    def _subscribe(self) -> None:
        lost = False
        while not self._stop.is_set():
            lease, stub, address = self.lease, self.stub, self.address
            try:
                stream = stub.Subscribe(pb.SubscribeRequest(lease=lease))
                if lost:  # whatever happened while the stream was down: the receiver catches up
                    self.events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))
                for event in stream:
                    lost = False
                    self.presence.answered(address)
                    self.events.put(event)
                    if event.kind == pb.Event.SHUTDOWN:
                        return
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                if exc.code() in RETRYABLE:
                    first = self.presence.failed(address, f"{exc.code().name}: {exc.details()}")
                else:
                    first = True
                    self.presence.answered(address)
                log.log(logging.WARNING if first or not lost else logging.DEBUG, "subscription lost (%s); retrying",
                        exc.code())
                lost = True
                try:
                    if _action(exc) == "register":
                        self.rejoin(lease)
                    elif exc.code() in RETRYABLE and stub is self.stub:
                        self._next_address()
                except grpc.RpcError as again:
                    log.warning("re-registration failed (%s); retrying", again.code())
                self._stop.wait(0.5)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            lease, stub, address = self.lease, self.stub, self.address
            try:
                reply = stub.Heartbeat(pb.HeartbeatRequest(lease=lease), timeout=self.ttl_s)
            except grpc.RpcError as exc:
                if exc.code() in RETRYABLE:
                    first = self.presence.failed(address, f"{exc.code().name}: {exc.details()}")
                else:
                    first = True
                    self.presence.answered(address)
                log.log(logging.WARNING if first else logging.DEBUG, "heartbeat failed: %s", exc.code())
                try:
                    if _action(exc) == "register":
                        self.rejoin(lease)
                except grpc.RpcError as again:
                    log.warning("re-registration failed (%s)", again.code())
                continue
            self.presence.answered(address)
            self.on_heartbeat(reply)


def _action(exc: grpc.RpcError) -> str:
    """What the coordinator asks the island to do about a refusal (trailing metadata), or ""."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:  # not a call error (e.g. a local failure): no advice
        return ""
    return next((value for key, value in metadata if key == ACTION_KEY), "")
