"""`archipelago train`: train a model locally in one process and write a report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from archipelago import config as cfglib
from archipelago.console import console, progress, summary_table
from archipelago.plots import line_plot
from archipelago.runinfo import run_metadata, write_json
from island.train import StepStats, Trainer, TrainJobConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago train", description=__doc__)
    p.add_argument("--preset", default="tiny", help="a preset under configs/ or a .toml path")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--report", default="runs/train", help="folder for report.json, loss.png, checkpoints")
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted name (repeatable)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    job = cfglib.load(TrainJobConfig, args.preset, overrides)
    report = run(job, Path(args.report), resume=args.resume)
    console.print(summary_table(f"archipelago train · {args.preset}", {
        k: report[k] for k in ("params", "steps", "tokens", "initial_eval_loss", "final_eval_loss",
                               "tokens_per_s", "wall_s", "checkpoint")}))
    return 0


def run(job: TrainJobConfig, out: Path, resume: str | None = None) -> dict:
    """Train `job.train.steps` steps; write report.json, loss.png and the final checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(job)
    if resume:
        trainer.load_checkpoint(resume)
    meta = run_metadata(job.train.seed, job)
    evals: list[tuple[int, float]] = [(trainer.step, trainer.evaluate())]
    losses: list[tuple[int, float]] = []
    start_step = trainer.step
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("train", total=job.train.steps, completed=trainer.step,
                            info=f"eval {evals[0][1]:.3f}")

        def on_step(s: StepStats) -> None:
            losses.append((s.step, s.loss))
            bar.update(task, completed=s.step, info=f"loss {s.loss:.3f} lr {s.lr:.2e}")

        def on_eval(step: int, loss: float) -> None:
            evals.append((step, loss))
            bar.update(task, info=f"eval {loss:.3f}")

        def on_checkpoint(step: int) -> None:
            trainer.save_checkpoint(out / "checkpoints" / f"step_{step:07d}")

        trainer.train(job.train.steps, on_step=on_step, on_eval=on_eval, on_checkpoint=on_checkpoint)
    wall = time.perf_counter() - start
    if evals[-1][0] != trainer.step:
        evals.append((trainer.step, trainer.evaluate()))
    ckpt = trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.step:07d}")
    steps_run = trainer.step - start_step
    report = {
        "params": trainer.model.num_params(),
        "tokens": steps_run * trainer.tokens_per_step,
        "steps": trainer.step,
        "initial_eval_loss": evals[0][1],
        "final_eval_loss": evals[-1][1],
        "tokens_per_s": steps_run * trainer.tokens_per_step / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "checkpoint": str(ckpt),
        "eval_curve": [{"step": s, "tokens": s * trainer.tokens_per_step, "loss": v} for s, v in evals],
        "train_curve": [{"step": s, "loss": v} for s, v in losses],
        "loss_plot": str(out / "loss.png"),
        **meta,
    }
    line_plot(out / "loss.png", {
        "train loss": ([s for s, _ in losses], [v for _, v in losses]),
        "eval loss": ([s for s, _ in evals], [v for _, v in evals]),
    }, xlabel="step", ylabel="loss", title=f"{job.model.num_layers}-layer model, local training")
    write_json(out / "report.json", report)
    return report
