"""`archipelago sim plan`: a scale model of a DiLoCo run, checked against a real simulation.

From the model size, islands, step time, H, fragments, codec bits, each island's link and, when
given, the throughputs of the outer sync's data path, it predicts what a round costs and whether
the accelerators wait. P parameters, N islands, F fragments, H inner steps of t seconds each, B bit/s
and L seconds one way on each island's link, S coordinator shards. Throughputs are in MB/s (1e6
bytes/s); "fp32-equivalent" counts 4 bytes a parameter whatever the codec.

- bits per parameter of a scheme: its wire layout (values + block scales, or indices + values),
  before zstd, so a slight over-estimate of what crosses the link: b_up (push), b_down (broadcast);
- the link part of a fragment's sync: push its P/F parameters up, then receive the outer delta
  down, one-way latency each way: s = (P/F)·(b_up + b_down)/B + 2·L (`sync_s_per_fragment`);
- the data path of a fragment's sync, each stage taking 0 s unless its throughput is given:
      encode  e = (P/F)·4 / encode_MBps              on the island, with error feedback
      ingest  i = N·(P/F)·(b_up/8) / ingest_wire_MBps  the N islands' pushes, on the owning shard
      merge   m = N·(P/F)·4 / merge_MBps             the same N pushes, on the same shard
      decode  d = (P/F)·4 / decode_MBps              on the island, the broadcast delta
  in order encode, up, ingest, merge, down, decode: c = e + s + i + m + d
  (`sync_chain_s_per_fragment`);
- per round on an island, F fragments: E = F·e = 4·P/encode_MBps and D = F·d = 4·P/decode_MBps
  (`encode_s_per_round`, `decode_s_per_round`). Encode runs on the training thread today (the
  island's `sync` encodes before it hands the push to the pusher thread), so E stalls compute.
  Decode runs on the receiver thread; it is counted as island time all the same (it shares the
  host's cores, and the decoded delta is merged on the training thread). Both count as blocked
  time, with overlap or without;
- the coordinator: shard k owns a fixed subset of the fragments and a shard cannot split one
  fragment, so the busiest of S shards handles ⌈F/S⌉ fragments a round:
  C = ⌈F/S⌉·(i + m) (`coordinator_s_per_round`), which is N·P·(b_up/8/ingest + 4/merge)/min(S, F)
  when S divides F or S ≥ F; shards beyond F have nothing to do;
- blocking, with overlap: a fragment is due again one round later, a round's bytes must cross the
  link within a round, and no round closes faster than the coordinator can merge one. A round lasts
  H·t + E + D + the wait, so the wait is max(0, max(c, P·max(b_up, b_down)/B, C) − (H·t + E + D)) and
  blocked = E + D + that wait = max(E + D, max(c, P·max(b_up, b_down)/B, C) − H·t);
  without overlap every sync blocks for its full chain, F times a round: blocked = F·c.
  With no throughput given, E = D = C = 0 and c = s: the link-only model;
- compute_utilization = H·t / (H·t + blocked); wall = rounds · (H·t + blocked);
- `bound_by`: what sets `blocked`: compute (nothing blocks), island encode+decode, the sync chain
  (named by its longest stage), link, or coordinator;
- `shards_needed_for_0.95`: the smallest S ≤ F with compute_utilization ≥ 0.95, or null when even
  S = F falls short (`shards_needed_note` names the stage that binds);
- comm_reduction against a ring all-reduce of fp32 gradients, 8·(N−1)·P bytes per step for N
  workers: 8·(N−1)·P·H / (N·P·(b_up + b_down)/8);
- fp32_sync_to_compute_ratio = (32·P/B + L) / (H·t);
- peak rate on a link, both directions together as the link proxy counts them: a fragment's push
  and its delta each leave as one burst, so min(B, P·b_up/F) + min(B, P·b_down/F) per second.

`--bench FILE` (repeatable) reads the throughputs from `archipelago bench codec --json` (encode
of the push codec with error feedback, decode of the broadcast codec) and `archipelago bench
coordinator --json` (ingest_wire_MBps, first push byte to last acknowledgement, and merge_MBps;
a file from before pushes were acknowledged ahead of their round's merge, which has no
ingest_latency_s, spans the merge in its ingest_wire_MBps, so the merge's time is taken out of
it; an older file's aggregation_MBps and push_wire_MBps time the same whole commit, read once, as
the merge); flags given explicitly override it. `--validate` runs the
preset's simulation (no baseline), takes its measured step time, and prints the prediction next to
the measurement.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from archipelago import config as cfglib
from archipelago.config import ConfigError
from archipelago.console import console, summary_table
from archipelago.runinfo import run_metadata, write_json
from protos.quant import get_scheme
from sim.law import predicted_gap
from sim.wan import WanSpec

_LAYOUT_NUMEL = 1 << 20
MB = 1e6  # the throughputs' unit, bytes/s
TARGET_UTILIZATION = 0.95
# PlanInput's throughput fields and the flags that set them
THROUGHPUT_FLAGS = {"encode_MBps": "--encode-MBps", "decode_MBps": "--decode-MBps",
                    "ingest_wire_MBps": "--ingest-MBps", "merge_MBps": "--merge-MBps"}


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
    # the outer sync's data path, MB/s (1e6 bytes/s); inf: takes no time (the link-only model)
    encode_MBps: float = math.inf  # island encode with error feedback, fp32-equivalent (4 bytes/param)
    decode_MBps: float = math.inf  # island decode of the broadcast delta, fp32-equivalent
    ingest_wire_MBps: float = math.inf  # one coordinator shard's push ingest, wire bytes
    merge_MBps: float = math.inf  # one shard's merge, fp32-equivalent bytes of the pushes merged
    shards: int = 1  # S, coordinator shards, each owning a fixed subset of the fragments

    def __post_init__(self) -> None:
        for name in ("params", "step_time_s", "bandwidth_bps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"plan: {name} must be positive, got {getattr(self, name)}")
        if self.islands < 1 or self.inner_steps < 1 or self.fragments < 1 or self.rounds < 1:
            raise ConfigError("plan: islands, inner_steps, fragments and rounds must be >= 1")
        if self.latency_s < 0:
            raise ConfigError(f"plan: latency must be >= 0, got {self.latency_s}")
        for name, flag in THROUGHPUT_FLAGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"plan: {name} ({flag}) must be a positive number of MB/s, got {value!r}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"plan: shards (--shards) must be an integer >= 1, got {self.shards!r}")
        get_scheme(self.codec)
        get_scheme(self.broadcast_codec)


def _round(p: PlanInput, b_up: float, b_down: float, shards: int) -> dict[str, Any]:
    """One round's stage times and what blocks, with `shards` coordinator shards."""
    frag = p.params / p.fragments
    compute_round = p.inner_steps * p.step_time_s
    sync_fragment = frag * (b_up + b_down) / p.bandwidth_bps + 2 * p.latency_s
    link_round = p.params * max(b_up, b_down) / p.bandwidth_bps
    stage = {  # a fragment's sync chain, in order
        "encode": frag * 4 / (p.encode_MBps * MB),
        "up": frag * b_up / p.bandwidth_bps + p.latency_s,
        "ingest": p.islands * frag * b_up / 8 / (p.ingest_wire_MBps * MB),
        "merge": p.islands * frag * 4 / (p.merge_MBps * MB),
        "down": frag * b_down / p.bandwidth_bps + p.latency_s,
        "decode": frag * 4 / (p.decode_MBps * MB),
    }
    # s + the data path (not sum(stage): with no throughput given c is s, to the last bit)
    chain = sync_fragment + stage["encode"] + stage["ingest"] + stage["merge"] + stage["decode"]
    island = p.fragments * (stage["encode"] + stage["decode"])
    coordinator = math.ceil(p.fragments / shards) * (stage["ingest"] + stage["merge"])
    chain_name = f"sync chain ({max(stage, key=stage.__getitem__)})"
    if p.overlap:
        terms = {"island encode+decode": island, chain_name: chain - compute_round,
                 "link": link_round - compute_round, "coordinator": coordinator - compute_round}
        blocked = max(0.0, *terms.values())
        bound_by = max(terms, key=terms.__getitem__) if blocked > 0 else "compute"
    else:
        blocked = p.fragments * chain
        bound_by = chain_name if blocked > 0 else "compute"
    return {"sync_fragment": sync_fragment, "chain": chain, "compute_round": compute_round,
            "encode_round": p.fragments * stage["encode"], "decode_round": p.fragments * stage["decode"],
            "coordinator_round": coordinator, "blocked": blocked, "bound_by": bound_by,
            "utilization": compute_round / (compute_round + blocked)}


