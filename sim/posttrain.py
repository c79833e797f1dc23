"""`archipelago posttrain sft|dpo|grpo|pipeline`: post-training stages on islands, through the
coordinator, on verifiable tasks, as a simulated multi-region run on this machine; `pipeline`
chains pre-training (`sim`) → SFT → GRPO.

Each stage is the same run as pre-training (one coordinator, N island processes over loopback
gRPC, byte-counting links) with each island's inner loop an SFT, DPO or GRPO trainer
(`archipelago posttrain island`, posttrain/island.py). The driver measures held-out accuracy of
the starting policy and of the final global model with greedy decoding, writes the final model
as a training checkpoint (`DIR/model`, which `archipelago export` and the next stage read), and
a report with the reward curve.

Presets: `--preset NAME` reads `configs/posttrain-NAME.toml` when it exists, else
`configs/NAME.toml` (or a .toml path).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from archipelago import config as cfglib
from archipelago.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from archipelago.console import console, summary_table
from archipelago.plots import line_plot
from archipelago.runinfo import run_metadata, write_json
from island.data import open_dataset
from island.model import Transformer, build_model
from island.train import load_model_tensors, model_tensors
from posttrain.config import PosttrainJobConfig
from posttrain.island import resolve_preset
from posttrain.rollout import RolloutEngine, accuracy
from posttrain.stages import STAGES, SFTTrainer
from sim.monitor import RunMonitor
from sim.run import SimConfig, run_islands
from sim.scrape import MetricsPorts


@dataclass
class PosttrainConfig(SimConfig, PosttrainJobConfig):
    """A post-training island job plus `[coordinator]` and `[sim]`: the whole simulated stage."""


def load_config(preset: str, overrides: list[str], stage: str) -> PosttrainConfig:
    return cfglib.load(PosttrainConfig, resolve_preset(preset), overrides).for_stage(stage)


def load_weights(model: Transformer, path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (model.safetensors) or a coordinator checkpoint (θ_g) into `model`."""
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a coordinator state folder: its newest version
        versions = sorted((path / "checkpoints").glob("v*"))
        if not versions:
            raise CheckpointError(f"{path} holds no coordinator checkpoints")
        path = versions[-1]
    files, manifest = read_checkpoint(path)
    tensors = files.get("model.safetensors") or files.get("theta_g.safetensors")
    if tensors is None:
        raise CheckpointError(f"{path} has neither model.safetensors nor theta_g.safetensors")
    expected = model_tensors(model)
    tensors = {**{n: t for n, t in expected.items() if n not in tensors and not t.is_floating_point()},
               **tensors}
    load_model_tensors(model, tensors, str(path))
    return {"path": str(path), "kind": manifest.get("kind"), "version": manifest.get("version"),
            "step": manifest.get("step")}


