"""An island job: its config (`IslandJobConfig`, `load_job`), the run's initial model
(`write_initial_model`), and one island process under the DiLoCo client (`run_island`).

The library under `archipelago island` (island/run_cli.py), `archipelago posttrain island`, the
replica-group head (island/launch.py) and the simulator (sim/).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from archipelago import config as cfglib
from archipelago.checkpoint import write_checkpoint
from archipelago.runinfo import run_metadata, write_json
from island.connection import CoordinatorLink
from island.diloco import DiLoCoClient, InnerSteps
from island.diloco_config import DiLoCoConfig, run_config_hash
from island.replica import ReplicaGroupsConfig, check_island_layout
from island.shard_link import ShardedLink
from island.train import Trainer, TrainJobConfig
from protos.broadcast import digest
from protos.codec_kernels import COMPILE_ENV


@dataclass
class IslandJobConfig(TrainJobConfig):
    """A local training job plus the `[diloco]` table: what one island process runs; and the
    `[island]` table when the island is several replica groups (island/replica.py)."""

    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    island: ReplicaGroupsConfig = field(default_factory=ReplicaGroupsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_island_layout(self, self.island)

    @property
    def total_inner_steps(self) -> int:
        return self.diloco.total_steps


def load_job(preset: str, overrides: list[str], fragments: int | None = None) -> IslandJobConfig:
    overrides = list(overrides)
    if fragments is not None:
        overrides.append(f"diloco.fragments={fragments}")
    return cfglib.load(IslandJobConfig, preset, overrides)


def write_initial_model(job: IslandJobConfig, out: str | Path, model: Any = None) -> Path:
    """The run's θ_0 (every island's and the coordinator's starting point) and its config hash:
    the seeded init of `job.model`, or the weights of `model` (e.g. a post-training start)."""
    from island.model import build_model
    from island.train import model_tensors

    model = model if model is not None else build_model(job.model, seed=job.train.seed)
    tensors = {n: t for n, t in sorted(model_tensors(model).items()) if t.is_floating_point()}
    digest = run_config_hash(job.model, [(n, tuple(t.shape)) for n, t in tensors.items()],
                             job.diloco.fragments)
    return write_checkpoint(out, {"model.safetensors": tensors}, {
        "kind": "init", "config_hash": digest, "model": asdict(job.model),
        "fragments": job.diloco.fragments, "tensor_names": list(tensors), "seed": job.train.seed})


def open_client(cfg: DiLoCoConfig, trainer: Trainer, address: str, island_id: str, token: str = "",
                steps: InnerSteps | None = None) -> DiLoCoClient:
    """The DiLoCo client of island `island_id` over gRPC to the coordinator at `address`
    (a comma-separated list tries each in turn); a coordinator sharded by fragment is every shard's
    addresses in shard order, separated by ';' (island/shard_link.py)."""
    if ";" in address:
        return DiLoCoClient(cfg, trainer, ShardedLink(cfg, address, island_id, token), steps)
    return DiLoCoClient(cfg, trainer, CoordinatorLink(cfg, address, island_id, token), steps)


def run_island(args: argparse.Namespace, job: IslandJobConfig, trainer: Trainer,
               extra: Any = None, steps: InnerSteps | None = None) -> dict[str, Any]:
    """Run `trainer` as island `args.island_id` under the DiLoCo client; write and return its report.

    `extra(trainer, stats)`, when given, adds fields to the report (post-training's rewards).
    `steps`: where the inner steps come from (an island of replica groups passes its gateway's).
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.island_id} %(levelname)s %(message)s")
    if job.diloco.codec_compile == "off":  # the environment, where set, wins (protos/codec_kernels.py)
        os.environ.setdefault(COMPILE_ENV, "0")
    client = open_client(job.diloco, trainer, args.coordinator, args.island_id, args.token, steps)
    stats = client.run()
    report = {
        "island_id": args.island_id, "island_index": args.island_index, "rounds": stats.rounds,
        "pushes": stats.pushes, "inner_steps": trainer.step, "tokens": trainer.step * trainer.tokens_per_step,
        "compute_s": stats.compute_s, "blocked_s": stats.blocked_s, "reconnects": stats.reconnects,
        "coordinator_switches": stats.coordinator_switches, "coordinator_wait_s": stats.coordinator_wait_s,
        "rejoins": stats.rejoins,
        "local_checkpoints": client.local_checkpoints.report() if client.local_checkpoints else None,
        "final_version": client.version, "eval_curve": stats.eval_curve, "sync_log": stats.sync_log,
        "theta_b_sha256": digest(client.theta_b),
        **(extra(trainer, stats) if extra else {}),
        **run_metadata(job.train.seed, job)}
    if args.report:
        write_json(args.report, report)
    return report


__all__ = ["IslandJobConfig", "load_job", "open_client", "write_initial_model", "run_island"]
