"""`archipelago chaos`: a simulated multi-region run under faults, checked end to end.

    --preset island-ci   faults inside an island (sim/island_faults.py): one rank of a replica group
                         is SIGKILLed mid-run and its group restarted through the island's gateway;
                         the island must go on pushing, lose no update, and the group heal bit for
                         bit from its peer
    --preset ci          faults across islands and the coordinator (sim/run_faults.py, on the
                         processes and links of sim/chaos_cluster.py): the ci job without faults,
                         then under its schedule (configs/faults-ci.toml: kill an island, partition a
                         link, kill the coordinator leader while it commits, slow an island, corrupt
                         a push), drawn with the seed, with its goodput against synchronous data
                         parallel under the same trace (sim/goodput.py)
    --preset etcd        the same with etcd's faults (configs/faults-etcd.toml): etcd killed and
                         restarted, etcd down for 90 s, the leader's link to etcd cut, the leader
                         stopped with SIGTERM
    --faults FILE        the run under the schedule in FILE instead (sim/fault_schedule.py)
    --seeds S1,S2,...    one run per seed (train.seed; each draws its own schedule) in DIR/seed-S/,
                         and the spread of goodput in DIR/report.json

Each writes report.json (and logs) under --report.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from archipelago import config as cfglib
from archipelago.console import console, summary_table
from archipelago.runinfo import run_metadata, write_json
from island.data import open_dataset
from sim.chaos_cluster import run_cluster
from sim.cli import seed_list
from sim.fault_recovery import recovery
from sim.fault_schedule import Schedule, check, dump, load_schedule
from sim.goodput import accounting, dp_goodput, step_seconds
from sim.island_faults import IslandChaosConfig, IslandFaultInjector, chaos_fields, check_chaos
from sim.monitor import RunMonitor
from sim.run import bound_push_tokens, simulate
from sim.run_faults import FAILOVER_KINDS, RunChaosConfig, handles, load_config
from sim.scrape import add_prometheus_argument, metrics_ports

ISLAND_SUMMARY = ("islands", "replica_groups", "ranks_per_group", "expert_parallel",
                  "intra_island_failures", "intra_island_recoveries", "pushes_while_down", "updates_lost",
                  "recovered_bit_identical", "recovered_equals_peer_at_sync", "final_eval_loss", "theta_b_identical",
                  "passed", "wall_s")
RUN_SUMMARY = ("islands", "failover_mode", "failures_injected", "recovered", "coordinator_failovers", "goodput",
               "dp_goodput_same_trace", "updates_lost", "updates_applied_twice", "final_eval_loss",
               "fault_free_eval_loss", "loss_gap_vs_fault_free", "final_version", "wall_s", "fault_free_wall_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset",
                   help="island-ci (kill a rank inside an island; the default), ci (configs/chaos-ci.toml: faults "
                        "across islands and the coordinator; the default with --faults or --seeds), a preset under "
                        "configs/ or a .toml path")
    p.add_argument("--report", default="runs/chaos", help="folder for report.json and logs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted name (repeatable)")
    p.add_argument("--faults", metavar="FILE",
                   help="a fault schedule (TOML [[fault]] entries: kind, at, target, duration, when; see "
                        "configs/faults-ci.toml) instead of the preset's faults.schedule")
    p.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                   help="one chaos run per seed (train.seed), each with its own drawn schedule, in DIR/seed-S/, "
                        "and the spread of goodput in DIR/report.json")
    add_prometheus_argument(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.preset = args.preset or ("ci" if args.faults or args.seeds else "island-ci")
    if handles(args.preset) or args.faults or args.seeds:  # faults across islands and the coordinator
        return run_chaos(args)
    return island_chaos(args)


def island_chaos(args: argparse.Namespace) -> int:
    """`archipelago chaos` for an island preset (a `[chaos]` table)."""
    cfg = cfglib.load(IslandChaosConfig, args.preset, args.overrides)
    check_chaos(cfg)
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("island-*.status.json"):
        stale.unlink()
    console.print(f"[bold]archipelago chaos[/] · {args.preset}: {cfg.sim.islands} islands × "
                  f"{cfg.island.num_replica_groups} replica groups × {cfg.parallel.num_ranks} ranks; kill rank "
                  f"{cfg.chaos.rank} of group {cfg.chaos.group} of island-{cfg.chaos.island}; logs in {out}/")
    injector = IslandFaultInjector(cfg, out).start()
    phases = [("islands", cfg.total_inner_steps)] + ([("baseline", cfg.total_inner_steps)]
                                                     if cfg.sim.baseline == "ddp" else [])
    try:
        with RunMonitor(f"chaos {args.preset}", phases, metrics_ports(out, args, cfg.sim.host)) as monitor:
            report = simulate(cfg, out, args.preset, monitor)
    finally:
        injector.stop()
    report.pop("bandwidth_timeline", None)
    report.update(chaos_fields(cfg, out, injector))
    report.update(run_metadata(cfg.train.seed, cfg))
    write_json(out / "report.json", report)
    console.print(summary_table(f"archipelago chaos · {args.preset}",
                                {k: report[k] for k in ISLAND_SUMMARY if k in report}))
    for name, ok in report["checks"].items():
        console.print(f"  {'[green]ok[/]' if ok else '[red]FAILED[/]'}  {name}")
    console.print(f"report: {out / 'report.json'}")
    return 0 if report["passed"] else 1


def simulate_chaos(cfg: RunChaosConfig, out: Path, preset_label: str,
                   monitor: RunMonitor | None = None, schedule: Schedule | None = None) -> dict[str, Any]:
    """The run without faults, then under `schedule` (default: the preset's faults.schedule)."""
    schedule = schedule or load_schedule(cfg.faults.schedule)
    use_etcd = cfg.use_etcd
    check(schedule, cfg.sim.islands, use_etcd, cfg.diloco.local_checkpoint_every > 0)
    out.mkdir(parents=True, exist_ok=True)
    open_dataset(cfg.data)
    bound_push_tokens(cfg)
    preset_file = out / "chaos-config.toml"
    preset_file.write_text(cfglib.dump_toml(asdict(cfg)))
    clean = run_cluster(cfg, out / "fault-free", preset_file, use_etcd, None, monitor)
    clean_acc = accounting(clean)
    chaos = run_cluster(cfg, out / "chaos", preset_file, use_etcd, clean_acc["wall_s"], monitor, schedule)
    acc = accounting(chaos)
    faults = recovery(chaos)
    (out / "faults-drawn.toml").write_text(dump(chaos["fault_objects"]))
    injected = [f for f in faults if f["injected_at_s"] is not None]
    step_s = step_seconds(clean, cfg)
    restarts = [i["replacement_started_s"] for f in faults if f["kind"] == "kill_island"
                for i in f["detail"].get("islands", {}).values() if i.get("replacement_started_s")]
    restart_s = statistics.median(restarts) if restarts else 0.0
    checkpoint_every_s = cfg.faults.dp_checkpoint_every_s or step_s * cfg.diloco.inner_steps
    dp = dp_goodput(faults, acc["wall_s"], restart_s, checkpoint_every_s)
    failovers = [f for f in faults if f["kind"] in FAILOVER_KINDS and f["recovered"]]
    return {
        "preset": preset_label, "islands": cfg.sim.islands, "inner_steps": cfg.diloco.inner_steps,
        "outer_rounds": cfg.diloco.rounds, "fragments": cfg.diloco.fragments, "overlap": cfg.diloco.overlap,
        "schedule": schedule.source, "faults": faults, "failures_injected": len(injected),
        "recovered": sum(1 for f in injected if f["recovered"]),
        "failover_mode": "etcd standby takeover" if use_etcd else "kill and restart on the sqlite state",
        "coordinator_failovers": len(failovers),
        "goodput": acc["goodput"], "dp_goodput_same_trace": dp["goodput"], "dp_model": dp,
        "updates_lost": acc["updates_lost"], "lost_keys": acc["lost_keys"],
        "updates_applied_twice": acc["updates_applied_twice"], "updates_acknowledged": acc["updates_acknowledged"],
        "final_eval_loss": chaos["eval_loss"], "fault_free_eval_loss": clean["eval_loss"],
        "loss_gap_vs_fault_free": chaos["eval_loss"] - clean["eval_loss"],
        "final_version": chaos["final_version"], "fault_free_version": clean["final_version"],
        "fault_free_goodput": clean_acc["goodput"], "wall_s": acc["wall_s"], "fault_free_wall_s": clean_acc["wall_s"],
        "useful_compute_s": acc["useful_compute_s"], "available_island_s": acc["available_s"],
        "goodput_breakdown": acc["goodput_breakdown"], "fault_free_goodput_breakdown": clean_acc["goodput_breakdown"],
        "step_s": step_s, "guard_events": chaos["events"], "injector_errors": chaos["injector_errors"],
        "corrupted_segments": sum(s.corrupted for s in chaos["links"]),
        "connections_cut": sum(s.cut_connections for s in chaos["links"]),
        "wan_bytes": sum(s.total for s in chaos["links"]),
        "island_links": _island_links(out / "chaos", cfg.sim.islands),
        **run_metadata(cfg.train.seed, cfg),
    }


def _island_links(folder: Path, islands: int) -> dict[str, dict[str, Any]]:
    """What each island's last process says of its coordinator link: reconnections, moves between
    coordinators, re-registrations and seconds without a coordinator."""
    out = {}
    for i in range(islands):
        path = folder / f"island-{i}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            out[f"island-{i}"] = {k: report.get(k) for k in ("reconnects", "coordinator_switches", "rejoins",
                                                              "coordinator_wait_s")}
    return out


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    return {"updates_lost == 0": report["updates_lost"] == 0,
            "updates_applied_twice == 0": report["updates_applied_twice"] == 0,
            "every failure recovered": report["recovered"] == report["failures_injected"] > 0,
            "goodput >= 0.93": report["goodput"] >= 0.93,
            "goodput >= 2 x dp": report["goodput"] >= 2 * report["dp_goodput_same_trace"],
            "loss gap <= 0.05": report["loss_gap_vs_fault_free"] <= 0.05,
            "coordinator failovers >= 1": report["coordinator_failovers"] >= 1}


