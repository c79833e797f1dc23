"""`archipelago export`: a training checkpoint -> a Hugging Face model folder for serving.

    archipelago export --checkpoint runs/x/ckpt --out models/x [--dtype bf16|fp32] [--fp8]
                       [--verify] [--gate gates.toml] [--max-shard-size 2GB]

With `--gate` the command runs the promotion gate (serving/gate.py) on the checkpoint, then the
export (serving/export.py), which knows nothing of the gate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serving import gate
from serving.export import (
    VERIFY_TOLERANCE,
    ExportOptions,
    ExportReport,
    export_model,
    load_checkpoint,
    model_layout,
)
from serving.hf_folder import parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="model folder to write (replaced if it is one)")
    p.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (default) or fp32")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 e4m3 block linear weights, per-channel scales (compressed-tensors)")
    p.add_argument("--verify", action="store_true",
                   help="load the folder with transformers (CPU, fp32) and compare logits with ours")
    p.add_argument("--gate", type=Path, help="gates.toml: thresholds the checkpoint must pass first")
    p.add_argument("--max-shard-size", default="2GB", help="split the weights above this (default 2GB)")
    return p


def export_gated(checkpoint: str | Path, out: str | Path, options: ExportOptions,
                 gates: str | Path | None = None) -> ExportReport:
    """Gate, then export: the checkpoint's metrics must pass the gates file (when given) before
    anything is written; the folder then carries promotion.json. Nothing appears under `out` on
    any failure."""
    checkpoint = Path(checkpoint)
    thresholds = gate.load_gate(gates) if gates else []
    model, job, manifest = load_checkpoint(checkpoint)
    layout = model_layout(model)
    metrics: dict[str, float] = {}
    if thresholds:
        metrics = gate.evaluate(thresholds, model, job)
        gate.check(thresholds, metrics)

    def promotion(report: ExportReport) -> dict[str, str]:
        record = gate.promotion_record(thresholds, metrics, checkpoint, manifest)
        return {"promotion.json": json.dumps({**record, "export": {
            "architecture": layout.architecture, "dtype": options.dtype, "fp8": options.fp8,
            "verify": report.verify}}, indent=2)}

    report = export_model(model, job, out, options, layout, promotion if thresholds else None)
    report.metrics = metrics
    return report


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = ExportOptions(dtype=args.dtype, fp8=args.fp8, max_shard_bytes=parse_size(args.max_shard_size),
                            verify=args.verify)
    console = Console()
    with console.status("exporting"):
        report = export_gated(args.checkpoint, args.out, options, args.gate)
    table = Table(title=f"exported {args.checkpoint}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("folder", str(report.out))
    table.add_row("architecture", report.layout.architecture)
    table.add_row("parameters", f"{report.num_params:,}")
    table.add_row("weights", f"{args.dtype}{' + FP8 block linears' if args.fp8 else ''}")
    table.add_row("files", ", ".join(report.files))
    for metric, value in report.metrics.items():
        table.add_row(f"gate: {metric}", f"{value:.4f} (passed)")
    console.print(table)
    if report.verify:
        v = report.verify
        line = (f"verify: max |Δlogit| transformers vs ours = {v['max_abs_logit_diff']:.3g} on "
                f"{v['prompts']} prompts (tolerance {VERIFY_TOLERANCE:g})")
        if "max_abs_logit_diff_vs_checkpoint" in v:
            line += f"; vs the fp32 checkpoint = {v['max_abs_logit_diff_vs_checkpoint']:.3g}"
        print(line)
    return 0
