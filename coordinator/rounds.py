"""The round engine: collects validated pushes per fragment, closes rounds, commits versions.

It knows nothing of gRPC. The server validates a push and hands a `Contribution` (with the payload
as received) to `submit`; the engine closes the fragment's round when a quorum of live islands (or
the deadline) is reached: aggregate, outer step, divergence guard, quantized broadcast delta,
persist, notify subscribers.

Durability. A push is acknowledged only once it is durable: its body arrives into a temporary
file in `state_dir/spill/` (fsynced, coordinator/ingest.py), and `submit` renames it and records it
in the state store as pending before it returns. The round it completes closes after that, in the
background: its pushes were being summed meanwhile (coordinator/merge.py). A commit then writes
the broadcast delta file and (every `checkpoint_every` versions) a checkpoint, and records the
version, its push keys, their spill statuses, the delta, the checkpoint pointer and the engine's
counters in one store transaction. A restarted coordinator (or a standby that took
over) therefore loads the newest checkpoint, replays the committed versions after it from their
spilled pushes (checking each replayed delta's sha256 against the recorded one), and re-queues
the pushes still pending: the version never goes back past a commit, no acknowledged push is lost,
and none is applied twice. Spilled pushes and delta files are deleted once a checkpoint covers them.

Restore, replay, checkpoints and rollback live in coordinator/recovery.py (the engine's base).
Rollback (by the guard after repeated refusals, or by an operator) restores θ_g, θ_b and the outer
momentum of a checkpoint bit for bit and sets the version back to it. Round numbers keep counting
up (so push keys are never reused) and the timeline is bumped: versions after the target will be
reused on the new timeline, so pushes and pulls from the old one are refused and islands reload.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from coordinator.admission import PushClaim, admit, capped_tokens
from coordinator.aggregate import Aggregator
from coordinator.config import CoordinatorConfig
from coordinator.guard import Guard, round_loss
from coordinator.membership import Membership
from coordinator.merge import RoundMerge, mergeable
from coordinator.metrics import RoundObserver
from coordinator.params import Contribution, ParamState
from coordinator.recovery import DeltaRecord, Recovery, RoundEvent
from coordinator.spool import read_payload, write_payload
from coordinator.store import Fenced, Key, Spill, StateStore
from protos.broadcast import l2_norm
from protos.codec import Payload, decode

log = logging.getLogger(__name__)




@dataclass
class OuterStep:
    """One aggregate-and-step of a fragment: what the guard judges it by, and how to undo it."""

    saved: dict[str, dict[str, torch.Tensor]]  # the fragment's θ_g and momentum before the step
    norms_before: dict[str, Any]  # the aggregator's clipping window before the step
    grad: dict[str, torch.Tensor]  # the aggregated pseudo-gradient
    stepped: dict[str, torch.Tensor]  # the fragment's θ_g after the step
    step_norm: float  # ‖θ_g after − θ_g before‖₂
    robust: dict[str, Any]  # what robust aggregation did (recorded with the version)
    merge_s: float  # seconds the aggregation itself took (recorded with the version)
    merged_early: int = 0  # pushes summed before the round closed (the rest at its close)




class RoundEngine(Recovery):
    def __init__(self, cfg: CoordinatorConfig, params: ParamState, store: StateStore,
                 membership: Membership, run_meta: dict[str, Any]) -> None:
        self.cfg = cfg
        self.params = params
        self.store = store
        self.membership = membership
        self.run_meta = run_meta  # config hash, model config: recorded in every checkpoint
        self.num_fragments = len(params.fragments)
        self.aggregator = Aggregator(cfg, self.num_fragments)
        self.guard = Guard(cfg, self.num_fragments)
        self.version = 0
        self.timeline = 0
        self.rounds = [0] * self.num_fragments
        self.fragment_versions = [0] * self.num_fragments
        self.pending: list[dict[Key, Contribution]] = [{} for _ in range(self.num_fragments)]
        self.opened_at = [time.monotonic()] * self.num_fragments
        self.deltas: deque[DeltaRecord] = deque(maxlen=cfg.delta_log)
        self.lock = asyncio.Lock()
        self.subscribers: set[asyncio.Queue[RoundEvent]] = set()
        self.history: deque[dict[str, Any]] = deque(maxlen=200)
        state_dir = Path(cfg.state_dir)
        self.checkpoint_dir = state_dir / "checkpoints"
        self.spill_dir = state_dir / "spill"
        self.delta_dir = state_dir / "deltas"
        self.replayed = 0  # versions recomputed from spilled pushes at the last restore
        self.grace_until = 0.0  # after a restore: rounds wait this long for the known islands
        # island -> fragments whose last push (PushHeader.last) was applied or refused: an island
        # with all of them finished its run and no longer counts toward quorums.
        self.finished: dict[str, list[int]] = {}
        self.merges = {f: RoundMerge(params.fragment_specs(f), self._payload) for f in params.owned}
        self.received_here: set[Key] = set()  # pushes this process received (and hashed) itself
        self.closing: set[int] = set()  # fragments whose round is closing now
        self.on_fenced: Callable[[Fenced], None] = lambda exc: None  # another coordinator took over
        self.leading: Callable[[], bool] = lambda: True  # False once the leader lease may have lapsed
        self._tasks: set[asyncio.Task] = set()
        self.observer = RoundObserver()  # told of every commit and refusal (coordinator/metrics.py)

    # ---- state ----------------------------------------------------------------------------------

    def _payload(self, c: Contribution) -> Payload:
        """A pending push's payload from its spill file; hashed again unless this process received it."""
        return read_payload(c.path, verify_sha256=c.key not in self.received_here)

    def received(self, key: Key) -> bool:
        """True once a push with this key was taken (pending, applied, or refused by the guard)."""
        if key in self.pending[key[2]] or self.store.was_applied(key):
            return True
        spill = self.store.spill(key)
        return spill is not None and spill.status in ("pending", "refused")

    def meta(self, version: int | None = None, rounds: list[int] | None = None,
             fragment_versions: list[int] | None = None) -> dict[str, Any]:
        return {"rounds": rounds or self.rounds, "fragment_versions": fragment_versions or self.fragment_versions,
                "timeline": self.timeline, "version": self.version if version is None else version,
                "guard": self.guard.state(), "finished": self.finished}

    def done_islands(self) -> set[str]:
        """Islands whose last push of every fragment (a shard: of every fragment it owns) is applied
        or refused: they finished their run."""
        return {i for i, fragments in self.finished.items() if set(fragments) >= set(self.params.owned)}

    def _note_finished(self, contributions: list[Contribution]) -> None:
        for c in (c for c in contributions if c.last):
            fragments = self.finished.setdefault(c.island_id, [])
            if c.fragment not in fragments:
                fragments.append(c.fragment)
                fragments.sort()
                if set(fragments) >= set(self.params.owned):
                    log.info("island %s finished its run: rounds no longer wait for it", c.island_id)

    # ---- rounds ---------------------------------------------------------------------------------

    def spill_path(self, key: Key) -> Path:
        island, round_, fragment = key
        return self.spill_dir / quote(island, safe="") / f"r{round_:012d}-f{fragment:04d}-t{self.timeline}.bin"

    def temp_path(self, key: Key) -> Path:
        """Where a push's body is received (in the folder of its spill file, so that `submit` can
        rename it); unique per stream."""
        path = self.spill_path(key)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    async def submit(self, contribution: Contribution, timeline: int) -> int:
        """Make a validated push durable and queue it (its body is fsynced at ``contribution.path``,
        a `temp_path`); the version now. A round it completes closes after this returns.

        Admission is checked again under the lock (`admit` raises the refusal): while the push
        streamed, versions may have committed, a rollback may have happened, or the same push may
        have arrived on another stream.
        """
        async with self.lock:
            claim = PushClaim(contribution.island_id, contribution.round, contribution.fragment,
                              contribution.base_version, timeline)
            try:
                admit(claim, self, self.cfg.staleness_limit)
            except BaseException:
                Path(contribution.path).unlink(missing_ok=True)
                raise
            key, c = claim.key, contribution
            path = self.spill_path(key)
            os.replace(c.path, path)
            c.path = str(path)
            self.store.add_pending(key, Spill(time.time_ns(), str(path), c.base_version, c.tokens, c.weight,
                                              c.loss_mean, c.eval_loss, c.compute_s, last=c.last))
            self.received_here.add(key)
            if not self.pending[c.fragment]:  # the deadline runs from the round's first push
                self.opened_at[c.fragment] = time.monotonic()
            self.pending[c.fragment][key] = c
            self._spawn(self._merge_ahead(c.fragment))
            if self._ready(c.fragment):
                self.closing.add(c.fragment)
                self._spawn(self._close_soon(c.fragment))
            return self.version

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if isinstance(exc := task.exception(), Fenced):
            self.on_fenced(exc)
        elif exc is not None:
            log.error("round engine background task failed", exc_info=exc)

    async def _merge_ahead(self, fragment: int) -> None:
        """Sum the open round's pushes that are next in key order (coordinator/merge.py)."""
        expected = set(self.membership.live()) - self.done_islands()
        keys = mergeable(sorted(self.pending[fragment]), expected)
        merge = self.merges[fragment]
        if len(keys) > len(merge.summed):
            target = [self.pending[fragment][k] for k in keys]
            await asyncio.to_thread(merge.extend, target, merge.generation)

    async def _close_soon(self, fragment: int) -> None:
        try:
            async with self.lock:
                await self._maybe_close(fragment)
        finally:
            self.closing.discard(fragment)  # also when another call closed the round first

    async def drain(self) -> None:
        """Wait for the closes and merges already started (before shutting down)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _ready(self, fragment: int) -> bool:
        pending = self.pending[fragment]
        if not pending:
            return False
        contributors = {k[0] for k in pending}
        if len(contributors) < self.cfg.min_islands:
            return False
        done = self.done_islands()
        # A finished island's lease runs out on its own; rounds after its last one do not wait for it.
        live = set(self.membership.live()) - done
        if (time.monotonic() < self.grace_until
                and not set(self.store.known_islands()) <= live | contributors | done):
            return False
        if len(contributors & live) >= math.ceil(self.cfg.quorum * len(live)):
            return True
        return (self.cfg.round_deadline_s > 0 and
                time.monotonic() - self.opened_at[fragment] > self.cfg.round_deadline_s)

    async def _maybe_close(self, fragment: int) -> None:
        if self._ready(fragment):
            self.closing.add(fragment)
            try:
                events = await asyncio.to_thread(self._close, fragment)
            finally:
                self.closing.discard(fragment)
            for event in events:
                self.publish(event)

    async def tick(self) -> None:
        """Called periodically: expire leases and close rounds they (or deadlines) unblocked."""
        async with self.lock:
            done = self.done_islands()
            for island in self.membership.expire_overdue():
                if island in done:
                    log.info("lease of island %s ended after its run", island)
                else:
                    log.warning("lease of island %s expired", island)
            for fragment in range(self.num_fragments):
                await self._maybe_close(fragment)

    def _outer_step(self, fragment: int, contributions: list[Contribution], generation: int) -> OuterStep:
        """Aggregate and step θ_g in place (docs/design.md, step 7): the weighted mean from the
        round's merge, or, with robust aggregation, from every push decoded."""
        counted = capped_tokens([c.tokens for c in contributions], self.cfg.token_cap_factor)
        capped = {c.island_id: n for c, n in zip(contributions, counted, strict=True) if n != c.tokens}
        contributions = [c if n == c.tokens else replace(c, weight=c.weight * n / c.tokens)
                         for c, n in zip(contributions, counted, strict=True)]
        saved = self.params.save_fragment(fragment)
        norms_before = self.aggregator.state()
        merge = self.merges[fragment]
        merged_early = len(merge.summed)
        if self.aggregator.robust:
            start = time.perf_counter()
            specs = self.params.fragment_specs(fragment)
            deltas = [decode(self._payload(c), specs, verify_sha256=False) for c in contributions]
            grad, robust = self.aggregator(specs, contributions, deltas, fragment)
            merge_s = time.perf_counter() - start
        else:
            grad, robust = merge.mean(contributions, generation), {}
            merge_s = merge.seconds
        stepped = self.params.outer_step(grad, self.cfg.outer_lr, self.cfg.outer_momentum, self.cfg.nesterov)
        step_norm = l2_norm({n: stepped[n] - saved["theta_g"][n] for n in stepped})
        if capped:
            robust = {**robust, "tokens_capped": capped}
        return OuterStep(saved, norms_before, grad, stepped, step_norm, robust, merge_s, merged_early)

    def _close(self, fragment: int) -> list[RoundEvent]:
        # In key order, not arrival order: the weighted sum's float rounding depends on the order of
        # its terms, and θ_g must not depend on which island's push happened to arrive first.
        keys = sorted(self.pending[fragment])
        contributions = [self.pending[fragment][k] for k in keys]
        round_ = self.rounds[fragment]
        try:
            step = self._outer_step(fragment, contributions, self.merges[fragment].generation)
        finally:
            self.merges[fragment].reset()
        self.received_here.difference_update(keys)  # applied or refused now: never read again here
        loss = round_loss([(c.loss_mean, c.eval_loss) for c in contributions])
        reason = self.guard.check(fragment, step.grad, step.stepped, step.step_norm, loss)
        if reason is not None:
            self.params.restore_fragment(step.saved)
            self.aggregator.load(step.norms_before)
            return self._refuse(fragment, round_, keys, contributions, reason, step.step_norm, loss)
        return [self._commit(fragment, round_, keys, contributions, step, loss)]

    def _commit(self, fragment: int, round_: int, keys: list[Key], contributions: list[Contribution],
                step: OuterStep, loss: float) -> RoundEvent:
        # The new version becomes visible (status, heartbeats, registrations) only once it is durable.
        payload, update_norm = self.params.broadcast_delta(fragment, self.cfg.broadcast_scheme)
        version = self.version + 1
        fragment_versions = [version if f == fragment else v for f, v in enumerate(self.fragment_versions)]
        rounds = [round_ + 1 if f == fragment else r for f, r in enumerate(self.rounds)]
        self.guard.committed(fragment, step.step_norm, loss)
        self._note_finished(contributions)
        info = {"islands": sorted({c.island_id for c in contributions}), "update_norm": update_norm,
                "step_norm": step.step_norm, "tokens": sum(c.tokens for c in contributions),
                "loss_mean": _mean([c.loss_mean for c in contributions]),
                "eval_loss": _mean([c.eval_loss for c in contributions]),
                "staleness": [version - 1 - c.base_version for c in contributions],
                "delta_sha256": payload.header["body_sha256"], "timeline": self.timeline,
                "merge_s": step.merge_s, "merged_early": step.merged_early, "time": time.time(), **step.robust}
        if not self.leading():  # another leader may be writing this version's files in the shared directory
            raise Fenced(f"the leader lease lapsed before version {version} was written")
        delta_path = write_payload(self.delta_dir / f"v{version:012d}-t{self.timeline}.bin", payload)
        checkpoint = None
        if self.cfg.checkpoint_every and version % self.cfg.checkpoint_every == 0:
            checkpoint = str(self._write_checkpoint(version, rounds, fragment_versions))
        self.store.commit(version, fragment, round_, keys, info, self.timeline,
                          self.meta(version, rounds, fragment_versions),
                          delta={"path": str(delta_path), "fragment": fragment, "round": round_},
                          checkpoint=checkpoint)
        self.version, self.rounds, self.fragment_versions = version, rounds, fragment_versions
        self.pending[fragment] = {}
        self.observer.on_commit(fragment, round_, contributions, info, self.opened_at[fragment])
        self.opened_at[fragment] = time.monotonic()
        self.deltas.append(DeltaRecord(self.version, fragment, round_, payload))
        self.history.append({"kind": "committed", "version": self.version, "fragment": fragment, "round": round_,
                             **info})
        if checkpoint is not None:
            self._forget_covered()
        log.info("version %d: fragment %d round %d from %s, |δ| %.4g", self.version, fragment, round_,
                 info["islands"], update_norm)
        return RoundEvent("COMMITTED", self.version, fragment, round_, timeline=self.timeline)

    def _refuse(self, fragment: int, round_: int, keys: list[Key], contributions: list[Contribution],
                reason: str, step_norm: float, loss: float) -> list[RoundEvent]:
        in_a_row = self.guard.refused()
        self.rounds[fragment] = round_ + 1
        self.pending[fragment] = {}
        self.opened_at[fragment] = time.monotonic()
        event = {"kind": "refused", "version": self.version, "fragment": fragment, "round": round_,
                 "reason": reason, "islands": sorted({c.island_id for c in contributions}),
                 "step_norm": step_norm if math.isfinite(step_norm) else str(step_norm), "loss": loss,
                 "refusals_in_a_row": in_a_row, "timeline": self.timeline, "time": time.time()}
        self._note_finished(contributions)
        self.store.refuse(keys, event, self.meta())
        self.history.append(event)
        self.observer.on_refuse(fragment, round_, contributions, event)
        log.warning("guard refused fragment %d round %d (%d in a row): %s", fragment, round_, in_a_row, reason)
        events = [RoundEvent("SKIPPED", self.version, fragment, round_, reason, self.timeline)]
        if self.guard.should_roll_back():
            target = self.rollback_target()
            events.append(self._rollback(target, f"guard: {in_a_row} refused rounds in a row (last: {reason})",
                                         by="guard"))
        return events

    # ---- events and pulls -----------------------------------------------------------------------

    def publish(self, event: RoundEvent) -> None:
        for queue in list(self.subscribers):
            queue.put_nowait(event)

    def deltas_since(self, version: int) -> list[DeltaRecord] | None:
        """The deltas producing versions > `version`, or None if some were already dropped."""
        if version >= self.version:
            return []
        records = [d for d in self.deltas if d.version > version]
        if not records or records[0].version != version + 1:
            return None
        return records

    def full_copy(self) -> tuple[int, Payload]:
        return self.version, self.params.full_payload()


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v and not math.isinf(v)]
    return sum(finite) / len(finite) if finite else float("nan")