def fault_line(f: dict[str, Any]) -> str:
    """One fault as the report prints it: what, on what, when it was injected and recovered."""
    target = f["target"] if isinstance(f["target"], str) else ",".join(f["target"])
    kind = f["kind"] + (f" ({f['when']})" if f.get("when") else "")
    if f["injected_at_s"] is None:
        return f"  {kind:<28} {target:<18} scheduled at {f['at_s']:.1f}s, not injected"
    state = "[red]NOT recovered[/]" if not f["recovered"] else (
        f"recovered at {f['recovered_at_s']:.1f}s (+{f['recovered_at_s'] - f['injected_at_s']:.1f}s)"
        if f.get("recovered_at_s") is not None else "recovered")
    line = f"  {kind:<28} {target:<18} injected at {f['injected_at_s']:.1f}s, {state}"
    d = f["detail"]
    if "zombie" in d:
        z = d["zombie"]
        line += (f"; standby took over after {d.get('takeover_s')}s, the paused leader woke after "
                 f"{z['woke_after_s']}s: {z['commits_after_wake']} commits and {z['pushes_accepted_after_wake']} pushes "
                 f"accepted after waking, " + (f"stepped down {z['stepped_down_after_wake_s']}s after"
                                              if z["stepped_down_after_wake_s"] is not None
                                              else f"exit status {z['exit_status']}"))
    if d.get("interrupted_version") is not None:
        line += (f"; killed while writing version {d['interrupted_version']}, which the next leader committed "
                 f"{d.get('interrupted_version_committed_after_s')}s after the kill")
    resumed = [i["resumed_from"] for i in d.get("islands", {}).values() if i.get("resumed_from")]
    if resumed:
        line += "; resumed from local checkpoints at steps " + ", ".join(str(r["step"]) for r in resumed)
    return line


