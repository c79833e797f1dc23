"""`archipelago island init|run`: write a run's initial model, or run one island process."""

from __future__ import annotations

import argparse
import json
import os

from archipelago import config as cfglib
from archipelago.procs import process_age_s
from island.job import IslandJobConfig, load_job, run_island, write_initial_model
from island.replica import is_replicated
from island.train import Trainer


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of one island process (also used by `archipelago posttrain island`)."""
    run.add_argument("--coordinator", help="HOST:PORT of the coordinator (a standby's after a ','); a "
                                           "coordinator sharded by fragment: every shard's, in shard order, "
                                           "separated by ';', e.g. \"a:1,a2:1;b:2\" (default: the preset's "
                                           "coordinator.shards)")
    run.add_argument("--island-id", required=True)
    run.add_argument("--island-index", type=int, default=0, help="this island's data shard index")
    run.add_argument("--num-islands", type=int, default=1, help="how many shards the data is split into")
    run.add_argument("--token", default=os.environ.get("ARCHIPELAGO_ISLAND_TOKEN", ""),
                     help="island token (default: $ARCHIPELAGO_ISLAND_TOKEN)")
    run.add_argument("--report", help="write the island's report JSON here")


def add_startup_only(run: argparse.ArgumentParser) -> None:
    run.add_argument("--startup-only", action="store_true",
                     help="build what the island trains with (model, optimizer, data) and exit without connecting, "
                          "printing how long the process took to get there as JSON: what a restart costs on this "
                          "host before it reaches the coordinator")


def check_island_index(args: argparse.Namespace) -> None:
    """Check the island's place, and settle `args.coordinator`: the flag, else the shards the
    preset lists under `[coordinator] shards`."""
    if not 0 <= args.island_index < args.num_islands:
        raise cfglib.ConfigError(f"--island-index {args.island_index} must be in [0, {args.num_islands})")
    if not args.coordinator:
        shards = cfglib.load_preset(args.preset).get("coordinator", {}).get("shards", [])
        if not shards:
            raise cfglib.ConfigError("--coordinator is required (HOST:PORT, or the shards' addresses separated by "
                                     "';'), unless the preset lists coordinator.shards")
        args.coordinator = ";".join(shards) if len(shards) > 1 else shards[0]


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
    add_startup_only(sub.choices["run"])
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
    if getattr(args, "startup_only", False):
        return startup_only(args, job)
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


def startup_only(args: argparse.Namespace, job: IslandJobConfig) -> int:
    """`island run --startup-only`: the island's start-up up to its first call to the coordinator."""
    if is_replicated(job.island, job):
        raise cfglib.ConfigError("--startup-only times a one-process island; an island of replica groups starts "
                                 "through its gateway")
    Trainer(job, island_id=args.island_index, num_islands=args.num_islands, total_steps=job.total_inner_steps)
    print(json.dumps({"island_id": args.island_id, "process_s": process_age_s()}))
    return 0


__all__ = ["add_run_arguments", "check_island_index", "parser", "main"]
