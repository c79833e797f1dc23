"""`archipelago sim`: simulate a multi-region run on this machine and compare it with ordinary
synchronous data-parallel training on the same model, data and number of tokens.
`archipelago sim plan`: the scale model (sim/plan.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from archipelago import config as cfglib
from archipelago.console import console, summary_table
from archipelago.plots import line_plot
from archipelago.runinfo import run_metadata, write_json
from sim.run import SimConfig, simulate

SUMMARY = ("islands", "inner_steps", "outer_rounds", "fragments", "tokens", "final_eval_loss", "merge_gain",
           "baseline_eval_loss", "loss_gap_rel", "wan_bytes", "baseline_wan_bytes", "comm_reduction",
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
    return p


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
    cfg = cfglib.load(SimConfig, args.preset, overrides)
    out = Path(args.report)
    console.print(f"[bold]archipelago sim[/] · {args.preset}: {cfg.sim.islands} islands × "
                  f"{cfg.diloco.rounds} rounds × H={cfg.diloco.inner_steps}, codec {cfg.diloco.codec}; "
                  f"logs in {out}/")
    report = simulate(cfg, out, args.preset)
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
    console.print(summary_table(f"archipelago sim · {args.preset}",
                                {k: report[k] for k in SUMMARY if k in report}))
    console.print(f"report: {out / 'report.json'}")
    return 0
