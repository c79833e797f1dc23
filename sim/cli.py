"""`archipelago sim`: simulate a multi-region run on this machine and compare it with ordinary
synchronous data-parallel training on the same model, data and number of tokens.
`archipelago sim plan`: the scale model (sim/plan.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from archipelago import config as cfglib
from archipelago.console import console, summary_table
from archipelago.plots import line_plot
from archipelago.runinfo import run_metadata, write_json
from sim.monitor import RunMonitor
from sim.run import SimConfig, simulate
from sim.scrape import MetricsPorts, add_prometheus_argument, metrics_ports

SUMMARY = ("islands", "inner_steps", "outer_rounds", "fragments", "tokens", "params", "tokens_per_param",
           "final_eval_loss", "merge_gain", "baseline_eval_loss", "loss_gap_rel", "law_predicted_gap", "wan_bytes",
           "baseline_wan_bytes", "comm_reduction", "bits_per_param_up", "bits_per_param_down",
           "compute_utilization", "peak_wan_bits_per_s", "fp32_sync_to_compute_ratio", "codec",
           "theta_b_identical", "replica_groups", "ranks_per_group", "expert_parallel",
           "intra_island_failures", "intra_island_recoveries", "wall_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago sim", description=__doc__)
    p.add_argument("--preset", default="ci", help="a preset under configs/ or a .toml path")
    p.add_argument("--report", default="runs/sim", help="folder for report.json, loss.png and logs")
    p.add_argument("--baseline", choices=["ddp", "none"], help="override sim.baseline (default ddp)")
    p.add_argument("--fragments", type=int, help="override diloco.fragments")
    p.add_argument("--wan", help='every island\'s emulated link, e.g. "100mbit,50ms" or '
                                 '"20mbit,80ms,5ms,0.1%%" (rate, one-way latency, jitter, loss)')
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted name (repeatable)")
    p.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                   help="run the simulation once per seed (train.seed), each in DIR/seed-S/, and write "
                        "the spread of the gap across them to DIR/report.json")
    add_prometheus_argument(p)
    return p


def seed_list(text: str) -> list[int]:
    """`--seeds`: distinct integers separated by commas."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got '{text}'") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got '{text}'")
    return seeds


def main(argv: list[str]) -> int:
    if argv[:1] == ["plan"]:
        from sim.plan import main as plan_main

        return plan_main(argv[1:])
    args = parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.baseline:
        overrides.append(f"sim.baseline={args.baseline}")
    if args.fragments is not None:
        overrides.append(f"diloco.fragments={args.fragments}")
    if args.wan is not None:
        overrides.append(f"sim.wan={json.dumps(args.wan)}")
    out = Path(args.report)
    if args.seeds is None:
        cfg = cfglib.load(SimConfig, args.preset, overrides)
        run_one(cfg, out, args.preset, metrics_ports(out, args, cfg.sim.host))
        return 0
    if any(cfglib.parse_override(o)[0] == ["train", "seed"] for o in overrides):
        raise cfglib.ConfigError("--seeds sets train.seed for each run; drop --set train.seed=...")
    configs = [cfglib.load(SimConfig, args.preset, [*overrides, f"train.seed={seed}"]) for seed in args.seeds]
    ports = metrics_ports(out, args, configs[0].sim.host)
    reports = [run_one(cfg, out / f"seed-{seed}", args.preset, ports, f"seed {seed}, {k + 1} of {len(args.seeds)}")
               for k, (seed, cfg) in enumerate(zip(args.seeds, configs, strict=True))]
    spread = seed_spread(args.seeds, reports)
    spread.update(run_metadata(args.seeds, configs[0]))
    write_json(out / "report.json", spread)
    console.print(summary_table(f"archipelago sim · {args.preset} · {len(args.seeds)} seeds",
                                {k: spread[k] for k in SPREAD_SUMMARY if k in spread}))
    print_law_note(spread)
    console.print(f"report: {out / 'report.json'}")
    return 0


# Per-run fields the seed spread lists, and those it summarises (mean, std, min, max).
SPREAD_FIELDS = ("final_eval_loss", "baseline_eval_loss", "loss_gap_rel", "merge_gain", "comm_reduction",
                 "wan_bytes", "wall_s")
