"""A replica group's side of the island gateway (island/gateway.py) and the loop of one rank.

    start: GET /start (θ_b, fragment order); load it unless resuming
    after each committed step:
        merges that are due now: GET /merge/N, θ_local_f ← θ_b_f + (θ_local_f − snapshot_N)
        at sync point N: gather the full model (group collective), snapshot fragment f,
            group rank 0 posts it (POST /sync/N)
        without overlap the merge of N is due at once (this blocks until the gateway has it);
        with overlap it is due at sync point N+1

The schedule (sync points and the step each merge is due) is a function of the `[diloco]` table
and the fragment order the gateway sends, so every group applies every merge at the same step
and the groups stay bit-identical. The link's state (snapshots, sync and merge counters, what
was trained since the last sync) is registered with torchft, so a group that heals from a peer
continues the outer loop exactly where the peer is.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from island.diloco_config import DiLoCoConfig
from island.gateway import META_HEADER, pack, unpack
from island.replica import ReplicaTrainer
from island.train import StepStats
from protos.broadcast import merge_local

log = logging.getLogger(__name__)


def sync_points(cfg: DiLoCoConfig) -> list[int]:
    """The inner step after which each sync happens, in order (as `DiLoCoClient.run` visits them)."""
    points, step = [], 0
    for round_ in range(cfg.rounds):
        for steps in cfg.fragment_steps(round_):
            step += steps
            points.append(step)
    return points


def merge_step(points: list[int], n: int, overlap: bool) -> int:
    """The step after which the merge of sync point `n` is applied: at once without overlap, at the
    next sync point with it (the last one's at the end)."""
    return points[min(n + 1, len(points) - 1)] if overlap else points[n]


class GatewayClient:
    """HTTP calls to the island gateway; every wait is bounded by `timeout_s`."""

    def __init__(self, url: str, timeout_s: float, poll_s: float = 0.1) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def _call(self, method: str, path: str, body: bytes | None = None,
              meta: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if meta is not None:
            request.add_header(META_HEADER, json.dumps(meta))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def _until_ready(self, path: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """GET `path` until it answers 200 (it answers 404/503 until the gateway has it)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                status, headers, body = self._call("GET", path)
            except OSError as exc:  # the gateway is not up (yet): keep trying until the deadline
                status, headers, body = 0, {}, str(exc).encode()
            if status == 200:
                return json.loads(headers[META_HEADER]), unpack(body)
            if status not in (0, 404, 503):
                raise RuntimeError(f"gateway {self.url}{path} answered {status}: {body[:200]!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.timeout_s:g}s for {what} from the gateway {self.url}")
            time.sleep(self.poll_s)

    def start(self, group: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._until_ready(f"/start?group={group}", "the start weights")

    def merge(self, n: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._until_ready(f"/merge/{n}", f"the merge of sync point {n}")

    def post_sync(self, n: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        status, _, body = self._call("POST", f"/sync/{n}", pack(tensors), meta)
        if status != 204:
            raise RuntimeError(f"gateway refused sync point {n}: {status} {body[:200]!r}")

    def event(self, event: dict[str, Any]) -> None:
        try:
            self._call("POST", "/event", json.dumps(event).encode())
        except OSError as exc:  # an event is a record, not a step of training: log and go on
            log.warning("could not report %s to the gateway: %s", event.get("kind"), exc)


class GroupLink:
    """The DiLoCo outer loop as seen from inside one replica group (see the module docstring)."""

    def __init__(self, trainer: ReplicaTrainer, client: GatewayClient, cfg: DiLoCoConfig) -> None:
        self.trainer = trainer
        self.client = client
        self.points = sync_points(cfg)
        self.overlap = cfg.overlap
        self.order: list[int] = []
        self.fragments: list[list[str]] = []
        self.next_sync = 0
        self.merged = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self.loss_sum = 0.0
        self.tokens = 0
        self.compute_s = 0.0

    def start(self) -> None:
        meta, tensors = self.client.start(self.trainer.group)
        self.order, self.fragments = meta["order"], meta["fragments"]
        self.trainer.load_full(tensors)  # a group that is behind the others heals at its first quorum
        self.trainer.manager.register_state_dict_fn("island_link", self.load_state_dict, self.state_dict)
        log.info("group %d rank %d starts at version %d", self.trainer.group, self.trainer.group_rank,
                 meta["version"])

    def due(self, n: int) -> int:
        return merge_step(self.points, n, self.overlap)

    def after_step(self, stats: StepStats, seconds: float) -> None:
        if self.trainer.committed:
            self.steps += 1
            self.loss_sum += stats.loss
            self.tokens += stats.tokens
            self.compute_s += seconds
        self.apply_due_merges()
        if self.next_sync < len(self.points) and self.trainer.step == self.points[self.next_sync]:
            self.sync()
            self.apply_due_merges()

    def sync(self) -> None:
        n = self.next_sync
        names = self.fragments[self.order[n % len(self.order)]]
        full = self.trainer.full_synced_state()  # every rank of the group takes part
        local = self.trainer.local_tensors()
        self.snapshots[n] = {name: local[name].detach().clone() for name in names if name in local}
        if self.trainer.group_rank == 0:
            self.client.post_sync(n, {"group": self.trainer.group, "step": self.trainer.step,
                                      "steps": self.steps, "loss_sum": self.loss_sum, "tokens": self.tokens,
                                      "compute_s": self.compute_s}, full)
        self.next_sync += 1
        self.steps, self.loss_sum, self.tokens, self.compute_s = 0, 0.0, 0, 0.0

    def apply_due_merges(self) -> None:
        while self.merged < self.next_sync and self.due(self.merged) <= self.trainer.step:
            self.apply_merge(self.merged)

    @torch.no_grad()
    def apply_merge(self, n: int) -> None:
        """θ_local_f ← θ_b_f + (θ_local_f − snapshot), with the same `merge_local` as the gateway."""
        meta, theta_b = self.client.merge(n)
        snapshot = self.snapshots.pop(n)
        merge_local(self.trainer.local_tensors(), {name: self.trainer.part_of(name, theta_b[name]) for name in snapshot},
                    snapshot)
        self.merged += 1
        log.info("group %d rank %d merged version %d (sync point %d) at step %d", self.trainer.group,
                 self.trainer.group_rank, meta["version"], n, self.trainer.step)

    # ---- torchft state: what a healing group takes from a peer ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"next_sync": self.next_sync, "merged": self.merged, "steps": self.steps,
                "loss_sum": self.loss_sum, "tokens": self.tokens, "compute_s": self.compute_s,
                "snapshots": {str(n): snap for n, snap in self.snapshots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_sync, self.merged = int(state["next_sync"]), int(state["merged"])
        self.steps, self.loss_sum = int(state["steps"]), float(state["loss_sum"])
        self.tokens, self.compute_s = int(state["tokens"]), float(state["compute_s"])
        self.snapshots = {int(n): {k: t.clone() for k, t in snap.items()}
                          for n, snap in state["snapshots"].items()}


def run_replica(trainer: ReplicaTrainer, link: GroupLink, total_steps: int) -> None:
    """Train this rank until the island's last inner step, reporting heals to the gateway."""
    link.client.event({"kind": "started", "group": trainer.group, "rank": trainer.group_rank,
                       "pid": os.getpid(), "step": trainer.step})
    reported = 0
    while trainer.step < total_steps:
        start = time.perf_counter()
        stats = trainer.train_step()
        link.after_step(stats, time.perf_counter() - start)
        for heal in trainer.heals[reported:]:
            link.client.event({"kind": "healed", **heal})
        reported = len(trainer.heals)
    link.client.event({"kind": "finished", "group": trainer.group, "rank": trainer.group_rank,
                       "step": trainer.step})


__all__ = ["GatewayClient", "GroupLink", "merge_step", "run_replica", "sync_points"]