def print_report(label: str, report: dict[str, Any]) -> None:
    console.print(summary_table(f"archipelago chaos · {label}", {k: report[k] for k in RUN_SUMMARY}))
    for f in report["faults"]:
        console.print(fault_line(f))
    for name, ok in report["targets"].items():
        console.print(f"  {'[green]ok[/]' if ok else '[red]missed[/]'}  {name}")


def run_chaos(args: argparse.Namespace) -> int:
    """`archipelago chaos` for the presets `handles` accepts (a `[faults]` table), or `--faults FILE`."""
    cfg = load_config(args.preset, args.overrides)
    schedule = load_schedule(args.faults or cfg.faults.schedule)
    check(schedule, cfg.sim.islands, cfg.use_etcd, cfg.diloco.local_checkpoint_every > 0)
    out = Path(args.report)
    if args.seeds:
        return run_seeds(args, cfg, schedule, out)
    report = run_one(args, cfg, schedule, out)
    print_report(args.preset, report)
    console.print(f"report: {out / 'report.json'}")
    return 0


def run_one(args: argparse.Namespace, cfg: RunChaosConfig, schedule: Schedule, out: Path,
            label: str = "") -> dict[str, Any]:
    console.print(f"[bold]archipelago chaos[/] · {args.preset}: {cfg.sim.islands} islands × {cfg.diloco.rounds} "
                  f"rounds × H={cfg.diloco.inner_steps}; a fault-free run, then the same under {schedule.source} "
                  f"(seed {cfg.train.seed}){f', {label}' if label else ''}; logs in {out}/")
    phases = [("fault-free", cfg.total_inner_steps), ("faults", cfg.total_inner_steps)]
    title = f"chaos {args.preset}" + (f" · {label}" if label else "")
    with RunMonitor(title, phases, metrics_ports(out, args, cfg.sim.host)) as monitor:
        report = simulate_chaos(cfg, out, args.preset, monitor, schedule)
    report["targets"] = targets_met(report)
    write_json(out / "report.json", report)
    _plot(out, report)
    return report