def shards_needed(p: PlanInput, b_up: float, b_down: float) -> tuple[int | None, str]:
    """The smallest S <= F reaching `TARGET_UTILIZATION`, or None and what binds at S = F."""
    for s in range(1, p.fragments + 1):
        r = _round(p, b_up, b_down, s)
        if r["utilization"] >= TARGET_UTILIZATION:
            return s, f"{s} shard(s) give compute_utilization {r['utilization']:.3f}"
    return None, (f"even {p.fragments} shard(s), one per fragment, give compute_utilization "
                  f"{r['utilization']:.3f} < {TARGET_UTILIZATION}: {r['bound_by']} binds")


def predict(p: PlanInput) -> dict[str, Any]:
    b_up, b_down = scheme_bits(p.codec), scheme_bits(p.broadcast_codec)
    r = _round(p, b_up, b_down, p.shards)
    compute_round, blocked = r["compute_round"], r["blocked"]
    bytes_round = p.params * (b_up + b_down) / 8
    ring = 8 * (p.islands - 1) * p.params
    needed, note = shards_needed(p, b_up, b_down)
    return {
        "bits_per_param_up": b_up, "bits_per_param_down": b_down,
        "bytes_per_round_per_island": bytes_round,
        "sync_s_per_fragment": r["sync_fragment"], "compute_s_per_round": compute_round,
        "blocked_s_per_round": blocked,
        "compute_utilization": r["utilization"],
        "wall_s": p.rounds * (compute_round + blocked),
        "comm_reduction": (ring * p.inner_steps / (p.islands * bytes_round)) if p.islands > 1 else math.inf,
        "fp32_sync_to_compute_ratio": (32 * p.params / p.bandwidth_bps + p.latency_s) / compute_round,
        "peak_wan_bits_per_s": (min(p.bandwidth_bps, p.params * b_up / p.fragments) +
                                min(p.bandwidth_bps, p.params * b_down / p.fragments)),
        "sync_chain_s_per_fragment": r["chain"],
        "encode_s_per_round": r["encode_round"], "decode_s_per_round": r["decode_round"],
        "coordinator_s_per_round": r["coordinator_round"], "shards": p.shards,
        "bound_by": r["bound_by"],
        "shards_needed_for_0.95": needed, "shards_needed_note": note,
    }


