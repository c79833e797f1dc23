"""`archipelago island init|run`: write a run's initial model, or run one island process."""

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
from island.diloco import DiLoCoClient, DiLoCoConfig, run_config_hash, synced_tensors
from island.replica import ReplicaGroupsConfig, check_island_layout, is_replicated
from island.train import Trainer, TrainJobConfig
from protos.broadcast import digest


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


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of one island process (also used by `archipelago posttrain island`)."""
    run.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    run.add_argument("--island-id", required=True)
    run.add_argument("--island-index", type=int, default=0, help="this island's data shard index")
    run.add_argument("--num-islands", type=int, default=1, help="how many shards the data is split into")
    run.add_argument("--token", default=os.environ.get("ARCHIPELAGO_ISLAND_TOKEN", ""),
                     help="island token (default: $ARCHIPELAGO_ISLAND_TOKEN)")
    run.add_argument("--report", help="write the island's report JSON here")


def check_island_index(args: argparse.Namespace) -> None:
    if not 0 <= args.island_index < args.num_islands:
        raise cfglib.ConfigError(f"--island-index {args.island_index} must be in [0, {args.num_islands})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago island", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    from island import launch

    for name in ("init", "run", "gateway", "replica"):
        s = sub.add_parser(name)
        s.add_argument("--preset", default="ci")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        s.add_argument("--fragments", type=int, help="override diloco.fragments")
        launch.add_layout_arguments(s)
    init = sub.choices["init"]
    init.add_argument("--out", required=True, help="folder for the initial model checkpoint")
    add_run_arguments(sub.choices["run"])
    launch.add_head_arguments(sub.choices["run"])
    # An island of replica groups on a cluster: its head (gateway + Lighthouse) and, under
    # torchrun once per group, its ranks.
    sub.choices["gateway"].description = "the island's head: DiLoCo client and torchft Lighthouse"
    add_run_arguments(sub.choices["gateway"])
    launch.add_head_arguments(sub.choices["gateway"])
    sub.choices["replica"].description = "one rank of one replica group (run under torchrun)"
    launch.add_replica_arguments(sub.choices["replica"])
    return p


def main(argv: list[str]) -> int:
    from island import launch

    args = parser().parse_args(argv)
    args.overrides = [*args.overrides, *launch.layout_overrides(args)]
    job = load_job(args.preset, args.overrides, args.fragments)
    if args.action == "replica":
        launch.run_rank(args, job)
        return 0
    if args.action == "init":
        path = write_initial_model(job, args.out)
        print(f"initial model written to {path}")
        return 0
    check_island_index(args)
    if args.action == "gateway":
        launch.run_head(args, job)
        return 0
    if is_replicated(job.island, job):
        launch.run_local_island(args, job)
        return 0
    trainer = Trainer(job, island_id=args.island_index, num_islands=args.num_islands,
                      total_steps=job.total_inner_steps)
    run_island(args, job, trainer)
    return 0


def run_island(args: argparse.Namespace, job: IslandJobConfig, trainer: Trainer,
               extra: Any = None, make_client: Any = DiLoCoClient) -> dict[str, Any]:
    """Run `trainer` as island `args.island_id` under the DiLoCo client; write and return its report.

    `extra(trainer, stats)`, when given, adds fields to the report (post-training's rewards).
    `make_client` builds the client (the island gateway of replica groups builds its own).
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.island_id} %(levelname)s %(message)s")
    client = make_client(job.diloco, trainer, args.coordinator, args.island_id, args.token)
    stats = client.run()
    report = {
        "island_id": args.island_id, "island_index": args.island_index, "rounds": stats.rounds,
        "pushes": stats.pushes, "inner_steps": trainer.step, "tokens": trainer.step * trainer.tokens_per_step,
        "compute_s": stats.compute_s, "blocked_s": stats.blocked_s, "reconnects": stats.reconnects,
        "final_version": client.version, "eval_curve": stats.eval_curve, "sync_log": stats.sync_log,
        "theta_b_sha256": digest(client.theta_b),
        **(extra(trainer, stats) if extra else {}),
        **run_metadata(job.train.seed, job)}
    if args.report:
        write_json(args.report, report)
    return report


__all__ = ["IslandJobConfig", "load_job", "write_initial_model", "synced_tensors", "run_island",
           "add_run_arguments", "check_island_index", "main"]