def starting_model(cfg: PosttrainConfig) -> tuple[Transformer, dict[str, Any]]:
    """θ_0 of the stage: `posttrain.init`, else a local SFT warm start, else the seeded init."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    pt = cfg.posttrain
    if pt.init:
        return model, {"init": load_weights(model, pt.init)}
    if pt.warmstart_sft_steps:
        # Format and a first grasp of the task, in one local process; recorded in the report.
        job = replace(cfg, optim=replace(cfg.optim, lr=pt.warmstart_lr))
        trainer = SFTTrainer(job, total_steps=pt.warmstart_sft_steps, model=model)
        for _ in range(pt.warmstart_sft_steps):
            trainer.train_step()
        return model, {"init": {"kind": "warmstart-sft", "steps": pt.warmstart_sft_steps,
                                "lr": pt.warmstart_lr, "final_loss": trainer.log.losses[-1]}}
    return model, {"init": {"kind": "seeded", "seed": cfg.train.seed}}


def write_model(cfg: PosttrainConfig, model: Transformer, out: Path, meta: dict[str, Any]) -> Path:
    """A training checkpoint of `model` (readable by export, gate and the next stage)."""
    return write_checkpoint(out, {"model.safetensors": model_tensors(model)},
                            {"kind": "posttrain", "step": 0, "config": asdict(cfg), **meta})


def _per_round(cfg: PosttrainConfig, islands: list[dict[str, Any]], key: str) -> list[float]:
    rows = [i[key] for i in islands if i.get(key)]
    if not rows:
        return []
    return [statistics.fmean(r[k] for r in rows if k < len(r)) for k in range(max(len(r) for r in rows))]


def run_stage(cfg: PosttrainConfig, out: Path, preset_label: str, monitor: RunMonitor | None = None) -> dict[str, Any]:
    """Run `cfg.posttrain.stage` on `cfg.sim.islands` islands through a coordinator; the report."""
    if cfg.coordinator.num_shards > 1:
        raise cfglib.ConfigError("post-training runs on one coordinator: coordinator.num_shards is for archipelago sim")
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(cfg.data)
    stage = cfg.posttrain.stage
    model, init_info = starting_model(cfg)
    task = cfg.task.build()
    heldout = task.problems("heldout", cfg.task.heldout_problems, cfg.task.seed)
    engine = RolloutEngine(model, dataset.tokenizer, cfg.rollout)
    before = accuracy(engine, task, heldout)
    preset_file = out / "posttrain-config.toml"
    preset_file.write_text(cfglib.dump_toml(asdict(cfg)))
    result = run_islands(cfg, out, preset_file, island_command=("posttrain", "island", "--stage", stage),
                         init_model=model, monitor=monitor)
    final = load_weights(model, result["coordinator_dir"])
    after = accuracy(engine, task, heldout)
    model_dir = write_model(cfg, model, out / "model", {"stage": stage, "global_version": final["version"]})
    islands = result["islands"]
    rollout_tokens = sum(i["rollout_tokens"] for i in islands)
    rollout_s = sum(i["rollout_s"] for i in islands)
    report: dict[str, Any] = {
        "preset": preset_label, "stage": stage, "task": cfg.task.name,
        "islands": cfg.sim.islands, "outer_rounds": cfg.diloco.rounds, "inner_steps": cfg.diloco.inner_steps,
        "round_steps": [cfg.diloco.steps_in_round(r) for r in range(cfg.diloco.rounds)],
        "final_version": final["version"],
        "heldout_problems": len(heldout),
        "heldout_accuracy_before": before, "heldout_accuracy_after": after,
        "heldout_accuracy_gain": after - before,
        "mean_reward_curve": _per_round(cfg, islands, "reward_per_round"),
        "loss_curve": _per_round(cfg, islands, "loss_per_round"),
        "heldout_error_curve": [p["loss"] for i in islands[:1] for p in i["eval_curve"]],
        "rollout_tokens": rollout_tokens,
        # per island process, averaged: how fast one island's engine generates
        "rollout_tokens_per_s": rollout_tokens / rollout_s if rollout_s > 0 else 0.0,
        "skipped_steps": sum(i.get("skipped_steps", 0) for i in islands),
        "wan_bytes": sum(link.total for link in result["links"]),
        "compute_utilization": sum(i["compute_s"] / max(1e-9, i["compute_s"] + i["blocked_s"])
                                   for i in islands) / len(islands),
        "wall_s": result["wall_s"],
        "model": str(model_dir),
        **init_info,
        **run_metadata(cfg.train.seed, cfg),
    }
    return report


SUMMARY = ("stage", "task", "islands", "outer_rounds", "heldout_problems", "heldout_accuracy_before",
           "heldout_accuracy_after", "rollout_tokens_per_s", "wan_bytes", "wall_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago posttrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    for name in (*STAGES, "pipeline"):
        s = sub.add_parser(name, help=f"run {name} on islands through a coordinator" if name != "pipeline"
                           else "pre-training (sim) → SFT → GRPO on this machine")
        s.add_argument("--preset", default="ci" if name != "pipeline" else "pipeline")
        s.add_argument("--report", default=f"runs/posttrain-{name}", help="folder for report.json and plots")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field by its dotted name (repeatable)")
        if name != "pipeline":
            s.add_argument("--init", help="checkpoint to start from (overrides posttrain.init)")
    sub.add_parser("island", help="one island process of a stage (started by the stage commands)",
                   add_help=False)
    return p


def write_stage_report(out: Path, report: dict, label: str) -> None:
    curve = report["mean_reward_curve"]
    if curve:
        line_plot(out / "reward.png", {f"{report['stage']} mean reward (all islands)": (
            list(range(1, len(curve) + 1)), curve)}, xlabel="outer round", ylabel="mean reward",
            title=f"{report['stage']} on {report['task']}: held-out accuracy "
                  f"{report['heldout_accuracy_before']:.3f} → {report['heldout_accuracy_after']:.3f}")
    write_json(out / "report.json", report)
    console.print(summary_table(label, {k: report[k] for k in SUMMARY if k in report}))
    console.print(f"report: {out / 'report.json'}")


def run_one(stage: str, preset: str, overrides: list[str], out: Path, init: str | None = None) -> dict:
    cfg = load_config(preset, overrides, stage)
    if init:
        cfg = replace(cfg, posttrain=replace(cfg.posttrain, init=init))
    console.print(f"[bold]archipelago posttrain {stage}[/] · {preset}: {cfg.sim.islands} islands × "
                  f"{cfg.diloco.rounds} rounds, task {cfg.task.name}; logs in {out}/")
    with RunMonitor(f"posttrain {stage} {preset}", [("islands", cfg.total_inner_steps)],
                    MetricsPorts(cfg.sim.host, [out / "prometheus.yml"])) as monitor:
        report = run_stage(cfg, out, preset, monitor)
    write_stage_report(out, report, f"archipelago posttrain {stage} · {preset}")
    return report


def run_pipeline(preset: str, overrides: list[str], out: Path) -> dict:
    """Pre-train with `sim` (no baseline), then SFT from θ_g, then GRPO from the SFT model.

    Each stage reads the same preset, plus `--set` overrides, plus its `[pipeline]` list.
    """
    from sim.run import simulate

    name = resolve_preset(preset)
    stages = load_config(preset, overrides, "grpo").pipeline
    sim_cfg = cfglib.load(SimConfig, name, [*overrides, *stages.pretrain_set, "sim.baseline=none"])
    console.print(f"[bold]archipelago posttrain pipeline[/] · {preset}: pre-training, SFT, GRPO; logs in {out}/")
    with RunMonitor(f"posttrain pipeline {preset} · pre-training", [("islands", sim_cfg.total_inner_steps)],
                    MetricsPorts(sim_cfg.sim.host, [out / "pretrain" / "prometheus.yml"])) as monitor:
        pre = simulate(sim_cfg, out / "pretrain", preset, monitor)
    write_json(out / "pretrain" / "report.json", pre)
    console.print(f"pre-training: eval loss {pre['final_eval_loss']:.3f} after {pre['tokens']:,} tokens")
    sft = run_one("sft", preset, [*overrides, *stages.sft_set], out / "sft",
                  init=str(out / "pretrain" / "coordinator"))
    grpo = run_one("grpo", preset, [*overrides, *stages.grpo_set], out / "grpo", init=sft["model"])
    report = {"preset": preset, "stages": ["pretrain", "sft", "grpo"],
              "pretrain": {k: pre[k] for k in ("final_eval_loss", "tokens", "wan_bytes", "wall_s")},
              "sft": {k: sft[k] for k in ("heldout_accuracy_before", "heldout_accuracy_after", "wan_bytes",
                                          "wall_s")},
              "grpo": {k: grpo[k] for k in ("heldout_accuracy_before", "heldout_accuracy_after",
                                            "mean_reward_curve", "wan_bytes", "wall_s")},
              "model": grpo["model"], "seed": grpo["seed"], "config": grpo["config"], "versions": grpo["versions"]}
    write_json(out / "report.json", report)
    console.print(f"pipeline: held-out accuracy {sft['heldout_accuracy_before']:.3f} (pre-trained) → "
                  f"{sft['heldout_accuracy_after']:.3f} (SFT) → {grpo['heldout_accuracy_after']:.3f} (GRPO); "
                  f"model {grpo['model']}")
    return report


def main(argv: list[str]) -> int:
    if argv[:1] == ["island"]:
        from posttrain.island import main as island_main

        return island_main(argv[1:])
    args = parser().parse_args(argv)
    out = Path(args.report)
    if args.action == "pipeline":
        run_pipeline(args.preset, args.overrides, out)
    else:
        run_one(args.action, args.preset, args.overrides, out, init=args.init)
    return 0
