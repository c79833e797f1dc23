"""`archipelago sim plan --failures`: goodput under hardware failures at cluster scale, for this system,
synchronous data parallel and elastic data parallel, and `--validate` against a chaos run.

Failures arrive as a Poisson process: each accelerator fails at rate 1/M (M its mean time between
failures), so a unit of a accelerators fails at rate λ = a/M and the whole cluster of N·A at
Λ = N·A/M. A unit hit by a failure is down for R (restart: replace or reboot, start the processes,
load state) plus J (rejoin: register and catch up, or heal from a peer). Work since the last
checkpoint, every c seconds of work, is lost: for an exponential time to failure T, the expected
loss is L(λ, c) = E[T mod c] = 1/λ − c/(e^{λc} − 1) (≈ c/2 when λc is small). A unit's goodput is
its useful time over its time, (1/λ − L) / (1/λ + R + J) (a renewal cycle: up until a failure,
then down). Checkpoints, all-reduces and outer syncs cost nothing here; only failures do.

- This system (islands, docs/design.md "Failure model"): a failure costs only its island, or its
  replica group with `--replica-groups G` (an island of G groups loses one group, a/G of its
  accelerators, while the rest train on), the work since its last local checkpoint (c:
  `diloco.local_checkpoint_every` inner steps) plus R + J. The other islands go on: rounds close on
  `quorum` of the live islands, and an island whose lease lapsed is no longer live. Only when the
  quorum needs every island (⌈qN⌉ > N − 1) does each failure make the others wait D (`--detect`,
  the lease TTL) for the dead island's lease; and when fewer than ⌈qN⌉ islands are up (at a time,
  with probability P from the binomial law of islands down) nobody's rounds close, counted as
  lost for everyone.
      goodput = unit(λ_u, c, R + J) · (1 − (N − 1)·λ_i·D·[quorum needs every island]) · (1 − P)
- Synchronous data parallel over all N·A accelerators: every failure stops everyone; the job
  notices it (D), restarts (R), rejoins (J, reloading the checkpoint) and loses L(Λ, c) of work:
      goodput = (1/Λ − L(Λ, c)) / (1/Λ + D + R + J)
- Elastic data parallel (torchft-style): N·G replica groups of A/G accelerators, averaged every step;
  a failed group drops out and the others go on, but a step's all-reduce waits for a dead peer
  until it is noticed (D), and the quorum re-forms when the group leaves and again when it comes
  back (J each time: the live groups pause while it heals from one of them). A failed group loses
  no checkpointed work (it heals from a peer) and is away R + J; below ⌈q·N·G⌉ groups up the job
  stops.
      goodput = (1 − p_group_down) / (1 + Λ·(D + J)) · (1 − P_groups)

`--validate` runs the chaos preset (`archipelago chaos --preset ci`, sim/chaos.py) twice: without
faults, which gives the step time, the goodput of a run with no failure (start-up and the end of
the run) and J, the seconds a replacement island process takes from its start to training: the CPU
seconds of an island process built alone after that run (`island run --startup-only`), at the share
of this host's cores a replacement gets beside the islands that train on (cores / islands, at most
1: on a cluster of one island per host, its own start), plus the run's islands' registration and
pull (the run's own start, every process at once, takes longer and is reported beside it); then
with island kills drawn as a Poisson process at a compressed rate (`--mtbf`, e.g. 90s per island),
each island restarted `restart_after_s` (R) later and resuming from its local checkpoint. The prediction is
that fault-free goodput times this system's failure factor at those inputs (c: the local checkpoint
interval at the measured step time); it is printed next to the goodput measured under the drawn
kills, and next to what the model gives for the number of kills actually drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from archipelago.config import ConfigError
from archipelago.console import console, summary_table
from archipelago.runinfo import run_metadata, write_json

HOUR = 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": HOUR, "d": 24 * HOUR, "y": 365 * 24 * HOUR}


def seconds(text: str, flag: str, default_unit: str = "s") -> float:
    """`90`, `90s`, `10m`, `2h`, `30d`, `1y` -> seconds (a bare number is in `default_unit`)."""
    t = str(text).strip().lower()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u) and t[:-len(u)]), None)
    try:
        value = float(t[:-len(unit)] if unit else t) * _UNITS[unit or default_unit]
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"plan --failures: {flag} takes a duration like 90s, 10m, 2h, 30d or 1y, got '{text}'")
    return value


@dataclass
class FailureInput:
    islands: int  # N
    accelerators_per_island: int  # A
    mtbf_s: float  # M, per accelerator
    restart_s: float  # R
    rejoin_s: float  # J
    checkpoint_every_s: float  # c: local checkpoints (this system), global ones (synchronous data parallel)
    quorum: float = 0.6  # q: fraction of the islands (replica groups, for elastic data parallel) needed
    replica_groups: int = 1  # G per island
    detect_s: float = 60.0  # D: until a failure is noticed (lease TTL, collective timeout)
    base_goodput: float = 1.0  # goodput of the run without failures (start-up, end of run)

    def __post_init__(self) -> None:
        if self.islands < 1 or self.accelerators_per_island < 1 or self.replica_groups < 1:
            raise ConfigError("plan --failures: --islands, --accelerators and --replica-groups must be >= 1")
        if self.accelerators_per_island % self.replica_groups:
            raise ConfigError(f"plan --failures: --accelerators ({self.accelerators_per_island}) must be a multiple "
                              f"of --replica-groups ({self.replica_groups})")
        if not self.mtbf_s > 0 or not self.checkpoint_every_s > 0:
            raise ConfigError("plan --failures: --mtbf and --checkpoint-every must be positive")
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"plan --failures: --quorum must be in (0, 1], got {self.quorum}")
        if not 0 < self.base_goodput <= 1:
            raise ConfigError(f"plan --failures: the base goodput must be in (0, 1], got {self.base_goodput}")


def lost_since_checkpoint(rate: float, every: float) -> float:
    """E[T mod c] for T ~ Exp(rate): the work a failure destroys, checkpoints every `every` s of work."""
    x = rate * every
    if x < 1e-6:  # the series, where the difference below would cancel
        return every / 2 - rate * every * every / 12
    if x > 700:  # no checkpoint within reach: everything since the start
        return 1 / rate
    return 1 / rate - every / math.expm1(x)


def unit_goodput(rate: float, every: float, down_s: float) -> float:
    """Useful fraction of a unit's time: up 1/rate on average, then `down_s` down, losing the work
    since its last checkpoint."""
    return (1 / rate - lost_since_checkpoint(rate, every)) / (1 / rate + down_s)


def below_quorum(units: int, p_down: float, needed: int) -> float:
    """P(fewer than `needed` of `units` independent units are up), each down with probability p_down."""
    if needed <= 0 or p_down <= 0:
        return 0.0
    if p_down >= 1:
        return 1.0
    # P(down > units - needed) = sum over k > units - needed of C(units, k) p^k (1-p)^(units-k), in logs
    total = 0.0
    for k in range(units - needed + 1, units + 1):
        log_term = (math.lgamma(units + 1) - math.lgamma(k + 1) - math.lgamma(units - k + 1)
                    + k * math.log(p_down) + (units - k) * math.log1p(-p_down))
        total += math.exp(log_term)
    return min(1.0, total)


def predict(p: FailureInput) -> dict[str, Any]:
    n, a, g = p.islands, p.accelerators_per_island, p.replica_groups
    down = p.restart_s + p.rejoin_s
    rate_cluster = n * a / p.mtbf_s
    rate_island = a / p.mtbf_s
    rate_unit = rate_island / g  # a replica group (the island itself when g = 1)
    needed = math.ceil(p.quorum * n)
    # this system
    p_unit_down = rate_unit * down / (1 + rate_unit * down)
    p_island_down = p_unit_down ** g  # every group of it down at once
    waits = (n - 1) * rate_island * p.detect_s if needed > n - 1 and n > 1 else 0.0
    stall = below_quorum(n, p_island_down, needed)
    ours = unit_goodput(rate_unit, p.checkpoint_every_s, down) * max(0.0, 1 - waits) * (1 - stall)
    # synchronous data parallel
    sync = unit_goodput(rate_cluster, p.checkpoint_every_s, p.detect_s + down)
    # elastic data parallel
    groups = n * g
    elastic_stall = below_quorum(groups, p_unit_down, math.ceil(p.quorum * groups))
    elastic = (1 - p_unit_down) / (1 + rate_cluster * (p.detect_s + p.rejoin_s)) * (1 - elastic_stall)
    return {
        "accelerators": n * a, "failures_per_hour": rate_cluster * HOUR,
        "mean_s_between_failures_cluster": 1 / rate_cluster,
        "mean_s_between_failures_unit": 1 / rate_unit,
        "this_system": {"goodput": p.base_goodput * ours, "unit": "replica group" if g > 1 else "island",
                        "lost_work_per_failure_s": lost_since_checkpoint(rate_unit, p.checkpoint_every_s),
                        "down_per_failure_s": down, "unit_down_fraction": p_unit_down,
                        "others_wait_fraction": waits, "below_quorum_fraction": stall},
        "sync_data_parallel": {"goodput": p.base_goodput * sync,
                               "lost_work_per_failure_s": lost_since_checkpoint(rate_cluster, p.checkpoint_every_s),
                               "stopped_per_failure_s": p.detect_s + down},
        "elastic_data_parallel": {"goodput": p.base_goodput * elastic, "group_down_fraction": p_unit_down,
                                  "everyone_paused_per_failure_s": p.detect_s + p.rejoin_s,
                                  "below_quorum_fraction": elastic_stall},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago sim plan --failures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--islands", type=int, help="islands (N)")
    p.add_argument("--accelerators", type=int, help="accelerators per island (A)")
    p.add_argument("--replica-groups", type=int, default=1, help="replica groups per island (G; default 1)")
    p.add_argument("--mtbf", help="mean time between failures of one accelerator (M): 1y, 30d, 2h, 90s (bare: hours)")
    p.add_argument("--restart", default="10m", help="restart time R of a failed unit (default 10m)")
    p.add_argument("--rejoin", default="1m", help="rejoin time J: register and catch up, or heal (default 1m)")
    p.add_argument("--detect", default="60s", help="time D until a failure is noticed (default 60s)")
    p.add_argument("--checkpoint-every", default="5m", help="checkpoint interval c, seconds of work (default 5m)")
    p.add_argument("--quorum", type=float, default=0.6, help="fraction of islands (groups) a round (step) needs")
    p.add_argument("--validate", action="store_true",
                   help="run the chaos preset under island kills drawn at the rate --mtbf gives one island "
                        "(--accelerators 1), and print predicted next to measured goodput")
    p.add_argument("--preset", default="ci", help="with --validate: the chaos preset (default ci)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, help="with --validate: the seed of the drawn kills (default: the preset's)")
    p.add_argument("--report", default="runs/plan-failures", help="with --validate: the runs' folder")
    p.add_argument("--json", help="write the plan (and validation) as JSON here")
    return p


def build_input(args: argparse.Namespace, **measured: float) -> FailureInput:
    values: dict[str, Any] = {"islands": args.islands, "accelerators_per_island": args.accelerators,
                              "replica_groups": args.replica_groups, "quorum": args.quorum}
    for key, flag in (("restart_s", "restart"), ("rejoin_s", "rejoin"), ("detect_s", "detect"),
                      ("checkpoint_every_s", "checkpoint_every")):
        values[key] = seconds(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.mtbf is not None:
        values["mtbf_s"] = seconds(args.mtbf, "--mtbf", default_unit="h")
    values.update(measured)
    missing = [flag for key, flag in (("islands", "--islands"), ("accelerators_per_island", "--accelerators"),
                                      ("mtbf_s", "--mtbf")) if values.get(key) is None]
    if missing:
        raise ConfigError(f"plan --failures: give {', '.join(missing)}")
    return FailureInput(**values)


def show(p: FailureInput, predicted: dict[str, Any]) -> None:
    console.print(summary_table("archipelago sim plan --failures (predicted goodput)", {
        "accelerators": predicted["accelerators"], "failures per hour": round(predicted["failures_per_hour"], 2),
        f"this system ({predicted['this_system']['unit']} fails alone)": round(predicted["this_system"]["goodput"], 3),
        "elastic data parallel": round(predicted["elastic_data_parallel"]["goodput"], 3),
        "synchronous data parallel": round(predicted["sync_data_parallel"]["goodput"], 3)}))


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.validate:
        return validate(args)
    plan = build_input(args)
    predicted = predict(plan)
    show(plan, predicted)
    if args.json:
        write_json(args.json, {"input": asdict(plan), "predicted": predicted, **run_metadata(0, asdict(plan))})
    return 0


# ---- --validate ---------------------------------------------------------------------------------

def poisson_kills(rng: random.Random, islands: int, mtbf_s: float, expected_s: float, restart_s: float,
                  rejoin_s: float) -> list[tuple[float, str]]:
    """Kill times per island: up an Exp(mtbf) time, killed, back after restart + rejoin, and again."""
    kills = []
    for i in range(islands):
        t = rng.expovariate(1 / mtbf_s)
        while t < expected_s:
            kills.append((round(t, 2), f"island-{i}"))
            t += restart_s + rejoin_s + rng.expovariate(1 / mtbf_s)
    return sorted(kills)


def startup_probe(preset_file: Path, islands: int, timeout_s: float = 300.0) -> dict[str, float]:
    """An island process built alone (`island run --startup-only`): its wall seconds to the point where
    it would call the coordinator (`process_s`), and the CPU seconds it spent in all (`cpu_s`, from
    the kernel's accounting of the child). Raises RuntimeError when it fails or overruns."""
    argv = [sys.executable, "-m", "archipelago.cli", "island", "run", "--preset", str(preset_file),
            "--island-id", "startup-probe", "--num-islands", str(islands), "--startup-only"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines, tail = out.read().strip().splitlines(), err.read().strip()[-500:]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"island run --startup-only exited with {proc.returncode}: {tail}")
    return {"process_s": float(json.loads(lines[-1])["process_s"]), "cpu_s": usage.ru_utime + usage.ru_stime}


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def validate(args: argparse.Namespace) -> int:
    from sim.chaos_cluster import run_cluster
    from sim.fault_schedule import FaultSpec, Schedule
    from sim.goodput import accounting, step_seconds
    from sim.run import bound_push_tokens
    from sim.run_faults import load_config

    if args.mtbf is None:
        raise ConfigError("plan --failures --validate: give --mtbf, one island's mean time between failures "
                          "at the compressed rate (e.g. 90s)")
    cfg = load_config(args.preset, args.overrides)
    if cfg.diloco.local_checkpoint_every <= 0:
        raise ConfigError("plan --failures --validate: the preset has no local checkpoints "
                          "(diloco.local_checkpoint_every)")
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    from archipelago import config as cfglib
    from island.data import open_dataset

    open_dataset(cfg.data)
    bound_push_tokens(cfg)
    preset_file = out / "chaos-config.toml"
    preset_file.write_text(cfglib.dump_toml(asdict(cfg)))
    clean = run_cluster(cfg, out / "fault-free", preset_file, cfg.use_etcd, None)
    clean_acc = accounting(clean)
    run_start_s = statistics.median(a["t"] - clean["spawned"][island] for island, acks in clean["acks"].items()
                                    for a in acks if a["event"] == "start")
    connects = [a["startup"]["connect_s"] for acks in clean["acks"].values() for a in acks
                if a["event"] == "start" and a.get("startup")]
    connect_s = statistics.median(connects) if connects else None
    # J as a replacement meets it: an island built alone (its CPU seconds), at the share of this
    # host's cores it gets beside the islands that train on, plus the run's registration and pull
    probe = startup_probe(preset_file, cfg.sim.islands)
    share = min(1.0, host_cores() / cfg.sim.islands)
    rejoin_s = probe["cpu_s"] / share + (connect_s or 0.0)
    rejoin_from = f"startup probe: {probe['cpu_s']:.2f} CPU s at {share:.2f} of the cores"
    step_s = step_seconds(clean, cfg)
    measured = {"islands": cfg.sim.islands, "accelerators_per_island": 1, "quorum": cfg.coordinator.quorum,
                "restart_s": cfg.faults.restart_after_s, "rejoin_s": rejoin_s,
                "checkpoint_every_s": cfg.diloco.local_checkpoint_every * step_s,
                "detect_s": cfg.coordinator.lease_ttl_s, "base_goodput": clean_acc["goodput"]}
    plan = build_input(argparse.Namespace(**{**vars(args), "islands": None, "accelerators": None,
                                             "replica_groups": 1}), **measured)
    rng = random.Random(cfg.train.seed if args.seed is None else args.seed)
    kills = poisson_kills(rng, cfg.sim.islands, plan.mtbf_s, clean_acc["wall_s"], plan.restart_s, plan.rejoin_s)
    schedule = Schedule([FaultSpec("kill_island", at_s=t, targets=[island], duration_s=plan.restart_s)
                         for t, island in kills], 0.0, f"Poisson kills, one island's mean time between failures "
                                                        f"{plan.mtbf_s:g}s")
    chaos = run_cluster(cfg, out / "chaos", preset_file, cfg.use_etcd, clean_acc["wall_s"], schedule=schedule)
    acc = accounting(chaos)
    predicted = predict(plan)
    injected = [f for f in chaos["faults"] if f["injected_at_s"] is not None]
    # the model for the kills actually drawn: each costs its island L + R + J of its time
    per_kill = predicted["this_system"]["lost_work_per_failure_s"] + plan.restart_s + plan.rejoin_s
    drawn = clean_acc["goodput"] * (1 - len(injected) * per_kill / acc["available_s"])
    result = {"input": asdict(plan), "predicted": predicted, "kills_expected": sum(
        clean_acc["wall_s"] / (plan.mtbf_s + plan.restart_s + plan.rejoin_s) for _ in range(cfg.sim.islands)),
        "kills_injected": len(injected), "kills": kills,
        "measured": {"goodput": acc["goodput"], "fault_free_goodput": clean_acc["goodput"], "step_s": step_s,
                     "updates_lost": acc["updates_lost"], "updates_applied_twice": acc["updates_applied_twice"],
                     "goodput_breakdown": acc["goodput_breakdown"], "wall_s": acc["wall_s"]},
        "predicted_for_the_drawn_kills": drawn,
        "rejoin": {"from": rejoin_from, "startup_probe": probe, "core_share": share,
                   "connect_s": connect_s, "fault_free_start_s": run_start_s,
                   # the replacements' own start-up in the run with kills (process start to training)
                   "replacements_s": [a["startup"]["process_s"] for acks in chaos["acks"].values() for a in acks
                                      if a["event"] == "start" and a.get("epoch", 1) > 1 and a.get("startup")]},
        "gap": predicted["this_system"]["goodput"] - acc["goodput"]}
    show(plan, predicted)
    console.print(summary_table(f"plan --failures --validate · chaos {args.preset}", {
        "kills (expected, injected)": f"{result['kills_expected']:.1f}, {len(injected)}",
        "rejoin J (measured)": f"{plan.rejoin_s:.2f}s ({rejoin_from}; the run's own start: {run_start_s:.2f}s)",
        "checkpoint every c": f"{plan.checkpoint_every_s:.2f}s",
        "fault-free goodput": f"{clean_acc['goodput']:.3f}",
        "goodput": f"{predicted['this_system']['goodput']:.3f} predicted · {acc['goodput']:.3f} measured "
                   f"({abs(result['gap']):.3f} apart)",
        "for the kills drawn": f"{drawn:.3f}",
        "lost, applied twice": f"{acc['updates_lost']}, {acc['updates_applied_twice']}"}))
    path = Path(args.json) if args.json else out / "plan-failures.json"
    write_json(path, {**result, **run_metadata(cfg.train.seed, cfg)})
    console.print(f"plan: {path}")
    return 0


__all__ = ["FailureInput", "lost_since_checkpoint", "predict", "main"]