SPREAD_STATS = ("final_eval_loss", "baseline_eval_loss", "loss_gap_rel", "comm_reduction")
SPREAD_SUMMARY = ("seeds", "params", "tokens_per_param", *(f"loss_gap_rel_{s}" for s in ("mean", "std", "min", "max")),
                  "law_predicted_gap", *(f"comm_reduction_{s}" for s in ("mean", "std", "min", "max")))
# The same in every run of a preset: copied once to the spread.
SPREAD_CONSTANT = ("params", "tokens_per_param", "law_predicted_gap", "law_predicted_gap_note")


def seed_spread(seeds: list[int], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The same run under several seeds: each run's figures, and for the main ones their mean,
    sample standard deviation (0 for one seed), min and max."""
    out: dict[str, Any] = {"seeds": seeds, "runs": [
        {"seed": seed, "report": f"seed-{seed}/report.json", **{k: r.get(k) for k in SPREAD_FIELDS}}
        for seed, r in zip(seeds, reports, strict=True)]}
    for key in SPREAD_STATS:
        values = [r[key] for r in reports if r.get(key) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        out.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_min": min(values), f"{key}_max": max(values)})
    out.update({key: reports[0][key] for key in SPREAD_CONSTANT if key in reports[0]})
    return out


def print_law_note(report: dict[str, Any]) -> None:
    """Under the summary: where `law_predicted_gap` comes from (sim/law.py)."""
    if "law_predicted_gap_note" in report:
        console.print(f"law_predicted_gap: {report['law_predicted_gap_note']}")


def run_one(cfg: SimConfig, out: Path, preset: str, ports: MetricsPorts | None = None,
            label: str = "") -> dict[str, Any]:
    """One simulated run (and its baseline) into `out`: report.json, plots, a summary table; shown
    live while it runs (sim/monitor.py)."""
    console.print(f"[bold]archipelago sim[/] · {preset}: {cfg.sim.islands} islands × "
                  f"{cfg.diloco.rounds} rounds × H={cfg.diloco.inner_steps}, codec {cfg.diloco.codec}, "
                  f"seed {cfg.train.seed}; logs in {out}/")
    phases = [("islands", cfg.total_inner_steps)]
    if cfg.sim.baseline == "ddp":
        phases.append(("baseline", cfg.total_inner_steps))
    with RunMonitor(f"sim {preset}" + (f" · {label}" if label else ""), phases, ports) as monitor:
        report = simulate(cfg, out, preset, monitor)
    report.update(run_metadata(cfg.train.seed, cfg))
    series = {"DiLoCo (θ_b, island 0)": ([p["tokens"] for p in report["diloco_eval_curve"]],
                                         [p["loss"] for p in report["diloco_eval_curve"]])}
    before = [p for p in report["diloco_eval_curve"] if "local_loss" in p]
    if before:
        series["island 0 before each merge"] = ([p["tokens"] for p in before], [p["local_loss"] for p in before])
    if "baseline_eval_curve" in report:
        series["data-parallel baseline"] = ([p["tokens"] for p in report["baseline_eval_curve"]],
                                            [p["loss"] for p in report["baseline_eval_curve"]])
    line_plot(out / "loss.png", series, xlabel="tokens (all islands)", ylabel="eval loss",
              title=f"{cfg.sim.islands} islands, H={cfg.diloco.inner_steps}, {cfg.diloco.codec}")
    timeline = report.pop("bandwidth_timeline")
    if timeline:
        line_plot(out / "bandwidth.png", {"island-0 link (both directions)": (
            [p["t_s"] for p in timeline], [p["bits_per_s"] / 1e6 for p in timeline])},
            xlabel="seconds", ylabel="Mbit/s (100 ms bins)", title=f"WAN traffic, {report['wan'][0]}")
    report["bandwidth_timeline_island0"] = timeline
    write_json(out / "report.json", report)
    console.print(summary_table(f"archipelago sim · {preset}",
                                {k: report[k] for k in SUMMARY if k in report}))
    print_law_note(report)
    console.print(f"report: {out / 'report.json'}")
    return report
