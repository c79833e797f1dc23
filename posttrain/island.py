"""`archipelago posttrain island`: one island process of a post-training stage.

The stage's trainer (SFT, DPO or GRPO) runs under the same DiLoCo client as pre-training; the
island's report adds its rewards and losses per outer round. The stage commands
(`archipelago posttrain sft|dpo|grpo`, sim/posttrain.py) start these processes themselves.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from archipelago import config as cfglib
from island.job import run_island
from island.run_cli import add_run_arguments, check_island_index
from posttrain.config import PosttrainJobConfig
from posttrain.stages import STAGES, TRAINERS, StageTrainer


def resolve_preset(name: str) -> str:
    """`NAME` -> `posttrain-NAME` when configs/posttrain-NAME.toml exists (or a .toml path)."""
    if name.endswith(".toml"):
        return name
    own = cfglib.configs_dir() / f"posttrain-{name}.toml"
    return f"posttrain-{name}" if own.is_file() else name


def load_job(preset: str, overrides: list[str], stage: str) -> PosttrainJobConfig:
    return cfglib.load(PosttrainJobConfig, resolve_preset(preset), overrides).for_stage(stage)


def stage_extra(trainer: StageTrainer, stats: Any) -> dict[str, Any]:
    """The island report's post-training fields: rewards and losses per outer round."""
    cfg = trainer.job
    bounds = [cfg.diloco.steps_before(r) for r in range(cfg.diloco.rounds + 1)]

    def per_round(values: list[float], steps_per_value: int) -> list[float]:
        out = []
        for r in range(cfg.diloco.rounds):
            chunk = [v for k, v in enumerate(values) if bounds[r] <= k * steps_per_value < bounds[r + 1]]
            if chunk:
                out.append(statistics.fmean(chunk))
        return out

    log = trainer.log
    per_value = cfg.grpo.updates_per_batch if trainer.stage == "grpo" else 1
    rewards = per_round(log.rewards, per_value) if trainer.stage == "grpo" else (
        [statistics.fmean(log.rewards)] if log.rewards else [])
    return {"stage": trainer.stage, "rewards": log.rewards, "reward_per_round": rewards,
            "loss_per_round": per_round(log.losses, 1), "pairs_mined": log.pairs,
            "skipped_steps": log.skipped_steps,
            "rollout_tokens": trainer.engine.tokens, "rollout_s": trainer.engine.seconds,
            "extra": {k: statistics.fmean(v) for k, v in log.extra.items() if v}}



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago posttrain island", description=__doc__)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_run_arguments(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_island_index(args)
    job = load_job(args.preset, args.overrides, args.stage)
    trainer = TRAINERS[args.stage](job, island_id=args.island_index, num_islands=args.num_islands,
                                   total_steps=job.total_inner_steps)
    run_island(args, job, trainer, extra=stage_extra)
    return 0
