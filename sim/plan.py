"""`archipelago sim plan`: a scale model of a DiLoCo run, checked against a real simulation.

From the model size, islands, step time, H, fragments, codec bits and each island's link it
predicts what a round costs on the WAN and whether the accelerators wait:

- bits per parameter of a scheme: its wire layout (values + block scales, or indices + values),
  before zstd, so a slight over-estimate of what crosses the link;
- a fragment's sync: push its P/F parameters up, then receive the outer delta down, one-way
  latency each way: s = (P/F)·(b_up + b_down)/B + 2·L;
- blocking: with overlap an island blocks only when a fragment is due again (one round, H steps,
  later) before its last sync merged, or when the link cannot carry a round's bytes within the
  round: blocked = max(0, max(s, P·max(b_up, b_down)/B) − H·t); without overlap every sync blocks
  for its full s, F times a round;
- compute_utilization = H·t / (H·t + blocked); wall = rounds · (H·t + blocked);
- comm_reduction against a ring all-reduce of fp32 gradients, 8·(N−1)·P bytes per step for N
  workers: 8·(N−1)·P·H / (N·P·(b_up + b_down)/8);
- fp32_sync_to_compute_ratio = (32·P/B + L) / (H·t);
- peak rate on a link, both directions together as the link proxy counts them: a fragment's push
  and its delta each leave as one burst, so min(B, P·b_up/F) + min(B, P·b_down/F) per second.

`--validate` runs the preset's simulation (no baseline), takes its measured step time, and prints
the prediction next to the measurement.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from archipelago import config as cfglib
from archipelago.config import ConfigError
from archipelago.console import console, summary_table
from archipelago.runinfo import run_metadata, write_json
from protos.quant import get_scheme
from sim.wan import WanSpec

_LAYOUT_NUMEL = 1 << 20


def scheme_bits(name: str) -> float:
    """Bits per parameter of scheme `name` on the wire, before zstd (from its part layout)."""
    layout = get_scheme(name).layout(_LAYOUT_NUMEL)
    total = sum(spec.count * np.dtype(spec.dtypes[0]).itemsize for spec in layout.values())
    return total * 8 / _LAYOUT_NUMEL


@dataclass
class PlanInput:
    params: float  # P, synced parameters
    islands: int  # N
    step_time_s: float  # t, one inner step of one island
    inner_steps: int  # H
    fragments: int = 1  # F
    codec: str = "int8-block"
    broadcast_codec: str = "int8-block"
    bandwidth_bps: float = 1e9  # B, each island's link, each direction
    latency_s: float = 0.05  # L, one way
    rounds: int = 100
    overlap: bool = True
    accelerators_per_island: int = 1  # for the report only: t is the island's step time

    def __post_init__(self) -> None:
        for name in ("params", "step_time_s", "bandwidth_bps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"plan: {name} must be positive, got {getattr(self, name)}")
        if self.islands < 1 or self.inner_steps < 1 or self.fragments < 1 or self.rounds < 1:
            raise ConfigError("plan: islands, inner_steps, fragments and rounds must be >= 1")
        if self.latency_s < 0:
            raise ConfigError(f"plan: latency must be >= 0, got {self.latency_s}")
        get_scheme(self.codec)
        get_scheme(self.broadcast_codec)


def predict(p: PlanInput) -> dict[str, Any]:
    b_up, b_down = scheme_bits(p.codec), scheme_bits(p.broadcast_codec)
    compute_round = p.inner_steps * p.step_time_s
    sync_fragment = p.params / p.fragments * (b_up + b_down) / p.bandwidth_bps + 2 * p.latency_s
    link_round = p.params * max(b_up, b_down) / p.bandwidth_bps
    if p.overlap:
        blocked = max(0.0, max(sync_fragment, link_round) - compute_round)
    else:
        blocked = p.fragments * sync_fragment
    bytes_round = p.params * (b_up + b_down) / 8
    ring = 8 * (p.islands - 1) * p.params
    return {
        "bits_per_param_up": b_up, "bits_per_param_down": b_down,
        "bytes_per_round_per_island": bytes_round,
        "sync_s_per_fragment": sync_fragment, "compute_s_per_round": compute_round,
        "blocked_s_per_round": blocked,
        "compute_utilization": compute_round / (compute_round + blocked),
        "wall_s": p.rounds * (compute_round + blocked),
        "comm_reduction": (ring * p.inner_steps / (p.islands * bytes_round)) if p.islands > 1 else math.inf,
        "fp32_sync_to_compute_ratio": (32 * p.params / p.bandwidth_bps + p.latency_s) / compute_round,
        "peak_wan_bits_per_s": (min(p.bandwidth_bps, p.params * b_up / p.fragments) +
                                min(p.bandwidth_bps, p.params * b_down / p.fragments)),
    }


def parse_count(text: str) -> float:
    """`10e9`, `10B`, `125M`, `2.4m` -> a number."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise ConfigError(f"plan: '{text}' is not a count like 10B, 125M or 1e9") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago sim plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="read model size, islands, H, F, codecs, rounds and link from a sim preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--params", help="synced parameters, e.g. 10B (default: the preset's model)")
    p.add_argument("--islands", type=int)
    p.add_argument("--accelerators", type=int, help="accelerators per island (recorded; fold them into --step-time)")
    p.add_argument("--step-time", type=float, help="seconds per inner step of one island")
    p.add_argument("--inner-steps", type=int, help="H")
    p.add_argument("--fragments", type=int, help="F")
    p.add_argument("--codec", help="push scheme")
    p.add_argument("--broadcast-codec", help="broadcast scheme")
    p.add_argument("--wan", help='each island\'s link, e.g. "1gbit,50ms"')
    p.add_argument("--rounds", type=int)
    p.add_argument("--no-overlap", action="store_true", help="every sync blocks the island")
    p.add_argument("--validate", action="store_true",
                   help="run the preset's simulation and print predicted next to measured")
    p.add_argument("--report", default="runs/plan", help="folder for the validation run and plan.json")
    p.add_argument("--json", help="write the plan (and validation) as JSON here")
    return p


def _from_preset(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from sim.run import SimConfig, synced_numel

    cfg = cfglib.load(SimConfig, args.preset, args.overrides)
    link = cfg.sim.link(0)
    return cfg, {
        "params": float(synced_numel(cfg.model)), "islands": cfg.sim.islands,
        "inner_steps": cfg.diloco.inner_steps, "fragments": cfg.diloco.fragments,
        "codec": cfg.diloco.codec, "broadcast_codec": cfg.coordinator.broadcast_scheme,
        "rounds": cfg.diloco.rounds, "overlap": cfg.diloco.overlap,
        **({"bandwidth_bps": link.rate_bps, "latency_s": link.latency_s} if link else {}),
    }


def build_input(args: argparse.Namespace, base: dict[str, Any]) -> PlanInput:
    values = dict(base)
    if args.params:
        values["params"] = parse_count(args.params)
    for flag, key in (("islands", "islands"), ("step_time", "step_time_s"), ("inner_steps", "inner_steps"),
                      ("fragments", "fragments"), ("codec", "codec"), ("broadcast_codec", "broadcast_codec"),
                      ("rounds", "rounds"), ("accelerators", "accelerators_per_island")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.wan:
        link = WanSpec.parse(args.wan)
        values["bandwidth_bps"], values["latency_s"] = link.rate_bps, link.latency_s
    if args.no_overlap:
        values["overlap"] = False
    missing = [k for k in ("params", "islands", "step_time_s", "inner_steps") if k not in values]
    if missing:
        flags = {"params": "--params", "islands": "--islands", "step_time_s": "--step-time",
                 "inner_steps": "--inner-steps"}
        raise ConfigError(f"plan: give {', '.join(flags[m] for m in missing)} (or a --preset"
                          f"{' and --validate to measure the step time' if 'step_time_s' in missing else ''})")
    return PlanInput(**values)


def validate(cfg: Any, out: Path) -> dict[str, Any]:
    """Run the preset's simulation (no baseline) and return its measurements."""
    from sim.run import simulate

    report = simulate(replace(cfg, sim=replace(cfg.sim, baseline="none")), out, "plan --validate")
    islands = [json.loads((out / f"island-{i}.json").read_text()) for i in range(cfg.sim.islands)]
    step = sum(i["compute_s"] / max(1, i["inner_steps"]) for i in islands) / len(islands)
    rounds = cfg.diloco.rounds
    return {"step_time_s": step, "compute_utilization": report["compute_utilization"],
            "bytes_per_round_per_island": report["wan_bytes"] / cfg.sim.islands / rounds,
            "wall_s": report["wall_s"], "peak_wan_bits_per_s": report["peak_wan_bits_per_s"],
            "fp32_sync_to_compute_ratio": report["fp32_sync_to_compute_ratio"],
            "final_eval_loss": report["final_eval_loss"]}


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.validate and not args.preset:
        raise ConfigError("plan: --validate needs --preset (the simulation to run)")
    cfg, base = _from_preset(args) if args.preset else (None, {})
    measured = None
    if args.validate:
        measured = validate(cfg, Path(args.report))
        base["step_time_s"] = measured["step_time_s"]
    plan_in = build_input(args, base)
    predicted = predict(plan_in)
    console.print(summary_table("archipelago sim plan (predicted)", dict(predicted)))
    out: dict[str, Any] = {"input": asdict(plan_in), "predicted": predicted}
    if measured is not None:
        keys = ("compute_utilization", "bytes_per_round_per_island", "wall_s", "peak_wan_bits_per_s",
                "fp32_sync_to_compute_ratio")
        side = {k: f"{predicted[k]:.4g} predicted · {measured[k]:.4g} measured" for k in keys
                if measured.get(k) is not None}
        console.print(summary_table(f"plan --validate · {args.preset}", side))
        gap = abs(predicted["compute_utilization"] - measured["compute_utilization"])
        console.print(f"compute_utilization: predicted {predicted['compute_utilization']:.3f}, measured "
                      f"{measured['compute_utilization']:.3f} ({gap * 100:.1f} percentage points apart)")
        out.update({"measured": measured, "utilization_gap_points": gap * 100})
    if args.json or args.validate:
        path = Path(args.json) if args.json else Path(args.report) / "plan.json"
        write_json(path, {**out, **run_metadata(cfg.train.seed if cfg else 0, asdict(plan_in))})
        console.print(f"plan: {path}")
    return 0
