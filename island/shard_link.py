"""An island's link to a coordinator sharded by fragment (docs/design.md, "Sharded coordinator").

`ShardedLink` implements the `Link` the outer loop uses (island/diloco.py) over one
`CoordinatorLink` per shard (island/connection.py), so the outer loop never learns of shards.
`--coordinator "a:1,a2:1;b:2"` lists the shards in shard order, separated by ';', each with its
failover addresses separated by ','. Shard s owns the fragments f with f % num_shards == s.

Versions. Each shard counts only its own commits: v_s. The island's version is the composite
V = Σ_s v_s; each commit raises exactly one v_s by one, so V counts the deltas applied. `fetch`
pulls from every shard the deltas after the island's v_s and hands them on renumbered V+1, V+2, …
(θ_b comes out bit-identical whatever the order across shards: their fragments are disjoint).
Each composite version handed out is remembered (a bounded map) with its vector (v_s) and the
shards' timelines, so that a push's base version (composite) is rewritten into its owner shard's
version before it is sent: a shard's staleness counts its own commits only. A full copy is every
shard's full payload (its fragments only) joined into one fp32 payload (lossless).

Timelines are per shard. The island's timeline is the composite T = Σ_s t_s (a rollback raises
one t_s; none goes down), so a rollback on any shard changes T, and the outer loop, seeing another
timeline, reloads the whole θ_b. A push carries its owner shard's t_s.

Registration: the island registers with every shard; its epoch is the highest of the shards'
epochs (a process is a restart when any shard knew it before), `received_pushes` their sum, each
fragment's open round its owner's, and θ_b's digest θ₀'s only when every shard is at version 0 of
timeline 0 and they agree on it (else "" and the island pulls the full copy).

Events and heartbeats come from every shard's own subscribe and heartbeat threads; they are
translated into composite versions and timelines relative to what the island last fetched.
Pushes to different shards go on separate lanes (`push_lane`), and a delta pull skips a shard that
is unreachable (its deltas come once it is back), so a shard that is down stalls only its own
fragments.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import grpc

from island.connection import RETRYABLE, CoordinatorLink, PushOutcome, Registration
from protos import archipelago_pb2 as pb
from protos.codec import Payload, decode, encode

if TYPE_CHECKING:
    from island.diloco_config import DiLoCoConfig

log = logging.getLogger(__name__)

MAX_VIEWS = 1 << 16  # composite versions remembered for rewriting pushes' base versions


def split_shards(address: str) -> list[str]:
    """`"a:1,a2:1;b:2"` → one address group per shard, in shard order."""
    groups = [g.strip() for g in address.split(";")]
    if len(groups) < 2 or not all(groups):
        raise ValueError(f"a sharded coordinator address lists two or more shards separated by ';', "
                         f"none of them empty: got {address!r}")
    return groups


class View(NamedTuple):
    """The island's θ_b in shard terms: each shard's version and timeline."""

    versions: tuple[int, ...]
    timelines: tuple[int, ...]

    @property
    def version(self) -> int:
        return sum(self.versions)

    @property
    def timeline(self) -> int:
        return sum(self.timelines)


class _ShardEvents:
    """Stands in for one shard link's event queue: what it hears goes on, translated."""

    def __init__(self, link: ShardedLink, shard: int) -> None:
        self.link, self.shard = link, shard

    def put(self, event: pb.Event) -> None:
        self.link.events.put(self.link.translate(self.shard, event))


