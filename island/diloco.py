"""The DiLoCo client: one island's outer loop around the untouched inner trainer.

    register; pull θ_b (unless already held bit for bit); θ_local = θ_b
    for each sync point (every H/F inner steps, fragments in turn):
        inner steps with AdamW on the island's own shard            (Trainer.train_step)
        Δ_f = θ_b_f − θ_local_f(t0), encoded with error feedback     (DESIGN.md step 4)
        push Δ_f on the pusher thread
        without overlap: wait for the commit; with overlap: keep training
        when the outer delta lands (receiver thread): θ_b += δ̂ and
        θ_local_f ← θ_b_f + (θ_local_f(now) − θ_local_f(t0))           (step 10)

Inner optimizer state never leaves the island (DiLoCo, Douillard et al., arXiv:2311.08105;
streaming fragments and overlap: Douillard et al., arXiv:2501.18512). The training thread is the
only one that touches the model; the pusher and receiver threads only move bytes.

Failures the client rides out by itself:
- the coordinator is unreachable (restart, failover): every RPC retries with exponential backoff
  for `reconnect_timeout_s`, trying each address of `--coordinator a:1,b:2` in turn;
- its lease is gone (a restarted or new leader, an expired lease): it registers again (a new
  epoch), re-sends what was not acknowledged under the new lease, and catches up on the versions it
  missed; a push the coordinator already holds is answered ALREADY_EXISTS, which counts as done;
- a push that arrives corrupted (DATA_LOSS: a chunk's crc32 or the body's sha256) is sent again;
- the guard refused a round (SKIPPED): θ_b stays, the pseudo-gradient is dropped;
- the coordinator rolled back (ROLLBACK, or a push refused for another timeline): the island pulls
  the full θ_b and restarts its local state from it.
A restarted island process (its epoch is above 1) resumes after the pushes the coordinator holds
from it, with its data position and lr schedule moved to that round.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from archipelago.config import ConfigError, config_hash
from island.train import Trainer, model_tensors
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.broadcast import apply_delta, digest
from protos.codec import Chunk, ErrorFeedback, Payload, TensorSpec, decode, join_chunks, split_chunks
from protos.fragments import split_fragments
from protos.quant import SCHEMES
from protos.transport import open_channel

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CLOSE_TIMEOUT_S = 10.0  # close() waits this long, in all, for the background threads


@dataclass
class DiLoCoConfig:
    inner_steps: int = 50  # H
    fragments: int = 1  # F: streaming DiLoCo syncs fragment f at inner-step offset f·H/F
    codec: str = "int8-block"
    rounds: int = 6  # outer rounds each island runs
    # Inner steps of each round when they are not all H (e.g. short first rounds while islands
    # that leave one random init are still far from linearly connected); empty: H every round.
    round_steps: list[int] = field(default_factory=list)
    eval_every_rounds: int = 1  # island 0 evaluates θ_b after every k-th round; 0: never
    # On those rounds island 0 also evaluates its own model just before the merge (one fragment,
    # no overlap: only then is θ_b right after the sync the merge of that model): the difference
    # is what the merge bought (`merge_gain` in the sim report).
    eval_before_merge: bool = True
    # Overlap (DESIGN.md step 10): keep training while a sync is in flight and merge the new θ_b
    # when it arrives; block only when a fragment is due again before its last sync has merged.
    overlap: bool = False
    # After its last round the island waits until its last pushes are merged, so it ends holding
    # the final θ_b; false: it leaves once they are acknowledged (durable at the coordinator, which
    # applies them without the island), freeing its cluster while slower islands finish. Only with
    # overlap: without it every sync already waits for its merge.
    wait_last_merge: bool = True
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 20
    reconnect_timeout_s: float = 60.0
    # Longest wait between two attempts to reach a coordinator that is away (a failover, a restart,
    # a cut link), for the island's retries and for gRPC's own reconnects: the island is back at
    # most about this long after the coordinator is.
    retry_max_delay_s: float = 1.0
    commit_timeout_s: float = 600.0
    # TLS to the coordinator (PEM paths, `archipelago coordinator certs`): the CA that signed the
    # coordinator's certificate, and this island's client certificate and key for mutual TLS.
    # All empty: plaintext.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Append one JSON line per acknowledged push (and per start) to this file; "{island_id}" in it
    # is replaced by the island's id. Empty: none. The chaos runs read it to count lost updates.
    ack_log: str = ""

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.fragments < 1 or self.rounds < 1:
            raise ConfigError("diloco.inner_steps, diloco.fragments and diloco.rounds must be >= 1")
        if self.inner_steps % self.fragments:
            raise ConfigError(f"diloco.inner_steps ({self.inner_steps}) must be a multiple of "
                              f"diloco.fragments ({self.fragments})")
        if self.round_steps:
            if len(self.round_steps) != self.rounds:
                raise ConfigError(f"diloco.round_steps has {len(self.round_steps)} entries, diloco.rounds "
                                  f"is {self.rounds}")
            bad = [s for s in self.round_steps if s < 1 or s % self.fragments]
            if bad:
                raise ConfigError(f"diloco.round_steps entries must be positive multiples of "
                                  f"diloco.fragments ({self.fragments}), got {bad}")
        if self.codec not in SCHEMES:
            raise ConfigError(f"diloco.codec '{self.codec}' is not one of {sorted(SCHEMES)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("diloco.tls_cert and diloco.tls_key go together: give both or neither")
        if not self.retry_max_delay_s > 0:
            raise ConfigError(f"diloco.retry_max_delay_s must be > 0, got {self.retry_max_delay_s}")


    def steps_in_round(self, round_: int) -> int:
        """Inner steps of (0-based) outer round `round_`."""
        return self.round_steps[round_] if self.round_steps else self.inner_steps

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in_round(r) for r in range(self.rounds))

    def steps_before(self, round_: int) -> int:
        """Inner steps of the rounds before `round_` (the step count when it starts)."""
        return sum(self.steps_in_round(r) for r in range(round_))


def run_config_hash(model_cfg: Any, names_shapes: list[tuple[str, tuple[int, ...]]], fragments: int) -> str:
    """What must agree between every island and the coordinator: model, tensors, fragments."""
    from dataclasses import asdict

    return config_hash({"model": asdict(model_cfg), "tensors": [[n, list(s)] for n, s in names_shapes],
                        "fragments": fragments})


def synced_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The model's floating tensors that DiLoCo syncs (parameters and persistent buffers), by name.

    They are the live storage of the model: writing into them updates the model.
    """
    return {n: t for n, t in sorted(model_tensors(trainer.model).items()) if t.is_floating_point()}


