"""`archipelago bench codec --json FILE`: every codec scheme on a real pseudo-gradient.

The pseudo-gradient is Δ = θ_0 − θ_H of the preset's model after H inner steps on the real corpus.
Per scheme: bits per parameter on the wire (codec header + zstd body), relative error
‖Δ − Q⁻¹(Q(Δ))‖ / ‖Δ‖, encode and decode throughput in MB/s of fp32 input, and, measured in the
same run on the same tensors, a plain memcpy (`torch.Tensor.copy_`) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from archipelago import config as cfglib
from archipelago.console import console
from archipelago.runinfo import run_metadata, write_json
from island.diloco_config import synced_tensors
from island.job import IslandJobConfig
from island.train import Trainer
from protos.codec import decode, encode, payload_nbytes
from protos.quant import SCHEMES


def pseudo_gradient(job: IslandJobConfig, steps: int) -> dict[str, torch.Tensor]:
    trainer = Trainer(job, total_steps=max(steps, job.total_inner_steps))
    start = {n: t.detach().clone() for n, t in synced_tensors(trainer).items()}
    for _ in range(steps):
        trainer.train_step()
    return {n: start[n] - t.detach() for n, t in synced_tensors(trainer).items()}


def timed(fn, repeats: int) -> tuple[Any, float]:
    """Result of fn and its median wall time over `repeats` runs."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(job: IslandJobConfig, steps: int, repeats: int) -> dict[str, Any]:
    delta = pseudo_gradient(job, steps)
    numel = sum(t.numel() for t in delta.values())
    mbytes = numel * 4 / 1e6
    targets = {n: torch.empty_like(t) for n, t in delta.items()}

    def memcpy() -> None:
        for n, t in delta.items():
            targets[n].copy_(t)

    _, t_copy = timed(memcpy, repeats)
    memcpy_mbps = mbytes / t_copy
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values()))
    schemes: dict[str, Any] = {}
    for name in SCHEMES:
        payload, t_enc = timed(lambda name=name: encode(delta, name), repeats)
        decoded, t_dec = timed(lambda payload=payload: decode(payload), repeats)
        err = torch.sqrt(sum(((decoded[n].double() - t.double()) ** 2).sum() for n, t in delta.items()))
        schemes[name] = {
            "bits_per_param": payload_nbytes(payload) * 8 / numel,
            "rel_error": float(err / norm),
            "encode_MBps": mbytes / t_enc,
            "decode_MBps": mbytes / t_dec,
            "memcpy_MBps": memcpy_mbps,
            "encode_vs_memcpy": (mbytes / t_enc) / memcpy_mbps,
            "decode_vs_memcpy": (mbytes / t_dec) / memcpy_mbps,
            "compression_vs_fp32": 32 / (payload_nbytes(payload) * 8 / numel),
        }
    return {"params": numel, "pseudo_gradient_steps": steps, "repeats": repeats,
            "memcpy_MBps": memcpy_mbps, "schemes": schemes,
            "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archipelago bench codec", description=__doc__)
    p.add_argument("--preset", default="ci")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="inner steps behind the pseudo-gradient")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_path", required=True, help="write the results here")
    args = p.parse_args(argv)
    job = cfglib.load(IslandJobConfig, args.preset, args.overrides)
    result = run(job, args.steps, args.repeats)
    result.update(run_metadata(job.train.seed, job))
    write_json(Path(args.json_path), result)
    from rich.table import Table

    table = Table(title=f"codec on a real pseudo-gradient ({result['params']:,} params, "
                        f"memcpy {result['memcpy_MBps']:.0f} MB/s)")
    for col in ("scheme", "bits/param", "×fp32", "rel error", "encode MB/s", "decode MB/s",
                "enc/memcpy", "dec/memcpy"):
        table.add_column(col, justify="right")
    for name, s in result["schemes"].items():
        table.add_row(name, f"{s['bits_per_param']:.3f}", f"{s['compression_vs_fp32']:.1f}",
                      f"{s['rel_error']:.2e}", f"{s['encode_MBps']:.0f}", f"{s['decode_MBps']:.0f}",
                      f"{s['encode_vs_memcpy']:.3f}", f"{s['decode_vs_memcpy']:.3f}")
    console.print(table)
    console.print(f"written to {args.json_path}")
    return 0