class ShardedLink:
    """The outer loop's `Link` over one `CoordinatorLink` per shard (see the module docstring)."""

    def __init__(self, cfg: DiLoCoConfig, address: str, island_id: str, token: str = "") -> None:
        groups = split_shards(address)
        self.island_id = island_id
        self.events: queue.Queue[pb.Event] = queue.Queue()
        self.shards = [CoordinatorLink(cfg, g, island_id, token, shard=(i, len(groups)))
                       for i, g in enumerate(groups)]
        for i, link in enumerate(self.shards):
            link.events = _ShardEvents(self, i)
        self.on_heartbeat: Callable[[pb.HeartbeatReply], None] = lambda reply: None
        self.on_rejoin: Callable[[pb.RegisterReply], None] = lambda reply: None
        self._lock = threading.RLock()
        zeros = (0,) * len(groups)
        self.view = View(zeros, zeros)  # what the island last fetched (or registered at)
        self._views: OrderedDict[tuple[int, int], View] = OrderedDict()
        self._beats: list[pb.HeartbeatReply | None] = [None] * len(groups)
        self._epochs = [0] * len(groups)
        self._threads: list[threading.Thread] = []
        self._away: set[int] = set()  # shards a delta pull found unreachable

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def owner(self, fragment: int) -> int:
        return fragment % self.num_shards

    def push_lane(self, fragment: int) -> int:
        """Pushes of different lanes do not wait for each other: one lane per shard."""
        return self.owner(fragment)

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self.shards)

    @property
    def coordinator_switches(self) -> int:
        return sum(link.coordinator_switches for link in self.shards)

    @property
    def coordinator_wait_s(self) -> float:
        """Seconds each shard's link went without its coordinator, summed over shards."""
        return sum(link.coordinator_wait_s for link in self.shards)

    def _remember(self, view: View) -> None:
        with self._lock:
            self._views[(view.timeline, view.version)] = view
            self._views.move_to_end((view.timeline, view.version))
            while len(self._views) > MAX_VIEWS:
                self._views.popitem(last=False)
            self.view = view

    # ---- the Link interface ---------------------------------------------------------------------

    def register(self, config_hash: str) -> Registration:
        regs = [link.register(config_hash) for link in self.shards]
        self._epochs = [r.epoch for r in regs]
        rounds = {f: r for s, reg in enumerate(regs) for f, r in reg.round_of.items() if self.owner(f) == s}
        if sorted(rounds) != list(range(len(rounds))):
            raise RuntimeError(f"island {self.island_id}: the shards list fragments {sorted(rounds)}, not every "
                               "fragment of the run once")
        view = View(tuple(r.version for r in regs), tuple(r.timeline for r in regs))
        self._remember(view)
        digests = {r.theta_b_sha256 for r in regs}
        at_theta0 = all(r.version == 0 and r.timeline == 0 for r in regs) and len(digests) == 1
        return Registration(max(self._epochs), view.version, view.timeline, [rounds[f] for f in sorted(rounds)],
                            digests.pop() if at_theta0 else "", sum(r.received_pushes for r in regs),
                            self.num_shards, 0, rounds, min(r.staleness_limit for r in regs))

    def start(self, on_heartbeat: Callable[[pb.HeartbeatReply], None],
              on_rejoin: Callable[[pb.RegisterReply], None]) -> None:
        self.on_heartbeat, self.on_rejoin = on_heartbeat, on_rejoin
        for s, link in enumerate(self.shards):
            link.start(on_heartbeat=partial(self._heard, s), on_rejoin=partial(self._rejoined, s))

    def heartbeat(self) -> pb.HeartbeatReply:
        """Every shard's heartbeat (waiting for each), combined."""
        replies = [link.heartbeat() for link in self.shards]
        with self._lock:
            self._beats = list(replies)
            return self._combined()

    def push(self, header: pb.PushHeader, payload: Payload) -> PushOutcome:
        """Send the push to its fragment's shard, with the base version and timeline in that shard's
        terms; the outcome's version in composite terms."""
        s = self.owner(header.fragment)
        with self._lock:
            base = self._views.get((header.timeline, header.base_version))
        if base is None:
            return PushOutcome("stale", f"base version {header.base_version} (timeline {header.timeline}) is older "
                                        f"than the {MAX_VIEWS} composite versions this island remembers")
        sent = pb.PushHeader()
        sent.CopyFrom(header)
        sent.base_version, sent.timeline = base.versions[s], base.timelines[s]
        outcome = self.shards[s].push(sent, payload)
        if outcome.version >= 0:
            outcome = replace(outcome, version=base.version + outcome.version - base.versions[s])
        return outcome

    def fetch(self, since: int, full: bool = False) -> list[tuple[pb.PayloadHeader, Payload]]:
        """The deltas of every shard after composite version `since`, renumbered since+1, since+2, …;
        or, with `full`, when `since` is no longer known, or when a shard no longer holds the deltas
        (or moved to another timeline), the full θ_b of every shard as one payload."""
        with self._lock:
            base = None if full else self._views.get((self.view.timeline, since))
        if base is None:
            return [self._full()]
        pulled: list[tuple[int, list[tuple[pb.PayloadHeader, Payload]]]] = []
        for s, link in enumerate(self.shards):
            try:
                records = link.fetch(base.versions[s], patient=False)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                if s not in self._away:  # once per absence: the resyncs that follow would repeat it
                    log.warning("island %s: shard %d unreachable (%s); its deltas come when it is back",
                                self.island_id, s, exc.code())
                self._away.add(s)
                continue
            if s in self._away:
                self._away.discard(s)
                log.info("island %s: shard %d is back", self.island_id, s)
            if any(h.full or h.timeline != base.timelines[s] for h, _ in records):
                return [self._full()]
            pulled.append((s, records))
        versions, out = list(base.versions), []
        for s, records in pulled:
            for h, payload in records:
                if h.version != versions[s] + 1:
                    raise RuntimeError(f"shard {s} sent version {h.version} after {versions[s]}")
                versions[s] = h.version
                view = View(tuple(versions), base.timelines)
                self._remember(view)
                header = pb.PayloadHeader()
                header.CopyFrom(h)
                header.version, header.timeline = view.version, view.timeline
                out.append((header, payload))
        return out

    def _full(self) -> tuple[pb.PayloadHeader, Payload]:
        tensors: dict[str, object] = {}
        versions, timelines = [], []
        for s, link in enumerate(self.shards):
            records = link.fetch(0, full=True)
            if len(records) != 1 or not records[0][0].full:
                raise RuntimeError(f"shard {s} answered a full pull with {len(records)} payloads, not one full copy")
            header, payload = records[0]
            for name, tensor in decode(payload).items():
                if name in tensors:
                    raise RuntimeError(f"shards overlap: shard {s} also sent tensor {name!r}")
                tensors[name] = tensor
            versions.append(header.version)
            timelines.append(header.timeline)
        view = View(tuple(versions), tuple(timelines))
        self._remember(view)
        log.info("island %s: full θ_b from %d shards at versions %s (composite %d)", self.island_id,
                 self.num_shards, list(versions), view.version)
        return (pb.PayloadHeader(version=view.version, fragment=-1, full=True, timeline=view.timeline),
                encode(dict(sorted(tensors.items())), "fp32"))

    def start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self, timeout_s: float) -> list[str]:
        """Stop every shard link (all at once), then join their threads and ours (bounded)."""
        deadline = time.monotonic() + timeout_s
        for link in self.shards:
            link.close(0.0)
        stuck = [name for link in self.shards for name in link.close(max(0.0, deadline - time.monotonic()))]
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return stuck + [t.name for t in self._threads if t.is_alive() and t is not threading.current_thread()]

    # ---- what the shards' threads hear, in composite terms --------------------------------------

    def translate(self, s: int, event: pb.Event) -> pb.Event:
        """Shard `s`'s event as the outer loop reads it: versions relative to what it fetched,
        the composite timeline."""
        with self._lock:
            view = self.view
            timelines = list(view.timelines)
            if event.kind in (pb.Event.COMMITTED, pb.Event.SKIPPED, pb.Event.ROLLBACK):
                timelines[s] = event.timeline
            version = view.version
            if event.kind == pb.Event.COMMITTED and event.timeline == view.timelines[s]:
                version += max(0, event.version - view.versions[s])
        out = pb.Event()
        out.CopyFrom(event)
        out.version, out.timeline = version, sum(timelines)
        if event.message or event.kind == pb.Event.SHUTDOWN:
            out.message = f"shard {s}: {event.message}"
        return out

    def _combined(self) -> pb.HeartbeatReply:
        """The shards' last heartbeats as one reply (under the lock): each fragment from its owner,
        its version ≤ the fetched composite when the island fetched its last change, else above it."""
        view = self.view
        timelines, ahead, fragments = list(view.timelines), 0, []
        for s, beat in enumerate(self._beats):
            if beat is None:
                continue
            timelines[s] = beat.timeline
            same = beat.timeline == view.timelines[s]
            ahead += max(0, beat.version - view.versions[s]) if same else 0
            for fs in beat.fragments:
                if self.owner(fs.fragment) != s:
                    continue
                version = view.version + (max(0, fs.version - view.versions[s]) if same else 0)
                fragments.append(pb.FragmentState(fragment=fs.fragment, round=fs.round, version=version))
        return pb.HeartbeatReply(version=view.version + ahead, timeline=sum(timelines),
                                 fragments=sorted(fragments, key=lambda f: f.fragment))

    def _heard(self, s: int, reply: pb.HeartbeatReply) -> None:
        with self._lock:
            self._beats[s] = reply
            combined = self._combined()
        self.on_heartbeat(combined)

    def _rejoined(self, s: int, reply: pb.RegisterReply) -> None:
        """Shard `s` registered the island again (it restarted, or a standby took over)."""
        with self._lock:
            self._epochs[s] = reply.epoch
            view = self.view
            timelines = list(view.timelines)
            timelines[s] = reply.timeline
            ahead = max(0, reply.version - view.versions[s]) if reply.timeline == view.timelines[s] else 0
        self.on_rejoin(pb.RegisterReply(lease_id=reply.lease_id, lease_ttl_s=reply.lease_ttl_s,
                                        epoch=max(self._epochs), version=view.version + ahead,
                                        timeline=sum(timelines), num_shards=self.num_shards))


__all__ = ["ShardedLink", "View", "split_shards"]
