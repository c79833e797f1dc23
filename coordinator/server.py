"""The coordinator's gRPC services (grpc.aio): islands' RPCs and the operators' Admin RPCs.

Every input is validated here, at the trust boundary, before anything reaches the round engine
(framing: protos/framing.py; admission and the named refusals: coordinator/admission.py); a
refused call gets a gRPC status whose message names the problem, and changes nothing. A refusal
the island can repair by itself carries trailing metadata `archipelago-action` (see admission).

`coordinator/serve.py` runs these services (and the leader election).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch

from archipelago.checkpoint import read_checkpoint
from archipelago.errors import UserError
from archipelago.runinfo import strict_json
from coordinator.admission import NoSuchCheckpoint, PushClaim, Refused, admit, check_push_fields
from coordinator.config import CoordinatorConfig
from coordinator.ingest import BodyWriter, PushStreams, check_body, receive_body
from coordinator.membership import LeaseError, Member, Membership, load_tokens, same_secret
from coordinator.metrics import Metrics
from coordinator.params import Contribution, ParamState
from coordinator.rounds import RoundEngine, RoundEvent
from coordinator.store import Fenced, StateStore, sqlite_store
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.broadcast import digest
from protos.codec import CodecError, check_header
from protos.framing import FramingError, check_codec_header, check_frame, check_push_codec_header, frame
from protos.quant import compile_in_background, kernel_states

log = logging.getLogger(__name__)

STATUS = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION",
    "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "DATA_LOSS", "OUT_OF_RANGE", "UNAVAILABLE", "ABORTED")}


ACTION_KEY = "archipelago-action"  # trailing metadata: what the island should do about a refusal
STATUS_STORE_TIMEOUT_S = 2.0  # Status waits this long for the store before answering from memory


def load_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The initial global model written by `archipelago island init`: tensors and manifest."""
    files, manifest = read_checkpoint(path)
    if "model.safetensors" not in files or "config_hash" not in manifest:
        raise RuntimeError(f"{path} is not an initial model checkpoint (archipelago island init)")
    tensors = files["model.safetensors"]
    return {n: tensors[n] for n in manifest["tensor_names"]}, manifest


