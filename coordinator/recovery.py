"""The round engine's state over time: restore after a restart or failover, replay of committed
versions, checkpoints, rollback and the pruning of what checkpoints cover (docs/design.md,
"Durability, restart and replay" and "Rollback and timelines").

`Recovery` is the base of `coordinator/rounds.py: RoundEngine`: it works on the engine's state
(version, rounds, pending pushes, merges, store) and calls its outer step for a replay, so that
the round's life (submit, merge, close, commit) and the run's life across restarts read apart.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archipelago.checkpoint import prune_checkpoints, read_checkpoint, write_checkpoint
from coordinator.admission import NoSuchCheckpoint
from coordinator.params import Contribution
from coordinator.spool import read_payload, remove
from coordinator.store import Key, Spill
from protos.codec import Payload

log = logging.getLogger("coordinator.rounds")


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
    timeline: int = 0


class Recovery:
    """Restore, replay, checkpoints, rollback and pruning; see the module docstring."""

    def restore(self) -> bool:
        """Resume from the store: newest checkpoint, replay of the versions committed after it,
        pending pushes re-queued. False when the store holds no checkpoint (a fresh run)."""
        latest = self.store.latest_checkpoint()
        if latest is None:
            return False
        self._load_checkpoint(latest[1])
        spills = dict(self.store.spills())
        for version, row in self.store.deltas():
            if version <= self.version and Path(row["path"]).is_file():
                self.deltas.append(DeltaRecord(version, row["fragment"], row["round"], read_payload(row["path"])))
        for version, row in self.store.versions(after=self.version):
            self._replay(version, row, spills)
        self.timeline = int(self.store.get("timeline", 0))
        self.rounds = list(self.store.get("rounds", self.rounds))
        self.fragment_versions = list(self.store.get("fragment_versions", self.fragment_versions))
        self.guard.load(self.store.get("guard"))
        self.finished = {k: list(v) for k, v in self.store.get("finished", {}).items()}
        for key, spill in self.store.spills("pending"):
            self.pending[key[2]][key] = self._contribution(key, spill)
        self.opened_at = [time.monotonic()] * self.num_fragments
        # Islands re-register one by one after a restart or failover: give them one lease TTL before
        # a round closes without them (a round re-queued from before closes as soon as they are back).
        self.grace_until = time.monotonic() + self.cfg.lease_ttl_s
        entries = [{"kind": "committed", "version": v, "fragment": r["fragment"], "round": r["round"], **r["info"]}
                   for v, r in self.store.versions()] + self.store.events()
        self.history.extend(sorted(entries, key=lambda e: e.get("time", 0)))
        log.info("resumed from %s at version %d (timeline %d): %d versions replayed from spilled pushes, "
                 "%d pending pushes re-queued", latest[1], self.version, self.timeline, self.replayed,
                 sum(len(p) for p in self.pending))
        return True

    def _load_checkpoint(self, path: str) -> dict[str, Any]:
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
        return manifest

    def _replay(self, version: int, row: dict[str, Any], spills: dict[Key, Spill]) -> None:
        """Recompute committed version `version` from its spilled pushes, exactly as it was made."""
        assert version == self.version + 1, f"version {version} cannot follow {self.version}"
        fragment = row["fragment"]
        keys = [(k[0], int(k[1]), int(k[2])) for k in row["keys"]]
        missing = [k for k in keys if k not in spills]
        if missing:
            raise RuntimeError(f"cannot replay version {version}: spilled pushes {missing} are gone")
        generation = self.merges[fragment].reset()
        self._outer_step(fragment, [self._contribution(k, spills[k]) for k in keys], generation)
        self.merges[fragment].reset()
        payload, _ = self.params.broadcast_delta(fragment, self.cfg.broadcast_scheme)
        if payload.header["body_sha256"] != row["info"]["delta_sha256"]:
            raise RuntimeError(f"replaying version {version} gave another delta than the one committed "
                               "(state directory inconsistent)")
        self.version = version
        self.fragment_versions[fragment] = version
        self.deltas.append(DeltaRecord(version, fragment, row["round"], payload))
        self.replayed += 1

    def _contribution(self, key: Key, spill: Spill) -> Contribution:
        return Contribution(key[0], key[1], key[2], spill.base_version, spill.tokens, spill.weight, spill.path,
                            spill.loss_mean, spill.eval_loss, spill.compute_s, spill.last)

    def _write_checkpoint(self, version: int | None = None, rounds: list[int] | None = None,
                          fragment_versions: list[int] | None = None) -> Path:
        """The parameters now, as the state of `version` (default: the current one)."""
        version = self.version if version is None else version
        path = self.checkpoint_dir / f"v{version:08d}"
        meta = {"kind": "coordinator", "version": version, "rounds": rounds or self.rounds,
                "fragment_versions": fragment_versions or self.fragment_versions,
                "update_norms": self.aggregator.state(), "timeline": self.timeline, **self.run_meta}
        return write_checkpoint(path, self.params.tensors(), meta)

    def checkpoint(self) -> Path:
        """Write θ_g, θ_b and the outer momentum at the current version (atomic) and record it."""
        path = self._write_checkpoint()
        self.store.record_checkpoint(self.version, str(path))
        self._prune_checkpoints()
        return path

    def rollback_target(self) -> int:
        """The newest kept checkpoint older than the current version (the current one if none is)."""
        kept = [v for v, p in self.store.checkpoints().items() if Path(p).is_dir()]
        older = [v for v in kept if v < self.version]
        return max(older) if older else max(kept)

    async def rollback(self, version: int, reason: str, by: str) -> RoundEvent:
        async with self.lock:
            event = await asyncio.to_thread(self._rollback, version, reason, by)
            self.publish(event)
            return event

    def _rollback(self, version: int, reason: str, by: str) -> RoundEvent:
        """Restore the checkpoint of `version` (NoSuchCheckpoint if no kept checkpoint holds it)."""
        table = self.store.checkpoints()
        if version not in table or not Path(table[version]).is_dir():
            kept = sorted(v for v, p in table.items() if Path(p).is_dir())
            raise NoSuchCheckpoint(f"version {version} has no kept checkpoint to roll back to (kept checkpoints: "
                                   f"{kept}; the current version is {self.version})")
        previous, rounds = self.version, list(self.rounds)
        self._load_checkpoint(table[version])
        self.rounds = [r + 1 for r in rounds]  # round numbers never go back: push keys stay unique
        self.timeline += 1
        discarded = [list(k) for p in self.pending for k in p]
        self.received_here.clear()
        self.pending = [{} for _ in range(self.num_fragments)]
        for merge in self.merges.values():
            merge.reset()
        self.opened_at = [time.monotonic()] * self.num_fragments
        self.deltas.clear()
        self.guard.refusals = 0
        event = {"kind": "rollback", "from_version": previous, "to_version": version, "timeline": self.timeline,
                 "reason": reason, "by": by, "discarded": discarded, "time": time.time()}
        self.store.rollback(version, event, self.meta())
        for v, path in table.items():
            if v > version:
                shutil.rmtree(path, ignore_errors=True)
        remove([row["path"] for v, row in self.store.deltas() if v > version])
        self.history.append(event)
        log.warning("rolled back from version %d to %d (timeline %d) by %s: %s", previous, version,
                    self.timeline, by, reason)
        return RoundEvent("ROLLBACK", version, -1, 0, reason, self.timeline)

    def _forget_covered(self) -> None:
        """After a checkpoint at the current version: spilled pushes it covers, old deltas, and
        checkpoints beyond `keep_checkpoints` are no longer needed."""
        done = [(k, s) for k, s in self.store.spills() if s.status in ("applied", "discarded", "refused")
                and (s.status != "applied" or s.version <= self.version)]
        old_deltas = [(v, row) for v, row in self.store.deltas() if v <= self.version - self.cfg.delta_log]
        remove([s.path for _, s in done] + [row["path"] for _, row in old_deltas])
        self.store.forget([k for k, s in done if s.status != "refused"], [v for v, _ in old_deltas])
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        prune_checkpoints(self.checkpoint_dir, "v", self.cfg.keep_checkpoints)
        gone = [v for v, p in self.store.checkpoints().items() if not Path(p).is_dir()]
        self.store.forget_checkpoints(gone)
