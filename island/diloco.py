"""The DiLoCo outer loop of one island, around the untouched inner trainer (docs/design.md).

    register; pull θ_b (unless already held bit for bit); θ_local = θ_b
    for each sync point (every H/F inner steps, fragments in turn):
        inner steps with AdamW on the island's own shard                (step 3)
        Δ_f = θ_b_f − θ_local_f(t0), encoded with error feedback         (step 4)
        push Δ_f on the pusher thread                                   (step 5)
        without overlap: wait for the merge; with overlap: keep training
        when the outer delta lands: θ_b += δ̂ and
        θ_local_f ← θ_b_f + (θ_local_f(now) − θ_local_f(t0))               (steps 9, 10)

Inner optimizer state never leaves the island (DiLoCo, Douillard et al., arXiv:2311.08105;
streaming fragments and overlap: Douillard et al., arXiv:2501.18512). The training thread is the
only one that touches the model; the pusher and receiver threads only move bytes.

The coordinator is reached through a `CoordinatorLink` (island/connection.py; a sharded one through
island/shard_link.py), which retries, fails over and re-registers by itself. The outer loop decides:
- a retried push the coordinator already holds counts as done;
- the guard refused a round (SKIPPED): θ_b stays, the pseudo-gradient's progress is dropped;
- a push too stale to apply is dropped; the island goes on;
- the coordinator rolled back (ROLLBACK, a push refused for another timeline, or a re-registration
  on another timeline): the island pulls the full θ_b and restarts its local state from it;
- a restarted island process (its epoch is above 1) resumes from its local checkpoint where the
  coordinator still accepts that checkpoint's base (island/local_checkpoint.py), else after the
  pushes the coordinator holds from it, with its data position and lr schedule moved to that round.

The inner steps come from an `InnerSteps` (this process's trainer by default); an island of replica
groups plugs its gateway in there (island/gateway.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from archipelago.procs import process_age_s
from island.ack_log import AckLog
from island.diloco_config import DiLoCoConfig, run_config_hash, synced_tensors
from island.local_checkpoint import LocalCheckpoints, resume_round
from island.telemetry import IslandStats, Telemetry
from island.train import Trainer
from protos import archipelago_pb2 as pb
from protos.broadcast import apply_delta, digest, merge_local
from protos.codec import Payload, TensorSpec, decode
from protos.error_feedback import ErrorFeedback
from protos.fragments import split_fragments

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # close() waits this long, in all, for the background threads


class Link(Protocol):
    """What the outer loop needs of its coordinator connection (island/connection.py has the gRPC
    one); `events` is a queue of `pb.Event`. An optional `push_lane(fragment) -> int` gives each lane
    its own pusher thread (island/shard_link.py: one per shard); without it, pushes share one."""

    island_id: str
    events: queue.Queue

    def register(self, config_hash: str) -> Any: ...
    def start(self, on_heartbeat: Any, on_rejoin: Any) -> None: ...
    def heartbeat(self) -> pb.HeartbeatReply: ...
    def push(self, header: pb.PushHeader, payload: Payload) -> Any: ...
    def fetch(self, since: int, full: bool = False) -> list[tuple[pb.PayloadHeader, Payload]]: ...
    def start_thread(self, target: Any, name: str) -> None: ...
    def close(self, timeout_s: float) -> list[str]: ...


class InnerSteps:
    """Where the outer loop's inner steps come from: by default `client.trainer`, in this process.

    An island of replica groups replaces it (island/gateway.py): its groups train elsewhere, and the
    gateway learns of their progress and of the merges they must apply through these hooks.
    """

    def joined(self, client: DiLoCoClient) -> None:
        """The first θ_b is in place (the client holds it and θ_local equals it)."""

    def train(self, client: DiLoCoClient, steps: int, fragment: int) -> None:
        """Run `steps` inner steps before the sync of `fragment`, merging arrivals between them."""
        for _ in range(steps):
            client.apply_arrivals()  # a sync that landed meanwhile merges before the next step
            start = time.perf_counter()
            s = client.trainer.train_step()
            client.record_steps(s.loss, 1, s.tokens, time.perf_counter() - start)

    def pushed(self, client: DiLoCoClient, record: dict[str, Any]) -> None:
        """The coordinator holds the push described by `record`."""

    def before_apply(self, client: DiLoCoClient, header: pb.PayloadHeader) -> None:
        """A payload (a delta, or a full θ_b) is about to be applied."""

    def applied(self, client: DiLoCoClient, header: pb.PayloadHeader) -> None:
        """A payload was applied (θ_b and θ_local are updated)."""


class DiLoCoClient:
    def __init__(self, cfg: DiLoCoConfig, trainer: Trainer, link: Link, steps: InnerSteps | None = None) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.link = link
        self.steps = steps if steps is not None else InnerSteps()
        self.island_id = link.island_id
        self.ack_log = AckLog(cfg.ack_log, self.island_id)
        self.local = synced_tensors(trainer)
        self.names = list(self.local)
        self.fragments = split_fragments(self.names, cfg.fragments)
        self.specs = {n: TensorSpec(n, tuple(t.shape), "float32") for n, t in self.local.items()}
        self.config_hash = run_config_hash(trainer.job.model, [(n, tuple(t.shape)) for n, t in
                                                               self.local.items()], cfg.fragments)
        self.theta_b: dict[str, torch.Tensor] = {}
        self.version = 0
        self.timeline = 0  # the coordinator timeline θ_b belongs to (bumped by rollbacks)
        self.epoch = 0
        self.received_pushes = 0
        self.rounds = [0] * cfg.fragments
        self.base_version = [0] * cfg.fragments
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.feedback = [ErrorFeedback(cfg.ef_decay) for _ in range(cfg.fragments)]
        self.stats = IslandStats()
        self._stop = threading.Event()
        self._joined = False  # the first θ_b is in place
        self._fetched = 0  # the newest version the receiver has fetched
        self._compute_mark = 0.0
        self._compute_of: dict[tuple[int, int], tuple[float, float]] = {}  # (compute s, synced at)
        self.loss_sum = 0.0
        self.loss_count = 0
        self.token_sum = 0  # tokens of the inner steps since the last sync (steps may differ)
        self.outstanding: dict[int, int] = {}  # fragment -> round pushed but not merged yet
        self.arrivals: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.arrived = threading.Event()
        self.receiver_error: BaseException | None = None
        self.pushers: dict[int, ThreadPoolExecutor] = {}  # lane -> its pusher thread
        self._push_lock = threading.Lock()
        self.pushes: list[Future] = []
        self.telemetry = Telemetry(self)  # metrics and progress file, when configured
        self.position = [0, 0, 0]  # outer round, segment (fragment sync) in it, inner steps done in the segment
        self.order: list[int] = []  # the fragments in the order this process visits them
        self.local_checkpoints = LocalCheckpoints(self) if cfg.local_checkpoint_every else None

    # ---- the outer loop -------------------------------------------------------------------------

    def run(self) -> IslandStats:
        """Register, pull, and run `cfg.rounds` outer rounds of H inner steps each."""
        before_connect = process_age_s()
        self.connect()
        resumed = self.local_checkpoints.resumed_from if self.local_checkpoints else None
        if not resumed:
            self.order, self.position = self.fragment_order(), [resume_round(self), 0, 0]
        order, (start, segment, done) = self.order, self.position
        age = process_age_s()
        # what a start cost: the process up to here (interpreter, imports, model, data), of which the
        # registration, θ_b pull or local resume
        startup = None if age is None or before_connect is None else {
            "process_s": round(age, 3), "connect_s": round(age - before_connect, 3)}
        self.ack_log.write({"event": "start", "epoch": self.epoch, "round": start, "version": self.version,
                            "resumed_from": resumed, "startup": startup})
        try:
            for round_ in range(start, self.cfg.rounds):
                local_loss = None
                for j, (fragment, steps) in enumerate(zip(order, self.cfg.fragment_steps(round_), strict=True)):
                    if round_ == start and j < segment:  # synced before the checkpoint it resumed from
                        continue
                    self.position = [round_, j, done if (round_, j) == (start, segment) else 0]
                    self.steps.train(self, steps - self.position[2], fragment)
                    if fragment == order[-1]:
                        local_loss = self.maybe_evaluate_local()
                    self.sync(fragment, last=round_ == self.cfg.rounds - 1)
                self.stats.rounds += 1
                self.maybe_evaluate(local_loss)
            if self.cfg.wait_last_merge:
                self.wait_until(lambda: not self.outstanding, "the last syncs to merge")
            else:
                self.wait_until(lambda: not self.pushes, "the last pushes to be acknowledged")
        finally:
            self.close()
        return self.stats

    def fragment_order(self) -> list[int]:
        """The order the island visits fragments in: it joins the schedule where the run is, at the
        fragment whose open round is oldest."""
        first = min(range(self.cfg.fragments), key=lambda f: (self.rounds[f], f))
        return [(first + i) % self.cfg.fragments for i in range(self.cfg.fragments)]

    def record_steps(self, loss_sum: float, steps: int, tokens: int, compute_s: float) -> None:
        """Inner steps done since the last sync: their summed loss, count, tokens and compute time."""
        self.loss_sum += loss_sum
        self.loss_count += steps
        self.token_sum += tokens
        self.stats.compute_s += compute_s
        self.telemetry.steps(loss_sum, steps, tokens, compute_s)
        self.position[2] += steps
        if self.local_checkpoints is not None:
            self.local_checkpoints.after_steps(self)

    def evaluates_round(self, rounds: int) -> bool:
        """Whether island 0 evaluates θ_b once `rounds` rounds are done."""
        k = self.cfg.eval_every_rounds
        return bool(k) and self.island_id_index == 0 and rounds % k == 0

    def maybe_evaluate_local(self) -> float | None:
        """Eval loss of this island's own model just before the round's sync, on rounds that
        evaluate θ_b. Only with one fragment (with several, part of the round is merged already)
        and without overlap (with it, the θ_b evaluated after the sync is still the previous
        round's). Against θ_b's loss after the merge it shows what the merge bought: negative when
        the islands drifted so far apart that their average is worse than each of them."""
        if (not self.cfg.eval_before_merge or self.cfg.fragments != 1 or self.cfg.overlap
                or not self.evaluates_round(self.stats.rounds + 1)):
            return None
        return self.trainer.evaluate()

    def maybe_evaluate(self, local_loss: float | None = None) -> None:
        if not self.evaluates_round(self.stats.rounds):
            return
        point: dict[str, float] = {"round": self.stats.rounds, "version": self.version,
                                   "loss": self.evaluate_broadcast()}
        if local_loss is not None:
            point["local_loss"] = local_loss
        self.stats.eval_curve.append(point)

    @property
    def island_id_index(self) -> int:
        return self.trainer.loader.island_id

    @torch.no_grad()
    def evaluate_broadcast(self) -> float:
        """Eval loss of θ_b (the model every island shares), without disturbing local weights."""
        saved = {n: t.clone() for n, t in self.local.items()}
        for n, t in self.local.items():
            t.copy_(self.theta_b[n])
        loss = self.trainer.evaluate()
        for n, t in self.local.items():
            t.copy_(saved[n])
        return loss

    # ---- one sync -------------------------------------------------------------------------------

    def sync(self, fragment: int, last: bool = False) -> None:
        """Push the fragment's pseudo-gradient; merge the new θ_b now, or (overlap) when it lands.
        `last`: the island's final push of this fragment (the coordinator stops counting it in quorums
        once every fragment's last push is in)."""
        start = time.perf_counter()
        # A fragment's next pseudo-gradient needs the θ_b its last sync produced.
        self.wait_until(lambda: fragment not in self.outstanding, f"fragment {fragment}'s last sync")
        names = self.fragments[fragment]
        with torch.no_grad():
            snapshot = {n: self.local[n].detach().clone() for n in names}
            delta = {n: self.theta_b[n] - snapshot[n] for n in names}
        self.snapshots[fragment] = snapshot
        payload, _ = self.feedback[fragment].encode(delta, self.cfg.codec)
        round_ = self.rounds[fragment]
        self.outstanding[fragment] = round_
        self._compute_of[(fragment, round_)] = (self.stats.compute_s - self._compute_mark, time.time())
        self._compute_mark = self.stats.compute_s
        header = pb.PushHeader(fragment=fragment, round=round_, base_version=self.base_version[fragment],
                               tokens=self.token_sum, loss_mean=self.mean_loss(), eval_loss=float("nan"),
                               timeline=self.timeline, last=last)
        self.loss_sum, self.loss_count, self.token_sum = 0.0, 0, 0
        lane = self.link.push_lane(fragment) if hasattr(self.link, "push_lane") else 0
        pusher = self.pushers.get(lane) or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"push-{lane}")
        future = self.pushers.setdefault(lane, pusher).submit(self.push, header, payload)
        future.add_done_callback(lambda _: self.arrived.set())  # wakes wait_until
        self.pushes.append(future)
        if not self.cfg.overlap:
            self.wait_until(lambda: fragment not in self.outstanding, f"fragment {fragment} round {round_}")
        self.stats.blocked_s += time.perf_counter() - start
        self.stats.sync_log.append({"fragment": fragment, "round": round_, "version": self.version,
                                    "seconds": time.perf_counter() - start})
        self.telemetry.synced(fragment)

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")

    def wait_until(self, done, what: str) -> None:
        """Merge arrivals until `done()`; raise what a push or the receiver raised; bounded by
        `commit_timeout_s` of time with a coordinator (time without one waits as the link does)."""
        away = getattr(self.link, "coordinator_wait_s", 0.0)
        deadline = time.monotonic() + self.cfg.commit_timeout_s
        while True:
            now_away = getattr(self.link, "coordinator_wait_s", 0.0)
            deadline, away = deadline + (now_away - away), now_away
            self.apply_arrivals()
            for future in [f for f in self.pushes if f.done()]:
                self.pushes.remove(future)
                future.result()  # re-raises a failed push here, on the training thread
            if self.receiver_error is not None:
                raise self.receiver_error
            if done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"island {self.island_id}: waited {self.cfg.commit_timeout_s}s for {what}")
            self.arrived.wait(0.5)
            self.arrived.clear()

    def push(self, header: pb.PushHeader, payload: Payload) -> None:
        """Send one pseudo-gradient and account for the outcome (runs on the pusher thread)."""
        fragment, round_ = header.fragment, header.round
        compute_s, synced_at = self._compute_of.pop((fragment, round_), (0.0, time.time()))
        header.compute_s = self.stats.compute_s
        record = {"round": round_, "fragment": fragment, "base_version": header.base_version,
                  "compute_s": compute_s, "synced_at": synced_at, "timeline": header.timeline}
        outcome = self.link.push(header, payload)
        with self._push_lock:  # pushers of several lanes count their outcomes here
            if outcome.status in ("stale", "other_timeline"):
                log.warning("island %s: push of fragment %d round %d dropped: %s", self.island_id, fragment, round_,
                            outcome.message)
                self.stats.dropped_pushes += 1
                self.ack_log.write({"event": "dropped", **record, "message": outcome.message})
                if outcome.status == "other_timeline":  # computed on a timeline a rollback abandoned
                    self.link.events.put(pb.Event(kind=pb.Event.ROLLBACK, message="push refused for another timeline"))
                return
            if outcome.status == "already_received":
                log.info("island %s: fragment %d round %d was already received", self.island_id, fragment, round_)
            else:
                log.info("island %s pushed fragment %d round %d (%s)", self.island_id, fragment, round_,
                         outcome.message)
            self.stats.pushes += 1
            self.ack_log.write({"event": "push", **record, "version": outcome.version, "message": outcome.message})
            self.steps.pushed(self, {"fragment": fragment, "round": round_, "base_version": header.base_version,
                                     "tokens": header.tokens, "t": time.time()})

    # ---- pulls and merges -----------------------------------------------------------------------

    def fetch(self, since: int, full: bool = False) -> list[tuple[pb.PayloadHeader, dict[str, torch.Tensor]]]:
        """Every delta after version `since` (or the full copy), decoded, in version order."""
        out = []
        for header, payload in self.link.fetch(since, full):
            names = self.names if header.full else self.fragments[header.fragment]
            out.append((header, decode(payload, [self.specs[n] for n in names])))
        return out

    def _receive(self) -> None:
        """Receiver thread: on each commit event (or a resync after a reconnect), fetch the new
        deltas for the training thread; on a rollback, the full θ_b; pass guard skips along."""
        fetched, timeline = self.version, self.timeline
        self._fetched = fetched
        try:
            while not self._stop.is_set():
                try:
                    event = self.link.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event.kind == pb.Event.SHUTDOWN:
                    raise RuntimeError(f"coordinator shut down: {event.message}")
                if event.kind == pb.Event.SKIPPED:
                    self.arrivals.put(("skip", event))
                    self.arrived.set()
                    continue
                reload = event.kind == pb.Event.ROLLBACK or (event.kind == pb.Event.COMMITTED and
                                                             event.timeline != timeline)
                resync = event.kind == pb.Event.UNKNOWN  # after a reconnect: whatever was missed
                if not (reload or resync or (event.kind == pb.Event.COMMITTED and event.version > fetched)):
                    continue
                records = self.fetch(fetched, full=reload)
                if any(h.timeline != timeline for h, _ in records) and not reload:
                    records = self.fetch(fetched, full=True)  # rolled back meanwhile
                for header, tensors in records:
                    self.arrivals.put((header, tensors))
                    fetched, timeline = header.version, header.timeline
                self._fetched = fetched
                self.arrived.set()
        except Exception as exc:  # surfaced on the training thread by wait_until
            if not self._stop.is_set():
                self.receiver_error = exc
                self.arrived.set()

    def apply_arrivals(self) -> None:
        while True:
            try:
                header, tensors = self.arrivals.get_nowait()
            except queue.Empty:
                return
            if header == "skip":
                self.apply_skip(tensors)
            else:
                self.apply_payload(header, tensors)

    def apply_skip(self, event: pb.Event) -> None:
        """The guard refused `event.round` of `event.fragment`: θ_b stays; the round moves on and the
        pseudo-gradient's progress is dropped (θ_local ← θ_b + what was trained since the snapshot)."""
        fragment, round_ = event.fragment, event.round
        if self.rounds[fragment] != round_:
            return
        snapshot = self.snapshots.pop(fragment, None)
        if snapshot is not None:
            merge_local(self.local, self.theta_b, snapshot, self.fragments[fragment])
        self.rounds[fragment] += 1
        if self.outstanding.get(fragment) == round_:
            self.outstanding.pop(fragment)
        self.stats.skipped_rounds += 1
        log.warning("island %s: the coordinator refused fragment %d round %d (%s); θ_b stays at version %d",
                    self.island_id, fragment, round_, event.message, self.version)

    def after_full_copy(self, header: pb.PayloadHeader) -> None:
        """A full θ_b replaced the island's: after a rollback (another timeline) the local state
        restarts from it; either way the open rounds are the coordinator's now."""
        if header.timeline != self.timeline:
            self.timeline = header.timeline
            self.outstanding.clear()
            self.feedback = [ErrorFeedback(self.cfg.ef_decay) for _ in range(self.cfg.fragments)]
            self.stats.reloads += 1
            log.warning("island %s reloaded θ_b at version %d (timeline %d) after a rollback", self.island_id,
                        header.version, header.timeline)
        reply = self.link.heartbeat()
        rounds = [fs.round for fs in sorted(reply.fragments, key=lambda f: f.fragment)]
        for fragment, round_ in list(self.outstanding.items()):
            if rounds[fragment] > round_:  # that round closed: the full copy holds its outcome
                self.outstanding.pop(fragment)
        self.rounds = rounds

    @torch.no_grad()
    def apply_payload(self, header: pb.PayloadHeader, tensors: dict[str, torch.Tensor]) -> None:
        self.steps.before_apply(self, header)
        if header.full:
            self.theta_b = {n: tensors[n].clone() for n in self.names}
            for n, t in self.local.items():
                t.copy_(self.theta_b[n])
            self.version = header.version
            self.base_version = [header.version] * self.cfg.fragments
            self.snapshots.clear()
            if self._joined:
                self.after_full_copy(header)
            return
        if header.version != self.version + 1:
            raise RuntimeError(f"delta for version {header.version} cannot follow version {self.version}")
        fragment = header.fragment
        apply_delta(self.theta_b, tensors)
        snapshot = self.snapshots.pop(fragment, None)
        if snapshot is None:  # nothing trained since: θ_local moves with θ_b
            apply_delta(self.local, tensors)
        else:  # docs/design.md, step 10: keep what was trained since the snapshot
            merge_local(self.local, self.theta_b, snapshot, self.fragments[fragment])
        self.version = header.version
        self.base_version[fragment] = header.version
        self.rounds[fragment] += 1
        self.outstanding.pop(fragment, None)
        self.steps.applied(self, header)

    # ---- the connection -------------------------------------------------------------------------

    def connect(self) -> None:
        """Register, start the link's threads, take the first θ_b, start the receiver."""
        reg = self.link.register(self.config_hash)
        self.epoch, self.received_pushes, self.timeline = reg.epoch, reg.received_pushes, reg.timeline
        self.rounds = list(reg.rounds)
        self.link.start(on_heartbeat=self.check_drift, on_rejoin=self.rejoined)
        if self.local_checkpoints is not None and self.local_checkpoints.resume(self, reg):
            pass  # θ_b, θ_local and the inner state from its own checkpoint, caught up
        elif reg.theta_b_sha256 and reg.theta_b_sha256 == digest(self.local) and not self.theta_b:
            # This island already holds θ_b bit for bit (same seed, version 0): no need to pull it.
            self.theta_b = {n: t.detach().clone() for n, t in self.local.items()}
            self.version = reg.version
            self.base_version = [reg.version] * self.cfg.fragments
        else:
            for header, tensors in self.fetch(self.version, full=True):
                self.apply_payload(header, tensors)
        self._joined = True
        self.link.start_thread(self._receive, "receiver")
        log.info("island %s registered (epoch %d) at version %d", self.island_id, reg.epoch, self.version)
        self.steps.joined(self)

    def check_drift(self, reply: pb.HeartbeatReply) -> None:
        """Catch what a lost event stream missed: commits, a rollback, guard skips (heartbeat thread)."""
        events = self.link.events
        if reply.timeline != self.timeline:
            events.put(pb.Event(kind=pb.Event.ROLLBACK, version=reply.version, timeline=reply.timeline))
            return
        if reply.version > self._fetched:
            events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))
            return
        outstanding = dict(list(self.outstanding.items()))  # the training thread changes it
        for fs in reply.fragments:
            round_ = outstanding.get(fs.fragment)
            if round_ is not None and fs.round > round_ and fs.version <= self._fetched:
                events.put(pb.Event(kind=pb.Event.SKIPPED, fragment=fs.fragment, round=round_,
                                    version=reply.version, message="round closed without a commit"))

    def rejoined(self, reply: pb.RegisterReply) -> None:
        """The link registered again (a new epoch): catch up on what was missed, or reload θ_b if the
        coordinator is on another timeline now."""
        self.epoch = reply.epoch
        self.stats.rejoins += 1
        if reply.timeline != self.timeline:
            self.link.events.put(pb.Event(kind=pb.Event.ROLLBACK, version=reply.version, timeline=reply.timeline))
        else:
            self.link.events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))

    def close(self) -> None:
        """Stop the pusher and the background threads and wait for them (bounded)."""
        self._stop.set()
        if self.local_checkpoints is not None:
            self.local_checkpoints.close(CLOSE_TIMEOUT_S)
        for pusher in self.pushers.values():
            pusher.shutdown(wait=False, cancel_futures=True)
        stuck = self.link.close(CLOSE_TIMEOUT_S)
        self.stats.reconnects = getattr(self.link, "reconnects", 0)
        self.stats.coordinator_switches = getattr(self.link, "coordinator_switches", 0)
        self.stats.coordinator_wait_s = round(getattr(self.link, "coordinator_wait_s", 0.0), 2)
        self.telemetry.finished()
        if stuck:
            log.warning("island %s: threads %s still running after %.0fs", self.island_id, stuck, CLOSE_TIMEOUT_S)