@dataclass
class IslandStats:
    rounds: int = 0
    pushes: int = 0
    compute_s: float = 0.0
    blocked_s: float = 0.0
    reconnects: int = 0
    rejoins: int = 0  # registrations after the first (lease lost: coordinator restart, failover)
    skipped_rounds: int = 0  # rounds the coordinator's guard refused
    reloads: int = 0  # full θ_b reloads ordered by a rollback
    dropped_pushes: int = 0  # pushes of an abandoned timeline, never applied
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    sync_log: list[dict[str, float]] = field(default_factory=list)


class DiLoCoClient:
    def __init__(self, cfg: DiLoCoConfig, trainer: Trainer, address: str, island_id: str, token: str = "") -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.address = address
        self.island_id = island_id
        self.token = token
        self.local = synced_tensors(trainer)
        self.names = list(self.local)
        self.fragments = split_fragments(self.names, cfg.fragments)
        self.specs = {n: TensorSpec(n, tuple(t.shape), "float32") for n, t in self.local.items()}
        self.config_hash = run_config_hash(trainer.job.model, [(n, tuple(t.shape)) for n, t in
                                                               self.local.items()], cfg.fragments)
        self.theta_b: dict[str, torch.Tensor] = {}
        self.version = 0
        self.rounds = [0] * cfg.fragments
        self.base_version = [0] * cfg.fragments
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.feedback = [ErrorFeedback() for _ in range(cfg.fragments)]
        self.events: queue.Queue[pb.Event] = queue.Queue()
        self.stats = IslandStats()
        self.lease: pb.Lease | None = None
        self.ttl_s = 10.0
        self._stop = threading.Event()
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        self._address_index = 0
        self._old_channels: list[grpc.Channel] = []
        self.channel = self._open(self.addresses[0])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.timeline = 0  # the coordinator timeline θ_b belongs to (bumped by rollbacks)
        self.epoch = 0
        self._join_lock = threading.RLock()
        self._joined = False  # the first θ_b is in place
        self._fetched = 0  # the newest version the receiver has fetched
        self._compute_mark = 0.0
        self._compute_of: dict[tuple[int, int], tuple[float, float]] = {}  # (compute s, synced at)
        self.loss_sum = 0.0
        self.loss_count = 0
        self.token_sum = 0  # tokens of the inner steps since the last sync (steps may differ)
        self.outstanding: dict[int, int] = {}  # fragment -> round pushed but not merged yet
        self.arrivals: queue.Queue[tuple[pb.PayloadHeader, dict[str, torch.Tensor]]] = queue.Queue()
        self.arrived = threading.Event()
        self.receiver_error: BaseException | None = None
        self.pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push")
        self.pushes: list[Future] = []
        self._threads: list[threading.Thread] = []  # joined by close()

    # ---- the outer loop -------------------------------------------------------------------------

    def run(self) -> IslandStats:
        """Register, pull, and run `cfg.rounds` outer rounds of H inner steps each."""
        self.connect()
        # Join the fragment schedule where the run is: the fragment whose open round is oldest.
        first = min(range(self.cfg.fragments), key=lambda f: (self.rounds[f], f))
        order = [(first + i) % self.cfg.fragments for i in range(self.cfg.fragments)]
        start = self.resume_round()
        self.log_ack({"event": "start", "epoch": self.epoch, "round": start, "version": self.version})
        try:
            for round_ in range(start, self.cfg.rounds):
                per_fragment = self.cfg.steps_in_round(round_) // self.cfg.fragments
                local_loss = None
                for fragment in order:
                    self.inner_steps(per_fragment)
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

    def resume_round(self) -> int:
        """The first outer round this process runs: 0, or for a restarted island process (the
        coordinator knew it before: epoch > 1) the round after the pushes the coordinator holds from
        it, with the trainer's step and data position moved there so that its lr schedule and data
        go on where they were."""
        if self.epoch <= 1 or self.trainer.step:
            return 0
        start = min(self.received_pushes // self.cfg.fragments, self.cfg.rounds)
        steps = self.cfg.steps_before(start)
        self.trainer.step = steps
        loader = getattr(self.trainer, "loader", None)
        if loader is not None and loader.batches_per_epoch:
            loader.epoch, batch = divmod(steps, loader.batches_per_epoch)
            loader.position = batch * loader.batch_size
        log.info("island %s restarted: joining at round %d (inner step %d)", self.island_id, start, steps)
        return start

    def log_ack(self, record: dict[str, Any]) -> None:
        if not self.cfg.ack_log:
            return
        path = self.cfg.ack_log.replace("{island_id}", self.island_id)
        line = json.dumps({"island": self.island_id, "pid": os.getpid(), "t": time.time(), **record})
        with open(path, "a") as fh:
            fh.write(line + "\n")

    def inner_steps(self, steps: int) -> None:
        for _ in range(steps):
            self.apply_arrivals()  # a sync that landed meanwhile merges before the next step
            start = time.perf_counter()
            s = self.trainer.train_step()
            self.stats.compute_s += time.perf_counter() - start
            self.loss_sum += s.loss
            self.loss_count += 1
            self.token_sum += s.tokens

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
        tokens, loss_mean = self.tokens_since_sync(), self.mean_loss()
        self.loss_sum, self.loss_count, self.token_sum = 0.0, 0, 0
        future = self.pusher.submit(self.push, fragment, round_, self.base_version[fragment], payload, tokens,
                                    loss_mean, last)
        future.add_done_callback(lambda _: self.arrived.set())  # wakes wait_until
        self.pushes.append(future)
        if not self.cfg.overlap:
            self.wait_until(lambda: fragment not in self.outstanding, f"fragment {fragment} round {round_}")
        self.stats.blocked_s += time.perf_counter() - start
        self.stats.sync_log.append({"fragment": fragment, "round": round_, "version": self.version,
                                    "seconds": time.perf_counter() - start})

    def tokens_since_sync(self) -> int:
        """Tokens the island trained on since its last sync (the push's weight)."""
        return self.token_sum

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")

    def wait_until(self, done, what: str) -> None:
        """Merge arrivals until `done()`; raise what a push or the receiver raised; bounded."""
        deadline = time.monotonic() + self.cfg.commit_timeout_s
        while True:
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

    def push(self, fragment: int, round_: int, base_version: int, payload: Payload, tokens: int,
             loss_mean: float, last: bool = False) -> None:
        """Stream one pseudo-gradient (runs on the pusher thread)."""
        chunks = split_chunks(payload.body, self.cfg.chunk_bytes)

        def messages():
            yield pb.PushPart(header=pb.PushHeader(
                lease=self.lease, fragment=fragment, round=round_, base_version=base_version,
                tokens=tokens, loss_mean=loss_mean, eval_loss=float("nan"), scheme=payload.header["scheme"],
                codec_header=payload.header_bytes(), body_len=len(payload.body),
                body_sha256=payload.header["body_sha256"], num_chunks=len(chunks),
                compute_s=self.stats.compute_s, timeline=timeline,
                codec_header_crc32=zlib.crc32(payload.header_bytes()), last=last))
            for c in chunks:
                yield pb.PushPart(chunk=pb.Chunk(index=c.index, data=c.data, crc32=c.crc32))

        timeline = self.timeline
        compute_s, synced_at = self._compute_of.pop((fragment, round_), (0.0, time.time()))
        record = {"round": round_, "fragment": fragment, "base_version": base_version, "compute_s": compute_s,
                  "synced_at": synced_at, "timeline": timeline}
        try:
            reply = self.call(lambda: self.stub.PushPseudoGrad(messages()), resend=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # a retry of a push the coordinator holds
                log.info("island %s: fragment %d round %d was already received", self.island_id, fragment, round_)
                self.stats.pushes += 1
                self.log_ack({"event": "push", **record, "version": -1, "message": exc.details()})
                return
            if _action(exc) == "drop":  # too stale to apply (a straggler): the island goes on
                log.warning("island %s: push of fragment %d round %d dropped: %s", self.island_id, fragment,
                            round_, exc.details())
                self.stats.dropped_pushes += 1
                self.log_ack({"event": "dropped", **record, "message": exc.details()})
                return
            if _action(exc) == "reload":  # computed on a timeline a rollback abandoned
                log.warning("island %s: push of fragment %d round %d dropped: %s", self.island_id, fragment,
                            round_, exc.details())
                self.stats.dropped_pushes += 1
                self.log_ack({"event": "dropped", **record, "message": exc.details()})
                self.events.put(pb.Event(kind=pb.Event.ROLLBACK, message="push refused for another timeline"))
                return
            raise
        self.stats.pushes += 1
        self.log_ack({"event": "push", **record, "version": reply.version, "message": reply.message})
        log.info("island %s pushed fragment %d round %d (%s)", self.island_id, fragment, round_, reply.message)

    # ---- pulls and merges -----------------------------------------------------------------------

    def fetch(self, since: int, full: bool = False) -> list[tuple[pb.PayloadHeader, dict[str, torch.Tensor]]]:
        """Every delta after version `since` (or the full copy), decoded, in version order."""
        stream = self.call(lambda: list(self.stub.PullParams(
            pb.PullRequest(lease=self.lease, full=full, since_version=since))))
        out, header, chunks = [], None, []
        for part in stream + [None]:
            if part is None or part.WhichOneof("part") == "header":
                if header is not None:
                    body = join_chunks(chunks, header.body_len, header.body_sha256)
                    payload = Payload.from_header_bytes(header.codec_header, body)
                    names = self.names if header.full else self.fragments[header.fragment]
                    out.append((header, decode(payload, [self.specs[n] for n in names])))
                if part is not None:
                    header, chunks = part.header, []
            else:
                chunks.append(Chunk(part.chunk.index, part.chunk.data, part.chunk.crc32))
        return out

    def _receive(self) -> None:
        """Receiver thread: on each commit event (or a resync after a reconnect), fetch the new
        deltas for the training thread; on a rollback, the full θ_b; pass guard skips along."""
        fetched, timeline = self.version, self.timeline
        self._fetched = fetched
        try:
            while not self._stop.is_set():
                try:
                    event = self.events.get(timeout=0.5)
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

    @torch.no_grad()
    def apply_skip(self, event: pb.Event) -> None:
        """The guard refused `event.round` of `event.fragment`: θ_b stays; the round moves on and the
        pseudo-gradient's progress is dropped (θ_local ← θ_b + what was trained since the snapshot)."""
        fragment, round_ = event.fragment, event.round
        if self.rounds[fragment] != round_:
            return
        snapshot = self.snapshots.pop(fragment, None)
        if snapshot is not None:
            for n in self.fragments[fragment]:
                self.local[n].copy_(self.theta_b[n] + (self.local[n] - snapshot[n]))
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
            self.feedback = [ErrorFeedback() for _ in range(self.cfg.fragments)]
            self.stats.reloads += 1
            log.warning("island %s reloaded θ_b at version %d (timeline %d) after a rollback", self.island_id,
                        header.version, header.timeline)
        reply = self.call(lambda: self.stub.Heartbeat(pb.HeartbeatRequest(lease=self.lease), timeout=self.ttl_s))
        rounds = [fs.round for fs in sorted(reply.fragments, key=lambda f: f.fragment)]
        for fragment, round_ in list(self.outstanding.items()):
            if rounds[fragment] > round_:  # that round closed: the full copy holds its outcome
                self.outstanding.pop(fragment)
        self.rounds = rounds

    @torch.no_grad()
    def apply_payload(self, header: pb.PayloadHeader, tensors: dict[str, torch.Tensor]) -> None:
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
        names = self.fragments[fragment]
        delta = tensors
        apply_delta(self.theta_b, delta)
        snapshot = self.snapshots.pop(fragment, None)
        for n in names:  # DESIGN.md step 10: keep what was trained since the snapshot
            if snapshot is None:
                self.local[n].add_(delta[n])
            else:
                self.local[n].copy_(self.theta_b[n] + (self.local[n] - snapshot[n]))
        self.version = header.version
        self.base_version[fragment] = header.version
        self.rounds[fragment] += 1
        self.outstanding.pop(fragment, None)

    # ---- connection -----------------------------------------------------------------------------

    def connect(self) -> None:
        reply = self.call(lambda: self.stub.Register(pb.RegisterRequest(
            island_id=self.island_id, token=self.token, config_hash=self.config_hash)), register=False)
        self.lease = pb.Lease(island_id=self.island_id, lease_id=reply.lease_id, epoch=reply.epoch)
        self.ttl_s = reply.lease_ttl_s
        self.epoch = reply.epoch
        self.received_pushes = reply.received_pushes
        self.timeline = reply.timeline
        self.rounds = [fs.round for fs in sorted(reply.fragments, key=lambda f: f.fragment)]
        self.start_background()
        if reply.theta_b_sha256 and reply.theta_b_sha256 == digest(self.local) and not self.theta_b:
            # This island already holds θ_b bit for bit (same seed, version 0): no need to pull it.
            self.theta_b = {n: t.detach().clone() for n, t in self.local.items()}
            self.version = reply.version
            self.base_version = [reply.version] * self.cfg.fragments
        else:
            for header, tensors in self.fetch(self.version, full=True):
                self.apply_payload(header, tensors)
        self._joined = True
        self._start_thread(self._receive, "receiver")
        log.info("island %s registered (epoch %d) at version %d", self.island_id, reply.epoch, self.version)

    def start_background(self) -> None:
        self._start_thread(self._subscribe, "subscribe")
        self._start_thread(self._heartbeat, "heartbeat")

    def _start_thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _subscribe(self) -> None:
        lost = False
        while not self._stop.is_set():
            lease, stub = self.lease, self.stub
            try:
                stream = stub.Subscribe(pb.SubscribeRequest(lease=lease))
                if lost:  # whatever happened while the stream was down: the receiver catches up
                    self.events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))
                for event in stream:
                    lost = False
                    self.events.put(event)
                    if event.kind == pb.Event.SHUTDOWN:
                        return
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                lost = True
                log.warning("subscription lost (%s); retrying", exc.code())
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
            lease = self.lease
            try:
                reply = self.stub.Heartbeat(pb.HeartbeatRequest(lease=lease), timeout=self.ttl_s)
            except grpc.RpcError as exc:
                log.warning("heartbeat failed: %s", exc.code())
                try:
                    if _action(exc) == "register":
                        self.rejoin(lease)
                except grpc.RpcError as again:
                    log.warning("re-registration failed (%s)", again.code())
                continue
            self.check_drift(reply)

    def check_drift(self, reply: pb.HeartbeatReply) -> None:
        """Catch what a lost event stream missed: commits, a rollback, guard skips."""
        if reply.timeline != self.timeline:
            self.events.put(pb.Event(kind=pb.Event.ROLLBACK, version=reply.version, timeline=reply.timeline))
            return
        if reply.version > self._fetched:
            self.events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))
            return
        outstanding = dict(list(self.outstanding.items()))  # the training thread changes it
        for fs in reply.fragments:
            round_ = outstanding.get(fs.fragment)
            if round_ is not None and fs.round > round_ and fs.version <= self._fetched:
                self.events.put(pb.Event(kind=pb.Event.SKIPPED, fragment=fs.fragment, round=round_,
                                         version=reply.version, message="round closed without a commit"))

    def rejoin(self, stale: pb.Lease | None) -> None:
        """Register again (a new epoch) unless another thread already did since `stale` failed."""
        with self._join_lock:
            if self.lease is not stale:
                return
            reply = self.call(lambda: self.stub.Register(pb.RegisterRequest(
                island_id=self.island_id, token=self.token, config_hash=self.config_hash)), register=False)
            self.lease = pb.Lease(island_id=self.island_id, lease_id=reply.lease_id, epoch=reply.epoch)
            self.epoch = reply.epoch
            self.stats.rejoins += 1
            log.warning("island %s registered again (epoch %d) at coordinator version %d, timeline %d",
                        self.island_id, reply.epoch, reply.version, reply.timeline)
            if reply.timeline != self.timeline:
                self.events.put(pb.Event(kind=pb.Event.ROLLBACK, version=reply.version, timeline=reply.timeline))
            else:
                self.events.put(pb.Event(kind=pb.Event.UNKNOWN, message="resync"))

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
            self.channel = self._open(self.addresses[self._address_index])
            self.stub = pb_grpc.CoordinatorStub(self.channel)
            log.warning("island %s: trying coordinator %s", self.island_id, self.addresses[self._address_index])

    def call(self, fn, register: bool = True, resend: bool = False):
        """Run an RPC, retrying with exponential backoff while the coordinator is unreachable
        (trying each address in turn), registering again when the lease is gone, and, with
        `resend`, sending again what arrived corrupted (DATA_LOSS)."""
        deadline = time.monotonic() + self.cfg.reconnect_timeout_s
        delay = 0.2
        while True:
            lease, stub = self.lease, self.stub
            try:
                return fn()
            except grpc.RpcError as exc:
                if register and _action(exc) == "register" and time.monotonic() < deadline:
                    self.rejoin(lease)
                    continue
                retry = exc.code() in RETRYABLE or (resend and exc.code() == grpc.StatusCode.DATA_LOSS)
                if not retry or time.monotonic() + delay > deadline or self._stop.is_set():
                    raise
                self.stats.reconnects += 1
                log.warning("coordinator call failed (%s: %s); retrying in %.1fs", exc.code(), exc.details(), delay)
                if exc.code() in RETRYABLE and stub is self.stub:
                    self._next_address()
                time.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_max_delay_s)

    def close(self) -> None:
        """Stop the background threads and wait for them (bounded): a thread still inside gRPC or
        torch while the interpreter shuts down can abort the process."""
        self._stop.set()
        self.pusher.shutdown(wait=False, cancel_futures=True)
        self.channel.close()  # cancels the event stream and any call in flight
        for channel in self._old_channels:
            channel.close()
        others = [t for t in self._threads if t is not threading.current_thread()]
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in others if t.is_alive()]
        if stuck:
            log.warning("island %s: threads %s still running after %.0fs", self.island_id, stuck, CLOSE_TIMEOUT_S)


def _action(exc: grpc.RpcError) -> str:
    """What the coordinator asks the island to do about a refusal (trailing metadata), or ""."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:  # not a call error (e.g. a local failure): no advice
        return ""
    return next((value for key, value in metadata if key == "archipelago-action"), "")
