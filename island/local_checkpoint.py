"""Island-local checkpoints: a killed island process loses at most the work since its last one
(docs/design.md, "Failure model").

Every `diloco.local_checkpoint_every` inner steps the training thread copies what a restarted
process needs into buffers kept for the purpose, and a background thread writes them with
archipelago/checkpoint.py (a temporary folder, every file fsynced, a sha256 manifest, renamed into
place) under `diloco.local_checkpoint_dir` ("{island_id}" replaced) as `step-NNNNNNNNN`; the newest
two are kept. A checkpoint holds

    model.safetensors      θ_local (the model's tensors)
    optimizer.safetensors  the inner AdamW state
    theta_b.safetensors    θ_b the island holds: the base its open rounds started from
    feedback.safetensors   each fragment's error-feedback residuals, as "f{fragment}/{tensor}"
    snapshots.safetensors  θ_local at the snapshot of each fragment whose sync has not merged yet
    manifest.json          step, data cursor, AdamW's param groups; θ_b's version and timeline, each
                           fragment's base version and open round; the outstanding syncs; where
                           the outer loop is (round, segment, steps done in it, fragment order);
                           the pushes the coordinator holds from this island; the loss, tokens and
                           compute seconds since the last sync

A checkpoint is taken only when every push handed to a pusher has its answer, so the pushes the
coordinator holds are known; while the previous one is still being written the next is skipped.

A restarted process (the coordinator knew it: epoch > 1) resumes from the newest checkpoint that
verifies when the coordinator still accepts its base: the same timeline, θ_b's version at most
`staleness_limit` versions behind the coordinator's, and the coordinator holding exactly the pushes
the checkpoint counted. It then fetches the deltas since that version and merges them as a live
island does (θ_local moves with θ_b; a fragment with a snapshot keeps what was trained since it),
and goes on from the saved step with its data cursor, AdamW state and residuals. Otherwise, or
when the coordinator can only send the full θ_b, it pulls θ_b as a restarted island always did
(`resume_round`), and says why in its log.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from archipelago.checkpoint import CheckpointError, prune_checkpoints, read_checkpoint, write_checkpoint
from archipelago.config import ConfigError
from island.train import load_model_tensors, load_optimizer_tensors, model_tensors, optimizer_tensors

if TYPE_CHECKING:
    from island.connection import Registration
    from island.diloco import DiLoCoClient

log = logging.getLogger(__name__)

PREFIX = "step-"
KEEP = 2
KIND = "island-local"


class LocalCheckpoints:
    """The island's local checkpoints: `after_steps` takes them, `resume` reads the newest back."""

    def __init__(self, client: DiLoCoClient) -> None:
        cfg = client.cfg
        trainer = client.trainer
        if getattr(trainer, "mesh", None) is not None or not hasattr(trainer, "optimizer"):
            raise ConfigError("diloco.local_checkpoint_every needs the island's trainer in this process (one "
                              "rank); an island of replica groups heals a group from its peers instead")
        self.every = cfg.local_checkpoint_every
        self.dir = Path(cfg.local_checkpoint_dir.replace("{island_id}", client.island_id))
        self.island_id = client.island_id
        self.ack_log = client.ack_log
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._pending: tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.saved = 0
        self.skipped = 0
        self.copy_s = 0.0  # on the training thread
        self.write_s = 0.0  # on the writer thread
        self.error: BaseException | None = None
        self.resumed_from: dict[str, Any] | None = None
        self._held: int | None = None  # the pushes the coordinator held at the last checkpoint
        self._base: tuple[int, int, int] | None = None  # θ_b copied last: version, timeline, which dict
        self._theta_b: dict[str, torch.Tensor] = {}
        self._syncs: tuple[int, int] | None = None  # syncs done (each encodes) when the residuals were copied
        self._feedback: dict[str, torch.Tensor] = {}

    # ---- taking one ---------------------------------------------------------------------------

    def after_steps(self, client: DiLoCoClient) -> None:
        """Called on the training thread after inner steps: take a checkpoint when one is due (every
        `every` steps), and as soon as it can after a push was answered: until then a restart finds the
        coordinator holding a push the newest checkpoint did not count, and cannot resume from it."""
        step = client.trainer.step
        held = client.received_pushes + client.stats.pushes
        if self._held is None:
            self._held = held
        if step % self.every and held == self._held:
            return
        if not self._idle.is_set() or any(not f.done() for f in client.pushes):
            self.skipped += step % self.every == 0  # the last one is still being written, or a push awaits its answer
            return
        self._held = client.received_pushes + client.stats.pushes
        start = time.perf_counter()
        files, meta = self._capture(client)
        self.copy_s += time.perf_counter() - start
        self._idle.clear()
        with self._lock:
            self._pending = (files, meta)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="local-checkpoint", daemon=True)
            self._thread.start()
        self._wake.set()

    def _copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied into the buffer kept for `key` (made again if its shape or dtype changed)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        buffer.copy_(tensor.detach())
        return buffer

    @torch.no_grad()
    def _capture(self, client: DiLoCoClient) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        trainer = client.trainer
        files: dict[str, dict[str, torch.Tensor]] = {
            "model.safetensors": {n: self._copy(f"model/{n}", t) for n, t in model_tensors(trainer.model).items()},
            "optimizer.safetensors": {n: self._copy(f"optimizer/{n}", t)
                                      for n, t in optimizer_tensors(trainer.optimizer).items()},
        }
        # θ_b changes only when a payload is applied, the residuals only when a sync encodes: copied
        # again only then (their buffers are not written while a checkpoint is being written)
        base = (client.version, client.timeline, id(client.theta_b))
        if base != self._base:
            self._theta_b = {n: self._copy(f"theta_b/{n}", t) for n, t in client.theta_b.items()}
            self._base = base
        files["theta_b.safetensors"] = self._theta_b
        syncs = (len(client.stats.sync_log), id(client.feedback))
        if syncs != self._syncs:
            self._feedback = {f"f{f}/{n}": e for f, fb in enumerate(client.feedback)  # copies already
                              for n, e in fb.state_dict()["residuals"].items()}
            self._syncs = syncs
        feedback = self._feedback
        snapshots = {f"f{f}/{n}": self._copy(f"snapshot/{f}/{n}", t) for f, snap in client.snapshots.items()
                     for n, t in snap.items()}
        for name, tensors in (("feedback.safetensors", feedback), ("snapshots.safetensors", snapshots)):
            if tensors:
                files[name] = tensors
        meta = {
            "kind": KIND, "island_id": client.island_id, "config_hash": client.config_hash,
            "step": trainer.step, "data_cursor": trainer.loader.state_dict(),
            "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"}
                                       for g in trainer.optimizer.param_groups],
            "version": client.version, "timeline": client.timeline, "base_version": list(client.base_version),
            "rounds": list(client.rounds), "outstanding": {str(f): r for f, r in client.outstanding.items()},
            "position": list(client.position), "order": list(client.order),
            "pushes_held": client.received_pushes + client.stats.pushes,
            "loss_sum": client.loss_sum, "loss_count": client.loss_count, "token_sum": client.token_sum,
            "compute_since_sync_s": client.stats.compute_s - client._compute_mark,
            "captured_at": time.time(),
        }
        return files, meta

    def _write_loop(self) -> None:
        for stale in self.dir.glob(f".{PREFIX}*.tmp-*"):  # what a killed process was writing
            shutil.rmtree(stale, ignore_errors=True)
        while not self._stop.is_set():
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            with self._lock:
                job, self._pending = self._pending, None
            if job is None:
                continue
            files, meta = job
            start = time.perf_counter()
            try:
                write_checkpoint(self.dir / f"{PREFIX}{meta['step']:09d}", files, meta)
                prune_checkpoints(self.dir, PREFIX, KEEP)
            except Exception as exc:  # the island trains on; it would resume from an older one, or pull θ_b
                self.error = exc
                log.warning("island %s: local checkpoint at step %d not written: %s", self.island_id, meta["step"],
                            exc)
            else:
                self.saved += 1
                self.ack_log.write({"event": "checkpoint", "step": meta["step"], "round": meta["position"][0],
                                    "version": meta["version"], "captured_at": meta["captured_at"]})
            finally:
                self.write_s += time.perf_counter() - start
                self._idle.set()

    def wait_written(self, timeout_s: float) -> bool:
        """Wait (bounded) until no checkpoint is being written; False if one still is."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float) -> None:
        """Let a checkpoint being written finish (bounded), then stop the writer."""
        self.wait_written(timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def report(self) -> dict[str, Any]:
        return {"saved": self.saved, "skipped": self.skipped, "copy_s": round(self.copy_s, 3),
                "write_s": round(self.write_s, 3), "resumed_from": self.resumed_from}

    # ---- resuming from one --------------------------------------------------------------------

    def newest(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """The newest checkpoint in the directory that verifies (sha256 of every file), or None."""
        if not self.dir.is_dir():
            return None
        for folder in sorted((p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir()), reverse=True):
            try:
                return read_checkpoint(folder)
            except (CheckpointError, OSError, ValueError) as exc:
                log.warning("island %s: local checkpoint %s unreadable: %s", self.island_id, folder, exc)
        return None

    @staticmethod
    def refusal(meta: dict[str, Any], reg: Registration, client: DiLoCoClient) -> str | None:
        """Why the coordinator's answer at registration rules this checkpoint out, or None."""
        if meta.get("kind") != KIND or meta.get("island_id") != client.island_id:
            return "it is not this island's"
        if meta.get("config_hash") != client.config_hash:
            return "it is of another model or fragment count"
        if reg.num_shards > 1:
            return "the coordinator is sharded (resuming from a local checkpoint is not built for that yet)"
        if reg.epoch <= 1:
            return "the coordinator does not know this island yet (a new run)"
        if reg.timeline != meta["timeline"]:
            return f"it is on timeline {meta['timeline']}, the coordinator on {reg.timeline}"
        behind = reg.version - meta["version"]
        if behind < 0:
            return f"its θ_b (version {meta['version']}) is ahead of the coordinator's ({reg.version})"
        if reg.staleness_limit and behind > reg.staleness_limit:
            return (f"its θ_b (version {meta['version']}) is {behind} versions behind the coordinator's, "
                    f"beyond the staleness limit {reg.staleness_limit}")
        if reg.received_pushes != meta["pushes_held"]:
            return (f"the coordinator holds {reg.received_pushes} pushes from this island, the checkpoint "
                    f"counted {meta['pushes_held']}")
        return None

    @torch.no_grad()
    def resume(self, client: DiLoCoClient, reg: Registration) -> bool:
        """Resume `client` from the newest usable checkpoint (see the module docstring); False, and
        nothing changed, when there is none."""
        found = self.newest()
        if found is None:
            return False
        files, meta = found
        reason = self.refusal(meta, reg, client)
        records = [] if reason else client.fetch(meta["version"])
        if not reason and any(h.full or h.timeline != meta["timeline"] for h, _ in records):
            reason = "the coordinator no longer has the deltas since its θ_b"
        if reason:
            log.warning("island %s: not resuming from local checkpoint at step %d: %s; pulling θ_b",
                        client.island_id, meta["step"], reason)
            return False
        trainer = client.trainer
        load_model_tensors(trainer.model, files["model.safetensors"], str(self.dir))
        load_optimizer_tensors(trainer.optimizer, files["optimizer.safetensors"], meta["optimizer_param_groups"])
        trainer.step = int(meta["step"])
        trainer.loader.load_state_dict(meta["data_cursor"])
        client.theta_b = {n: t.clone() for n, t in files["theta_b.safetensors"].items()}
        client.version, client.timeline = int(meta["version"]), int(meta["timeline"])
        client.base_version = [int(v) for v in meta["base_version"]]
        client.rounds = [int(r) for r in meta["rounds"]]
        client.outstanding = {int(f): int(r) for f, r in meta["outstanding"].items()}
        client.snapshots = _by_fragment(files.get("snapshots.safetensors", {}))
        residuals = _by_fragment(files.get("feedback.safetensors", {}))
        for f, fb in enumerate(client.feedback):
            fb.load_state_dict({"residuals": residuals.get(f, {})})
        client.loss_sum, client.loss_count = float(meta["loss_sum"]), int(meta["loss_count"])
        client.token_sum = int(meta["token_sum"])
        client.stats.compute_s, client._compute_mark = float(meta["compute_since_sync_s"]), 0.0
        client.position, client.order = [int(x) for x in meta["position"]], [int(f) for f in meta["order"]]
        for header, tensors in records:  # the commits it missed, merged as a live island merges them
            client.apply_payload(header, tensors)
        client.rounds = [max(a, b) for a, b in zip(client.rounds, reg.rounds, strict=True)]
        self._held = int(meta["pushes_held"])
        self.resumed_from = {"step": trainer.step, "version": int(meta["version"]), "caught_up_to": client.version,
                             "captured_at": meta["captured_at"], "position": client.position}
        log.info("island %s resumed from its local checkpoint at step %d (θ_b version %d, %d deltas since)",
                 client.island_id, trainer.step, meta["version"], len(records))
        return True


def resume_round(client: DiLoCoClient) -> int:
    """The first outer round a process runs without a local checkpoint: 0, or for a restarted island
    process (the coordinator knew it before: epoch > 1) the round after the pushes the coordinator
    holds from it, with the trainer's step and data position moved there so that its lr schedule and
    data go on where they were (its AdamW state and the work since its last push are lost)."""
    if client.epoch <= 1 or client.trainer.step:
        return 0
    cfg = client.cfg
    start = min(client.received_pushes // cfg.fragments, cfg.rounds)
    steps = cfg.steps_before(start)
    client.trainer.step = steps
    loader = getattr(client.trainer, "loader", None)
    if loader is not None and loader.batches_per_epoch:
        loader.epoch, batch = divmod(steps, loader.batches_per_epoch)
        loader.position = batch * loader.batch_size
    log.info("island %s restarted: joining at round %d (inner step %d)", client.island_id, start, steps)
    return start


def _by_fragment(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{"f{fragment}/{name}": tensor} -> {fragment: {name: tensor}}."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        fragment, name = key.split("/", 1)
        out.setdefault(int(fragment[1:]), {})[name] = tensor.clone()
    return out


__all__ = ["LocalCheckpoints", "resume_round"]