class Coordinator:
    """The state behind both services: membership, parameters, the round engine, metrics."""

    def __init__(self, cfg: CoordinatorConfig, init: str | Path, store: StateStore | None = None,
                 metrics: Metrics | None = None, leadership: Any = None) -> None:
        self.cfg = cfg
        # With etcd, the leader election (coordinator/etcd.py: LeaderElection): `leading()` by the
        # lease's local deadline, `problem()` why the store may not answer (docs/design.md,
        # "Standby coordinators and etcd"). None: the store is the local sqlite file.
        self.leadership = leadership
        tokens = load_tokens(cfg.islands_file)
        for island, token in (tokens or {}).items():
            if cfg.admin_credential and same_secret(token, cfg.admin_credential):
                raise UserError(f"coordinator.admin_credential is the token of island '{island}': an island "
                                "token must never open the admin RPCs; choose another admin credential")
        state_dir = Path(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        theta, manifest = load_init(init)
        self.config_hash = manifest["config_hash"]
        num_fragments = int(manifest["fragments"])
        cfg.check_fragments(num_fragments)
        # θ₀ of the whole model: while a shard is at version 0 every island can check it holds θ₀
        # (docs/design.md, "Sharded coordinator"); a shard keeps only its own fragments' tensors.
        self.init_digest = digest({n: t.float() for n, t in theta.items()}) if cfg.num_shards > 1 else ""
        self.store = store if store is not None else sqlite_store(state_dir)
        self.membership = Membership(self.store, cfg.lease_ttl_s, tokens)
        self.params = ParamState(theta, num_fragments, cfg.owned_fragments(num_fragments))
        run_meta = {"config_hash": self.config_hash, "model": manifest.get("model"),
                    "fragments": num_fragments, "tensor_names": manifest["tensor_names"]}
        self.engine = RoundEngine(cfg, self.params, self.store, self.membership, run_meta)
        self.engine.on_fenced = self.fenced
        if leadership is not None:
            self.engine.leading = leadership.leading
        self.streams = PushStreams(cfg.max_push_streams, cfg.max_push_streams_per_island)
        compile_in_background(cfg.broadcast_scheme)  # the merge's kernels come with each push's scheme
        self.resumed = self.engine.restore()
        self._check_shard_state()
        if not self.resumed:
            self.engine.checkpoint()
        self.metrics = metrics if metrics is not None else Metrics(cfg.metrics_port, cfg.host)
        self.engine.observer = self.metrics
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.lost_leadership = False
        self._digest: tuple[int, int, str] = (-1, -1, "")
        # the last checkpoint table read from the store, and when: a status without the store shows it
        self._store_view: tuple[dict[str, Any], float] | None = ({"checkpoints": self.store.checkpoints()}, time.time())

    def _check_shard_state(self) -> None:
        """A shard resumes only on its own state directory (its checkpoints hold only its fragments)."""
        shard = [self.cfg.shard_index, self.cfg.num_shards]
        recorded = list(self.store.get("shard", [0, 1]))
        if self.resumed and recorded != shard:
            raise UserError(f"state directory {self.cfg.state_dir} belongs to coordinator shard {recorded[0]} of "
                            f"{recorded[1]}, not to shard {shard[0]} of {shard[1]} (coordinator.shard_index, "
                            "coordinator.num_shards): give each shard its own state directory")
        if not self.resumed and self.cfg.num_shards > 1:
            self.store.put("shard", shard)

    def theta_b_digest(self) -> str:
        """sha256 of θ_b. On a shard (num_shards > 1) θ_b is only its fragments', which no island
        holds apart; while the shard is at version 0 of timeline 0 it answers θ₀'s digest of the
        whole model instead, which islands compare across shards (island/shard_link.py)."""
        if self.cfg.num_shards > 1 and self.engine.version == 0 and self.engine.timeline == 0:
            return self.init_digest
        key = (self.engine.version, self.engine.timeline)
        if self._digest[:2] != key:
            self._digest = (*key, digest(self.params.theta_b))
        return self._digest[2]

    def lease(self, lease: pb.Lease) -> Member:
        self.check_serving()
        try:
            member = self.membership.check(lease.island_id, lease.lease_id, lease.epoch)
        except LeaseError as exc:
            raise Refused(str(exc), exc.code, "register" if exc.code == "FAILED_PRECONDITION" else "") from exc
        self.membership.renew(member)
        return member

    def fenced(self, exc: Exception) -> Refused:
        """Stop serving: another coordinator leads the run now."""
        self.lost_leadership = True
        self.stop(f"{exc}")
        return Refused(f"this coordinator is no longer the leader: {exc}", "UNAVAILABLE")

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.log(logging.ERROR if self.lost_leadership else logging.INFO,
                    "not accepting pushes or commits from now on: %s", reason)
            self.stop_reason = reason
            self.stopping.set()
            for queue in list(self.engine.subscribers):  # each event stream ends with UNAVAILABLE
                queue.put_nowait(None)

    def refusal(self) -> Refused | None:
        """Why this coordinator takes no island call now (stopping, or the leader lease's deadline
        passed), as a refusal islands retry at their next address; None while it serves."""
        if self.stopping.is_set():
            return Refused(f"this coordinator stopped serving ({self.stop_reason}): try another address",
                           "UNAVAILABLE")
        if self.leadership is not None and not self.leadership.leading():
            return Refused("this coordinator no longer holds the leader lease: try another address", "UNAVAILABLE")
        return None

    def check_serving(self) -> None:
        refused = self.refusal()
        if refused is not None:
            raise refused

    def fragment_states(self) -> list[pb.FragmentState]:
        """The open round and last version of each fragment this coordinator owns (all, unsharded)."""
        e = self.engine
        return [pb.FragmentState(fragment=f, round=e.rounds[f], version=e.fragment_versions[f])
                for f in self.params.owned]

    async def status(self) -> pb.StatusReply:
        """The coordinator's status. The checkpoint table comes from the state store; when the store
        does not answer (etcd away) the reply is this coordinator's own view, marked `"view": "local"`
        with the reason, and its checkpoints as last read (docs/design.md, "Standby coordinators and
        etcd"). Never fails because etcd does."""
        why = self.leadership.problem() if self.leadership is not None else ""
        if not why:
            try:
                if self.leadership is None:  # sqlite: a local file
                    checkpoints = self.store.checkpoints()
                else:
                    checkpoints = await asyncio.wait_for(asyncio.to_thread(self.store.checkpoints),
                                                         STATUS_STORE_TIMEOUT_S)
                self._store_view = ({"checkpoints": checkpoints}, time.time())
            except Exception as exc:  # etcd did not answer: say so, answer from memory
                why = f"the state store did not answer ({type(exc).__name__}: {exc})"
        return self.status_reply(why)

    def status_reply(self, why: str = "") -> pb.StatusReply:
        now = time.monotonic()
        done = self.engine.done_islands()
        islands = [pb.IslandStatus(island_id=m.island_id, epoch=m.epoch,
                                   state="finished" if m.island_id in done else m.state,
                                   last_seen_s=now - m.last_seen, pushes=m.pushes, bytes_in=m.bytes_in,
                                   bytes_out=m.bytes_out)
                   for m in self.membership.members.values()]
        table, read_at = self._store_view if self._store_view is not None else ({"checkpoints": {}}, None)
        checkpoints = table["checkpoints"]
        history = list(self.engine.history)
        detail = {"version": self.engine.version, "rounds": self.engine.rounds,
                  "timeline": self.engine.timeline, "config_hash": self.config_hash, "resumed": self.resumed,
                  "replayed_versions": self.engine.replayed,
                  "pending_pushes": sum(len(p) for p in self.engine.pending),
                  "closing_fragments": sorted(self.engine.closing),
                  "codec_kernels": kernel_states(),
                  "live_islands": self.membership.live(), "finished_islands": sorted(done),
                  "last_checkpoint": checkpoints[max(checkpoints)] if checkpoints else None,
                  "checkpoints": sorted(checkpoints),
                  "guard": {**self.engine.guard.state(),
                            "decisions": [e for e in history if e.get("kind") in ("refused", "rollback")][-50:]},
                  "fragment_versions": self.engine.fragment_versions,
                  "islands_progress": self.metrics.islands_progress(),
                  "uptime_s": time.time() - self.started, "history": history[-50:],
                  "shard_index": self.cfg.shard_index, "num_shards": self.cfg.num_shards,
                  "fragments_owned": self.params.owned,
                  "view": "local" if why else "store"}
        if why:
            detail["view_reason"] = why
            detail["checkpoints_read_s_ago"] = None if read_at is None else time.time() - read_at
        if self.leadership is not None:
            detail["leader"] = {"epoch": self.leadership.epoch, "lease_deadline_s": self.leadership.remaining(),
                                "last_renewal_s_ago": time.time() - self.leadership.renewed_at}
        return pb.StatusReply(version=self.engine.version, fragments=self.fragment_states(),
                              islands=islands, json=json.dumps(strict_json(detail), allow_nan=False))

    async def run_ticker(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.engine.tick()
            except Fenced as exc:
                self.fenced(exc)
                return
            self.metrics.observe(self)
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=min(0.25, self.cfg.lease_ttl_s / 4))
            except asyncio.TimeoutError:
                pass


async def _abort(context: grpc.aio.ServicerContext, exc: Refused) -> None:
    if exc.action:
        context.set_trailing_metadata(((ACTION_KEY, exc.action),))
    await context.abort(STATUS[exc.code], str(exc))


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        c = self.c
        try:
            c.check_serving()
            c.membership.authenticate(request.island_id, request.token)
            if request.config_hash != c.config_hash:
                raise Refused(f"config hash {request.config_hash!r} of island '{request.island_id}' differs "
                              "from the run's (model, tensors or fragments differ)", "FAILED_PRECONDITION")
            member = c.membership.register(request.island_id, request.token)
            received = c.store.received_count(member.island_id)
        except LeaseError as exc:
            await context.abort(STATUS[exc.code], str(exc))
        except Refused as exc:
            await _abort(context, exc)
        except Fenced as exc:
            await _abort(context, c.fenced(exc))
        log.info("island %s registered (epoch %d)", member.island_id, member.epoch)
        return pb.RegisterReply(lease_id=member.lease_id, lease_ttl_s=c.cfg.lease_ttl_s, epoch=member.epoch,
                                version=c.engine.version, fragments=c.fragment_states(),
                                broadcast_scheme=c.cfg.broadcast_scheme,
                                staleness_limit=c.cfg.staleness_limit,
                                theta_b_sha256=c.theta_b_digest(), timeline=c.engine.timeline,
                                received_pushes=received,
                                num_shards=c.cfg.num_shards, shard_index=c.cfg.shard_index)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        try:
            self.c.lease(request.lease)
        except Refused as exc:
            await _abort(context, exc)
        return pb.HeartbeatReply(version=self.c.engine.version, fragments=self.c.fragment_states(),
                                 timeline=self.c.engine.timeline)

    async def PullParams(self, request: pb.PullRequest, context) -> AsyncIterator[pb.PayloadPart]:
        c = self.c
        try:
            member = c.lease(request.lease)
        except Refused as exc:
            await _abort(context, exc)
            return
        if not request.full and request.since_version > c.engine.version:
            await _abort(context, Refused(
                f"since_version {request.since_version} is ahead of the coordinator's version {c.engine.version} "
                f"(timeline {c.engine.timeline}): this coordinator never produced it; pull the full θ_b",
                "FAILED_PRECONDITION", "reload"))
            return
        async with c.engine.lock:
            records = None if request.full else c.engine.deltas_since(request.since_version)
            if records is None:
                version, payload = await asyncio.to_thread(c.engine.full_copy)
                messages = frame(pb.PayloadPart, pb.PayloadHeader(version=version, fragment=-1, full=True,
                                                                  timeline=c.engine.timeline), payload, c.cfg.chunk_bytes)
            else:
                messages = []
                for r in records:
                    messages += frame(pb.PayloadPart, pb.PayloadHeader(
                        version=r.version, fragment=r.fragment, full=False, timeline=c.engine.timeline),
                        r.payload, c.cfg.chunk_bytes)
        sent = c.metrics.bytes_out.labels(island=member.island_id)
        for message in messages:
            member.bytes_out += message.ByteSize()
            sent.inc(message.ByteSize())
            yield message

    async def PushPseudoGrad(self, request_iterator, context) -> pb.PushReply:
        """Acknowledged once durable (spilled, recorded pending): the round it completes closes after
        the reply, and islands hear of the commit as a COMMITTED event (docs/design.md step 6)."""
        c = self.c
        stream: list[tuple[str, int, int]] = []  # the key this stream holds a slot for, once it has one
        try:
            try:  # admission reads the store: one that does not answer ends this leader's term
                contribution, member, nbytes, timeline = await self._receive_push(request_iterator, stream)
            except Fenced as exc:
                raise c.fenced(exc) from exc
            open_round = c.engine.rounds[contribution.fragment]
            try:
                c.check_serving()
                version = await c.engine.submit(contribution, timeline)
            except Fenced as exc:
                raise c.fenced(exc) from exc
            except Refused:
                Path(contribution.path).unlink(missing_ok=True)
                raise
            refused = c.refusal()
            if refused is not None:  # durable under this leader's epoch: the next leader holds it
                raise Refused(f"{refused} (the push was recorded; the next leader answers that it holds it)",
                              "UNAVAILABLE")
        except Refused as exc:
            c.metrics.refused.labels(reason=exc.code).inc()
            log.warning("push refused: %s %s", exc.code, exc)
            await _abort(context, exc)
        finally:
            for key in stream:  # received (pending now) or refused: the slot is free again
                c.streams.close(key)
        log.info("push accepted: island %s round %d fragment %d (version %d)", member.island_id,
                 contribution.round, contribution.fragment, version)
        member.pushes += 1
        member.bytes_in += nbytes
        c.metrics.pushes.labels(island=member.island_id).inc()
        c.metrics.bytes_in.labels(island=member.island_id).inc(nbytes)
        late = "" if contribution.round >= open_round else (
            f" (late: round {contribution.round} was closed; counts toward round {open_round}, "
            f"weight {contribution.weight / max(1, contribution.tokens):.3g} per token)")
        return pb.PushReply(accepted=True, round=contribution.round, version=version,
                            message=f"accepted for fragment {contribution.fragment}{late}")

    async def _receive_push(self, request_iterator, stream: list) -> tuple[Contribution, Member, int, int]:
        """Read one push: lease, header, admission, a stream slot (its key appended to ``stream``),
        then the body into its spill file, checked."""
        c = self.c
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise Refused("a push must start with a PushHeader")
        h = first.header
        member = c.lease(h.lease)
        try:
            check_codec_header(h)
            claim = PushClaim(member.island_id, h.round, h.fragment, h.base_version, h.timeline)
            staleness = admit(claim, c.engine, c.cfg.staleness_limit)
            check_push_fields(h, c.cfg.max_tokens_per_push)
            check_frame(h, c.cfg.chunk_bytes, c.cfg.max_payload_bytes)
            codec_header = check_push_codec_header(h)
            compile_in_background(codec_header["scheme"])
            specs = c.params.fragment_specs(h.fragment)
            check_header(codec_header, specs)
            c.streams.open(claim.key)
            stream.append(claim.key)
            writer = BodyWriter(c.engine.temp_path(claim.key), h, codec_header)
            received = first.ByteSize() + await receive_body(writer, request_iterator)
        except FramingError as exc:
            raise Refused(str(exc), exc.code) from exc
        except CodecError as exc:
            raise Refused(f"payload refused: {exc}") from exc
        try:
            await asyncio.to_thread(check_body, writer.tmp, specs, c.cfg.max_update_norm)
        except BaseException:
            writer.tmp.unlink(missing_ok=True)
            raise
        weight = h.tokens * (c.cfg.staleness_discount ** staleness)
        return (Contribution(member.island_id, h.round, h.fragment, h.base_version, h.tokens, weight,
                             str(writer.tmp), h.loss_mean, h.eval_loss, h.compute_s, h.last),
                member, received, h.timeline)

    async def Subscribe(self, request: pb.SubscribeRequest, context) -> AsyncIterator[pb.Event]:
        c = self.c
        try:
            c.lease(request.lease)
        except Refused as exc:
            await _abort(context, exc)
            return
        queue: asyncio.Queue[RoundEvent | None] = asyncio.Queue()
        c.engine.subscribers.add(queue)
        if c.stopping.is_set():
            queue.put_nowait(None)
        try:
            while True:
                event = await queue.get()
                if event is None:  # this coordinator stopped serving: the island resubscribes elsewhere
                    await _abort(context, c.refusal() or Refused("this coordinator stopped serving", "UNAVAILABLE"))
                    return
                yield pb.Event(kind=pb.Event.Kind.Value(event.kind), version=event.version,
                               fragment=event.fragment, round=event.round, message=event.message,
                               timeline=event.timeline)
                if event.kind == "SHUTDOWN":
                    return
        finally:
            c.engine.subscribers.discard(queue)

    async def GetStatus(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        c = self.c
        tokens = c.membership.tokens
        if tokens is not None and not (request.island_id in tokens and
                                       same_secret(tokens[request.island_id], request.token)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "GetStatus needs a valid island id and token")
        return await c.status()


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    async def _check(self, credential: str, context) -> None:
        expected = self.c.cfg.admin_credential
        if not expected:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "admin RPCs are disabled: set coordinator.admin_credential")
        if not same_secret(expected, credential):
            # One answer for every wrong credential, island tokens included, so that this RPC cannot
            # tell a caller whether a string it tries is some island's token.
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong admin credential (admin RPCs need "
                                "coordinator.admin_credential; island tokens are not admin credentials)")

    async def Status(self, request: pb.AdminRequest, context) -> pb.StatusReply:
        await self._check(request.credential, context)
        return await self.c.status()

    async def Drain(self, request: pb.DrainRequest, context) -> pb.AdminReply:
        await self._check(request.credential, context)
        try:
            self.c.membership.drain(request.island_id)
        except LeaseError as exc:
            await context.abort(STATUS[exc.code], str(exc))
        return pb.AdminReply(ok=True, message=f"island '{request.island_id}' drained",
                             version=self.c.engine.version)

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.AdminReply:
        await self._check(request.credential, context)
        c, version = self.c, request.to_version
        try:
            event = await c.engine.rollback(version, f"operator rollback to version {version}", by="admin")
        except NoSuchCheckpoint as exc:
            await _abort(context, exc)
        except Fenced as exc:
            await _abort(context, c.fenced(exc))
        return pb.AdminReply(ok=True, message=f"rolled back to version {event.version} (timeline {event.timeline}); "
                             "islands were told to reload", version=event.version)

    async def Checkpoint(self, request: pb.AdminRequest, context) -> pb.AdminReply:
        await self._check(request.credential, context)
        try:
            async with self.c.engine.lock:
                path = await asyncio.to_thread(self.c.engine.checkpoint)
        except Fenced as exc:
            await _abort(context, self.c.fenced(exc))
        return pb.AdminReply(ok=True, message=str(path), version=self.c.engine.version)

    async def Shutdown(self, request: pb.AdminRequest, context) -> pb.AdminReply:
        await self._check(request.credential, context)
        self.c.engine.publish(RoundEvent("SHUTDOWN", self.c.engine.version, -1, 0, "shutdown by operator"))
        self.c.stop("shutdown by operator")
        return pb.AdminReply(ok=True, message="shutting down", version=self.c.engine.version)
