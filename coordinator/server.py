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
from coordinator.admission import NoSuchCheckpoint, PushClaim, Refused, admit, check_pseudo_gradient
from coordinator.config import CoordinatorConfig
from coordinator.membership import LeaseError, Member, Membership, load_tokens, same_secret
from coordinator.metrics import Metrics
from coordinator.params import Contribution, ParamState
from coordinator.rounds import RoundEngine, RoundEvent
from coordinator.store import Fenced, StateStore, sqlite_store
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.broadcast import digest
from protos.codec import CodecError, Payload, decode
from protos.framing import Assembler, FramingError, check_codec_header, frame

log = logging.getLogger(__name__)

STATUS = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION",
    "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "DATA_LOSS", "OUT_OF_RANGE", "UNAVAILABLE")}


ACTION_KEY = "archipelago-action"  # trailing metadata: what the island should do about a refusal


def load_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The initial global model written by `archipelago island init`: tensors and manifest."""
    files, manifest = read_checkpoint(path)
    if "model.safetensors" not in files or "config_hash" not in manifest:
        raise RuntimeError(f"{path} is not an initial model checkpoint (archipelago island init)")
    tensors = files["model.safetensors"]
    return {n: tensors[n] for n in manifest["tensor_names"]}, manifest


class Coordinator:
    """The state behind both services: membership, parameters, the round engine, metrics."""

    def __init__(self, cfg: CoordinatorConfig, init: str | Path, store: StateStore | None = None) -> None:
        self.cfg = cfg
        tokens = load_tokens(cfg.islands_file)
        for island, token in (tokens or {}).items():
            if cfg.admin_credential and same_secret(token, cfg.admin_credential):
                raise UserError(f"coordinator.admin_credential is the token of island '{island}': an island "
                                "token must never open the admin RPCs; choose another admin credential")
        state_dir = Path(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        theta, manifest = load_init(init)
        self.config_hash = manifest["config_hash"]
        self.store = store if store is not None else sqlite_store(state_dir)
        self.membership = Membership(self.store, cfg.lease_ttl_s, tokens)
        self.params = ParamState(theta, int(manifest["fragments"]))
        run_meta = {"config_hash": self.config_hash, "model": manifest.get("model"),
                    "fragments": int(manifest["fragments"]), "tensor_names": manifest["tensor_names"]}
        self.engine = RoundEngine(cfg, self.params, self.store, self.membership, run_meta)
        self.resumed = self.engine.restore()
        if not self.resumed:
            self.engine.checkpoint()
        self.metrics = Metrics(cfg.metrics_port, cfg.host)
        self.engine.observer = self.metrics
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.lost_leadership = False
        self._digest: tuple[int, int, str] = (-1, -1, "")

    def theta_b_digest(self) -> str:
        key = (self.engine.version, self.engine.timeline)
        if self._digest[:2] != key:
            self._digest = (*key, digest(self.params.theta_b))
        return self._digest[2]

    def lease(self, lease: pb.Lease) -> Member:
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
            log.log(logging.ERROR if self.lost_leadership else logging.INFO, "stopping: %s", reason)
            self.stop_reason = reason
            self.stopping.set()

    def fragment_states(self) -> list[pb.FragmentState]:
        e = self.engine
        return [pb.FragmentState(fragment=f, round=e.rounds[f], version=e.fragment_versions[f])
                for f in range(e.num_fragments)]

    def status(self) -> pb.StatusReply:
        now = time.monotonic()
        done = self.engine.done_islands()
        islands = [pb.IslandStatus(island_id=m.island_id, epoch=m.epoch,
                                   state="finished" if m.island_id in done else m.state,
                                   last_seen_s=now - m.last_seen, pushes=m.pushes, bytes_in=m.bytes_in,
                                   bytes_out=m.bytes_out)
                   for m in self.membership.members.values()]
        latest = self.store.latest_checkpoint()
        history = list(self.engine.history)
        detail = {"version": self.engine.version, "rounds": self.engine.rounds,
                  "timeline": self.engine.timeline, "config_hash": self.config_hash, "resumed": self.resumed,
                  "replayed_versions": self.engine.replayed,
                  "pending_pushes": sum(len(p) for p in self.engine.pending),
                  "live_islands": self.membership.live(), "finished_islands": sorted(done),
                  "last_checkpoint": latest[1] if latest else None,
                  "checkpoints": sorted(self.store.checkpoints()),
                  "guard": {**self.engine.guard.state(),
                            "decisions": [e for e in history if e.get("kind") in ("refused", "rollback")][-50:]},
                  "fragment_versions": self.engine.fragment_versions,
                  "islands_progress": self.metrics.islands_progress(),
                  "uptime_s": time.time() - self.started, "history": history[-50:]}
        return pb.StatusReply(version=self.engine.version, fragments=self.fragment_states(),
                              islands=islands, json=json.dumps(detail))

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
            c.membership.authenticate(request.island_id, request.token)
            if request.config_hash != c.config_hash:
                raise Refused(f"config hash {request.config_hash!r} of island '{request.island_id}' differs "
                              "from the run's (model, tensors or fragments differ)", "FAILED_PRECONDITION")
            member = c.membership.register(request.island_id, request.token)
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
                                received_pushes=c.store.received_count(member.island_id))

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
        c = self.c
        try:
            contribution, member, nbytes, payload, timeline = await self._receive_push(request_iterator)
            open_round = c.engine.rounds[contribution.fragment]
            try:
                version = await c.engine.submit(contribution, payload, timeline)
            except Fenced as exc:
                raise c.fenced(exc) from exc
        except Refused as exc:
            c.metrics.refused.labels(reason=exc.code).inc()
            log.warning("push refused: %s %s", exc.code, exc)
            await _abort(context, exc)
        member.pushes += 1
        member.bytes_in += nbytes
        c.metrics.pushes.labels(island=member.island_id).inc()
        c.metrics.bytes_in.labels(island=member.island_id).inc(nbytes)
        late = "" if contribution.round >= open_round else (
            f" (late: round {contribution.round} was closed; counts toward round {open_round}, "
            f"weight {contribution.weight / max(1, contribution.tokens):.3g} per token)")
        return pb.PushReply(accepted=True, round=contribution.round, version=version,
                            message=f"accepted for fragment {contribution.fragment}{late}")

    async def _receive_push(self, request_iterator) -> tuple[Contribution, Member, int, Payload, int]:
        """Read one push: lease, header, admission, then the chunks, the body and its checks."""
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
            assembler = Assembler(h, c.cfg.chunk_bytes, c.cfg.max_payload_bytes)
            received = first.ByteSize()
            async for part in request_iterator:
                if part.WhichOneof("part") != "chunk":
                    raise Refused("a push carries one PushHeader, then only chunks")
                received += part.ByteSize()
                assembler.add(part.chunk)
            payload = assembler.payload()
        except FramingError as exc:
            raise Refused(str(exc), exc.code) from exc
        try:
            delta = await asyncio.to_thread(decode, payload, c.params.fragment_specs(h.fragment))
        except CodecError as exc:
            raise Refused(f"payload refused: {exc}") from exc
        check_pseudo_gradient(delta, h.tokens, c.cfg.max_update_norm)
        weight = h.tokens * (c.cfg.staleness_discount ** staleness)
        return (Contribution(member.island_id, h.round, h.fragment, h.base_version, h.tokens, weight, delta,
                             h.loss_mean, h.eval_loss, h.compute_s, h.last), member, received, payload, h.timeline)

    async def Subscribe(self, request: pb.SubscribeRequest, context) -> AsyncIterator[pb.Event]:
        c = self.c
        try:
            c.lease(request.lease)
        except Refused as exc:
            await _abort(context, exc)
            return
        queue: asyncio.Queue[RoundEvent] = asyncio.Queue()
        c.engine.subscribers.add(queue)
        try:
            while True:
                event = await queue.get()
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
        return c.status()


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
        return self.c.status()

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
        async with self.c.engine.lock:
            path = await asyncio.to_thread(self.c.engine.checkpoint)
        return pb.AdminReply(ok=True, message=str(path), version=self.c.engine.version)

    async def Shutdown(self, request: pb.AdminRequest, context) -> pb.AdminReply:
        await self._check(request.credential, context)
        self.c.engine.publish(RoundEvent("SHUTDOWN", self.c.engine.version, -1, 0, "shutdown by operator"))
        self.c.stop("shutdown by operator")
        return pb.AdminReply(ok=True, message="shutting down", version=self.c.engine.version)