SEED_FIELDS = ("goodput", "dp_goodput_same_trace", "updates_lost", "updates_applied_twice", "coordinator_failovers",
               "failures_injected", "recovered", "loss_gap_vs_fault_free", "fault_free_goodput", "wall_s",
               "goodput_breakdown")


def run_seeds(args: argparse.Namespace, cfg: RunChaosConfig, schedule: Schedule, out: Path) -> int:
    """One chaos run per seed (train.seed: the model, the data order and the drawn schedule), and the
    spread of goodput across them."""
    from dataclasses import replace

    reports = []
    for k, seed in enumerate(args.seeds):
        seeded = replace(cfg, train=replace(cfg.train, seed=seed))
        report = run_one(args, seeded, schedule, out / f"seed-{seed}", f"seed {seed}, {k + 1} of {len(args.seeds)}")
        print_report(f"{args.preset} · seed {seed}", report)
        reports.append(report)
    runs = [{"seed": seed, "report": f"seed-{seed}/report.json", **{k: r[k] for k in SEED_FIELDS},
             "faults": [{"kind": f["kind"], "target": f["target"], "injected_at_s": f["injected_at_s"],
                         "recovered_at_s": f.get("recovered_at_s"), "recovered": f["recovered"]} for f in r["faults"]],
             "targets_missed": [name for name, ok in r["targets"].items() if not ok]}
            for seed, r in zip(args.seeds, reports, strict=True)]
    goodput = [r["goodput"] for r in reports]
    mean = statistics.fmean(goodput)
    spread = {"seeds": args.seeds, "schedule": schedule.source, "runs": runs, "goodput_mean": mean,
              "goodput_std": statistics.stdev(goodput) if len(goodput) > 1 else 0.0,
              "goodput_min": min(goodput), "goodput_max": max(goodput),
              "updates_lost_total": sum(r["updates_lost"] for r in reports),
              "updates_applied_twice_total": sum(r["updates_applied_twice"] for r in reports),
              "all_recovered": all(r["recovered"] == r["failures_injected"] > 0 for r in reports),
              "coordinator_failovers_min": min(r["coordinator_failovers"] for r in reports),
              **run_metadata(args.seeds, cfg)}
    write_json(out / "report.json", spread)
    console.print(summary_table(f"archipelago chaos · {args.preset} · {len(args.seeds)} seeds", {
        **{f"seed {r['seed']}": f"goodput {r['goodput']:.3f}, lost {r['updates_lost']}, twice "
                                f"{r['updates_applied_twice']}, {r['recovered']}/{r['failures_injected']} recovered, "
                                f"{r['coordinator_failovers']} failovers" for r in runs},
        **{k: spread[k] for k in ("goodput_mean", "goodput_std", "goodput_min", "goodput_max", "updates_lost_total",
                                  "updates_applied_twice_total", "all_recovered", "coordinator_failovers_min")}}))
    console.print(f"report: {out / 'report.json'}")
    return 0


def _plot(out: Path, report: dict[str, Any]) -> None:
    """Committed versions over time, with and without faults."""
    from archipelago.plots import line_plot

    series = {}
    for label, folder in (("under faults", "chaos"), ("fault-free", "fault-free")):
        times = sorted(json.loads(line)["t"] for path in (out / folder).glob("acks-*.jsonl")
                       for line in path.read_text().splitlines() if json.loads(line)["event"] == "push")
        if times:
            series[label] = ([t - times[0] for t in times], list(range(1, len(times) + 1)))
    if series:
        line_plot(out / "pushes.png", series, xlabel="seconds", ylabel="acknowledged pushes",
                  title=f"{report['islands']} islands, {report['failures_injected']} faults")