def parse_count(text: str) -> float:
    """`10e9`, `10B`, `125M`, `2.4m` -> a number."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise ConfigError(f"plan: '{text}' is not a count like 10B, 125M or 1e9") from None


def _mbps(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ConfigError(f"plan: {flag} takes a positive number of MB/s (inf: takes no time), got '{text}'")
    return value


# ---- --bench: the throughputs from `archipelago bench codec/coordinator --json` -------------------

_CODEC_ENCODE = ("encode_ef_MBps", "encode_MBps")  # error-feedback encode first where both exist
_COORDINATOR = {"ingest_wire_MBps": "push_wire_MBps", "merge_MBps": "aggregation_MBps"}  # new name: old name
Bench = tuple[dict[str, float], list[str]]  # PlanInput throughputs read from a file, and how they were read


def _bench_number(path: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"plan: --bench {path}: {where} must be a positive number of MB/s, got {value!r}")
    return float(value)


def read_bench(path: str, codec: str, broadcast_codec: str) -> Bench:
    """PlanInput throughputs from one bench JSON file, and notes on how they were read."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"plan: --bench {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"plan: --bench {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"plan: --bench {path}: expected a JSON object")
    if "schemes" in data:  # archipelago bench codec --json
        schemes = data["schemes"]
        if not isinstance(schemes, dict):
            raise ConfigError(f"plan: --bench {path}: 'schemes' must be an object of scheme -> figures")
        values: dict[str, float] = {}
        for key, scheme, fields_ in (("encode_MBps", codec, _CODEC_ENCODE),
                                     ("decode_MBps", broadcast_codec, ("decode_MBps",))):
            entry = schemes.get(scheme)
            if not isinstance(entry, dict):
                raise ConfigError(f"plan: --bench {path} has no scheme '{scheme}' (it has: "
                                  f"{', '.join(sorted(schemes)) or 'none'})")
            field = next((f for f in fields_ if f in entry), None)
            if field is not None:
                values[key] = _bench_number(path, f"schemes.{scheme}.{field}", entry[field])
        if not values:
            raise ConfigError(f"plan: --bench {path}: schemes '{codec}'/'{broadcast_codec}' carry neither "
                              f"{' nor '.join(_CODEC_ENCODE)} nor decode_MBps")
        return values, []
    if any(k in data for k in (*_COORDINATOR, *_COORDINATOR.values())):  # archipelago bench coordinator --json
        if any(k in data for k in _COORDINATOR):
            values = {k: _bench_number(path, k, data[k]) for k in _COORDINATOR if k in data}
            return _ingest_without_merge(path, data, values)
        if "aggregation_MBps" not in data:
            raise ConfigError(f"plan: --bench {path}: push_wire_MBps without aggregation_MBps")
        # The older fields time the same interval (first push to commit) in two units: taking
        # both would count the coordinator's round twice, so the whole of it is the merge.
        return ({"merge_MBps": _bench_number(path, "aggregation_MBps", data["aggregation_MBps"])},
                [f"plan: --bench {path}: older coordinator fields; aggregation_MBps (first push to commit, "
                 "ingest included) read as --merge-MBps, push_wire_MBps (the same interval) not counted again"])
    raise ConfigError(f"plan: --bench {path} is neither `bench codec --json` (schemes) nor `bench coordinator "
                      "--json` (ingest_wire_MBps, merge_MBps, or the older push_wire_MBps, aggregation_MBps)")


def _ingest_without_merge(path: str, data: dict[str, Any], values: dict[str, float]) -> Bench:
    """A bench file without ingest_latency_s (from before pushes were acknowledged once durable,
    ahead of their round's merge) spans the merge in its ingest_wire_MBps; the model adds ingest
    and merge, so take the merge's seconds out: with W wire and X fp32-equivalent bytes a round,
    ingest = W / (W/ingest_wire_MBps − X/merge_MBps). Needs push_bytes and fp32_bytes."""
    if ("ingest_latency_s" in data or not {"ingest_wire_MBps", "merge_MBps"} <= values.keys()
            or not {"push_bytes", "fp32_bytes"} <= data.keys()):
        return values, []
    wire = _bench_number(path, "push_bytes", data["push_bytes"])
    fp32 = _bench_number(path, "fp32_bytes", data["fp32_bytes"])
    commit_s, merge_s = wire / values["ingest_wire_MBps"], fp32 / values["merge_MBps"]  # per push, in µs
    whole = values["ingest_wire_MBps"]
    values["ingest_wire_MBps"] = wire / (commit_s - merge_s) if commit_s > merge_s else math.inf
    return values, [f"plan: --bench {path}: ingest_wire_MBps {whole:.4g} spans the merge too; without the "
                    f"merge's time it is {values['ingest_wire_MBps']:.4g} (--ingest-MBps)"]


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
    p.add_argument("--encode-MBps", dest="encode_MBps", metavar="MBPS",
                   help="island encode with error feedback, MB/s of fp32 input (default: takes no time)")
    p.add_argument("--decode-MBps", dest="decode_MBps", metavar="MBPS",
                   help="island decode of the broadcast delta, MB/s of fp32 output (default: takes no time)")
    p.add_argument("--ingest-MBps", dest="ingest_wire_MBps", metavar="MBPS",
                   help="one coordinator shard's push ingest, MB/s on the wire (default: takes no time)")
    p.add_argument("--merge-MBps", dest="merge_MBps", metavar="MBPS",
                   help="one coordinator shard's merge, MB/s of fp32 pushes merged (default: takes no time)")
    p.add_argument("--shards", metavar="S", help="coordinator shards, each owning a fixed subset of fragments "
                                                 "(default 1; more than F leaves some idle)")
    p.add_argument("--bench", action="append", default=[], metavar="FILE",
                   help="read the throughputs from `archipelago bench codec --json` or `bench coordinator "
                        "--json` output (repeatable; explicit flags win)")
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


def build_input(args: argparse.Namespace, base: dict[str, Any], notes: list[str] | None = None) -> PlanInput:
    """Preset values, then --bench files, then explicit flags; `notes` collects how --bench was read."""
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
    defaults = {f.name: f.default for f in fields(PlanInput)}
    for path in args.bench:
        bench, how = read_bench(path, values.get("codec", defaults["codec"]),
                                values.get("broadcast_codec", defaults["broadcast_codec"]))
        values.update(bench)
        if notes is not None:
            notes.extend(how)
    for key, flag in THROUGHPUT_FLAGS.items():
        if getattr(args, key) is not None:
            values[key] = _mbps(getattr(args, key), flag)
    if args.shards is not None:
        try:
            values["shards"] = int(args.shards)
        except ValueError:
            raise ConfigError(f"plan: --shards takes an integer >= 1, got '{args.shards}'") from None
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


def summary_line(plan_in: PlanInput, predicted: dict[str, Any]) -> str:
    needed = predicted["shards_needed_for_0.95"]
    return (f"utilization at {plan_in.shards} shard(s): {predicted['compute_utilization']:.3f} "
            f"(bound by {predicted['bound_by']}); shards needed for >= {TARGET_UTILIZATION}: "
            + (str(needed) if needed is not None else f"none ({predicted['shards_needed_note']})"))


def law_line(predicted: dict[str, Any]) -> str:
    """The quality cost the scaling law predicts, with where it comes from."""
    gap = predicted["law_predicted_gap"]
    head = "no prediction" if gap is None else f"DiLoCo's eval loss {gap:+.2%} against data parallel's"
    return f"law_predicted_gap: {head} ({predicted['law_predicted_gap_note']})"


def main(argv: list[str]) -> int:
    if "--failures" in argv:  # goodput under failures at cluster scale (sim/failures.py)
        from sim.failures import main as failures_main

        return failures_main([a for a in argv if a != "--failures"])
    args = parser().parse_args(argv)
    if args.validate and not args.preset:
        raise ConfigError("plan: --validate needs --preset (the simulation to run)")
    cfg, base = _from_preset(args) if args.preset else (None, {})
    notes: list[str] = []
    plan_in = build_input(args, {**base, "step_time_s": 1.0} if args.validate else base, notes)  # checks first
    measured = None
    if args.validate:
        measured = validate(cfg, Path(args.report))
        base["step_time_s"] = measured["step_time_s"]
        plan_in = build_input(args, base)
    for note in notes:
        console.print(note)
    predicted = predict(plan_in)
    # the quality cost next to the bandwidth: the scaling law's gap at this N and M (sim/law.py)
    predicted.update(predicted_gap(plan_in.params, plan_in.islands).fields())
    console.print(summary_table("archipelago sim plan (predicted)",
                                {k: v for k, v in predicted.items() if not k.endswith("_note")}))
    console.print(summary_line(plan_in, predicted))
    console.print(law_line(predicted))
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
