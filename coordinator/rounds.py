"""The round engine: collects validated pushes per fragment, closes rounds, commits versions.

It knows nothing of gRPC. The server validates a push, hands a `Contribution` to `submit`, and
the engine closes the fragment's round when a quorum of live islands (or the deadline) is reached:
aggregate, outer step, quantized broadcast delta, persist, notify subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archipelago.checkpoint import prune_checkpoints, read_checkpoint, write_checkpoint
from coordinator.aggregate import Aggregator
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.params import Contribution, ParamState
from coordinator.store import SqliteStore
from protos.codec import Payload

log = logging.getLogger(__name__)


class StalePush(Exception):
    """A push that became too stale while it was streaming."""


@dataclass
class DeltaRecord:
    version: int
    fragment: int
    round: int
    payload: Payload


@dataclass
class RoundEvent:
    kind: str  # COMMITTED | ROLLBACK | SKIPPED | SHUTDOWN
    version: int
    fragment: int
    round: int
    message: str = ""


class RoundEngine:
    def __init__(self, cfg: CoordinatorConfig, params: ParamState, store: SqliteStore,
                 membership: Membership, run_meta: dict[str, Any]) -> None:
        self.cfg = cfg
        self.params = params
        self.store = store
        self.membership = membership
        self.run_meta = run_meta  # config hash, model config: recorded in every checkpoint
        self.num_fragments = len(params.fragments)
        self.aggregator = Aggregator(cfg, self.num_fragments)
        self.version = 0
        self.rounds = [0] * self.num_fragments
        self.fragment_versions = [0] * self.num_fragments
        self.pending: list[dict[tuple[str, int, int], Contribution]] = [{} for _ in range(self.num_fragments)]
        self.opened_at = [time.monotonic()] * self.num_fragments
        self.deltas: deque[DeltaRecord] = deque(maxlen=cfg.delta_log)
        self.lock = asyncio.Lock()
        self.subscribers: set[asyncio.Queue[RoundEvent]] = set()
        self.history: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(cfg.state_dir) / "checkpoints"

    # ---- state ----------------------------------------------------------------------------------

    def restore(self) -> bool:
        """Resume from the newest checkpoint in the state store; False when there is none."""
        latest = self.store.latest_checkpoint()
        if latest is None:
            return False
        version, path = latest
        files, manifest = read_checkpoint(path)
        if manifest.get("config_hash") != self.run_meta["config_hash"]:
            raise RuntimeError(f"checkpoint {path} belongs to another run (config hash "
                               f"{manifest.get('config_hash')} != {self.run_meta['config_hash']})")
        self.params.load(files)
        self.version = int(manifest["version"])
        self.rounds = list(manifest["rounds"])
        self.fragment_versions = list(manifest["fragment_versions"])
        if "update_norms" in manifest:
            self.aggregator.load(manifest["update_norms"])
        self.store.truncate_after(self.version)
        log.info("resumed from %s at version %d", path, self.version)
        return True

    def checkpoint(self) -> Path:
        """Write θ_g, θ_b and the outer momentum at the current version (atomic)."""
        path = self.checkpoint_dir / f"v{self.version:08d}"
        meta = {"kind": "coordinator", "version": self.version, "rounds": self.rounds,
                "fragment_versions": self.fragment_versions, "update_norms": self.aggregator.state(),
                **self.run_meta}
        write_checkpoint(path, self.params.tensors(), meta)
        self.store.record_checkpoint(self.version, str(path))
        prune_checkpoints(self.checkpoint_dir, "v", self.cfg.keep_checkpoints)
        return path

    def applied(self, key: tuple[str, int, int]) -> bool:
        return key in self.pending[key[2]] or self.store.was_applied(*key)

    # ---- rounds ---------------------------------------------------------------------------------

    async def submit(self, contribution: Contribution) -> int:
        """Queue a validated contribution; close the round if that completes a quorum.

        Raises KeyError for a key already received, StalePush if versions committed while the
        push was streaming made it older than the staleness limit.
        """
        async with self.lock:
            key = (contribution.island_id, contribution.round, contribution.fragment)
            if self.applied(key):
                raise KeyError(key)
            staleness = self.version - contribution.base_version
            if staleness > self.cfg.staleness_limit:
                raise StalePush(f"base version {contribution.base_version} is {staleness} versions old; "
                                f"the staleness limit is {self.cfg.staleness_limit}")
            self.pending[contribution.fragment][key] = contribution
            await self._maybe_close(contribution.fragment)
            return self.version

    def _ready(self, fragment: int) -> bool:
        pending = self.pending[fragment]
        if not pending:
            return False
        contributors = {k[0] for k in pending}
        if len(contributors) < self.cfg.min_islands:
            return False
        live = set(self.membership.live())
        if len(contributors & live) >= math.ceil(self.cfg.quorum * len(live)):
            return True
        return (self.cfg.round_deadline_s > 0 and
                time.monotonic() - self.opened_at[fragment] > self.cfg.round_deadline_s)

    async def _maybe_close(self, fragment: int) -> None:
        if self._ready(fragment):
            event = await asyncio.to_thread(self._close, fragment)
            self.publish(event)

    async def tick(self) -> None:
        """Called periodically: expire leases and close rounds they (or deadlines) unblocked."""
        async with self.lock:
            for island in self.membership.expire_overdue():
                log.warning("lease of island %s expired", island)
            for fragment in range(self.num_fragments):
                await self._maybe_close(fragment)

    def _close(self, fragment: int) -> RoundEvent:
        contributions = list(self.pending[fragment].values())
        round_ = self.rounds[fragment]
        grad, robust = self.aggregator(self.params, contributions, fragment)
        self.params.outer_step(grad, self.cfg.outer_lr, self.cfg.outer_momentum, self.cfg.nesterov)
        payload, update_norm = self.params.broadcast_delta(fragment, self.cfg.broadcast_scheme)
        self.version += 1
        self.fragment_versions[fragment] = self.version
        self.rounds[fragment] = round_ + 1
        info = {"islands": sorted({c.island_id for c in contributions}), "update_norm": update_norm,
                "tokens": sum(c.tokens for c in contributions),
                "loss_mean": _mean([c.loss_mean for c in contributions]),
                "eval_loss": _mean([c.eval_loss for c in contributions]),
                "staleness": [self.version - 1 - c.base_version for c in contributions],
                "time": time.time(), **robust}
        keys = list(self.pending[fragment])
        self.store.commit(self.version, fragment, round_, keys, info)
        self.pending[fragment] = {}
        self.opened_at[fragment] = time.monotonic()
        self.deltas.append(DeltaRecord(self.version, fragment, round_, payload))
        self.history.append({"version": self.version, "fragment": fragment, "round": round_, **info})
        if self.cfg.checkpoint_every and self.version % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        log.info("version %d: fragment %d round %d from %s, |δ| %.4g", self.version, fragment, round_,
                 info["islands"], update_norm)
        return RoundEvent("COMMITTED", self.version, fragment, round_)

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


def finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor with a NaN or Inf, or None."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None
