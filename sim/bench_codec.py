"""`archipelago bench codec --json FILE`: every codec scheme on a real pseudo-gradient.

The pseudo-gradient is Δ = θ_0 − θ_H of the preset's model after H inner steps on the real corpus.
Per scheme: bits per parameter on the wire (codec header + body, with the scheme's default zstd
setting, and both with and without zstd), relative error ‖Δ − Q⁻¹(Q(Δ))‖ / ‖Δ‖, encode (with
error feedback, as an island sends; without it too) and decode throughput in MB/s of fp32 input,
and, timed in turn with them on the same tensors, a plain memcpy (`torch.Tensor.copy_`) for scale.
The codec kernels are compiled before the steady-state timings (``--compile 1``); the first calls,
compile included, are reported apart.
"""

from __future__ import annotations

import argparse
import os
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
from protos.error_feedback import ErrorFeedback
from protos.quant import COMPILE_ENV, SCHEMES, compile_mode
from protos.zstd_frames import zstd_enabled


def pseudo_gradient(job: IslandJobConfig, steps: int) -> dict[str, torch.Tensor]:
    trainer = Trainer(job, total_steps=max(steps, job.total_inner_steps))
    start = {n: t.detach().clone() for n, t in synced_tensors(trainer).items()}
    for _ in range(steps):
        trainer.train_step()
    return {n: start[n] - t.detach() for n, t in synced_tensors(trainer).items()}


def interleaved(fns: dict[str, Any], repeats: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Each fn's last result and median wall time, the fns run in turn `repeats` times: on a
    shared machine each figure then sees the same spread of load as the others."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return out, {k: statistics.median(v) for k, v in times.items()}


def measure(delta: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Every scheme on ``delta``: sizes, error, and throughput next to a memcpy of the same tensors.

    Per scheme, in this order: the first calls (which compile the scheme's kernels under
    ``ARCHIPELAGO_CODEC_COMPILE=1``; timed apart, ``first_*_s`` and ``compile_s``), then the
    steady state: a memcpy of the same tensors (``memcpy_MBps``), `ErrorFeedback.encode`
    (``encode_MBps``, what an island runs each round), plain `encode` (``encode_no_ef_MBps``)
    and `decode` (``decode_MBps``), run in turn ``repeats`` times, each figure the median: the
    ratios compare numbers taken under the same load.
    """
    numel = sum(t.numel() for t in delta.values())
    mbytes = numel * 4 / 1e6
    targets = {n: torch.empty_like(t) for n, t in delta.items()}

    def memcpy() -> None:
        for n, t in delta.items():
            targets[n].copy_(t)

    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values()))
    schemes: dict[str, Any] = {}
    for name, scheme in SCHEMES.items():
        zstd = zstd_enabled(scheme)
        start = time.perf_counter()
        ef = ErrorFeedback()
        ef.encode(delta, name)
        first_encode_s = time.perf_counter() - start
        start = time.perf_counter()
        payload = encode(delta, name)
        first_plain_s = time.perf_counter() - start
        start = time.perf_counter()
        decode(payload)
        first_decode_s = time.perf_counter() - start
        kernels = scheme.kernels()
        out, t = interleaved({"memcpy": memcpy, "ef": lambda name=name, ef=ef: ef.encode(delta, name),
                              "encode": lambda name=name: encode(delta, name),
                              "decode": lambda payload=payload: decode(payload)}, repeats)
        t_copy, t_enc, t_plain, t_dec = t["memcpy"], t["ef"], t["encode"], t["decode"]
        decoded = out["decode"]
        other = encode(delta, name, zstd=not zstd)
        err = torch.sqrt(sum(((decoded[n].double() - t.double()) ** 2).sum() for n, t in delta.items()))
        bits = payload_nbytes(payload) * 8 / numel
        memcpy_mbps = mbytes / t_copy
        schemes[name] = {
            "bits_per_param": bits,
            "zstd": zstd,
            "bits_per_param_zstd": bits if zstd else payload_nbytes(other) * 8 / numel,
            "bits_per_param_no_zstd": payload_nbytes(other) * 8 / numel if zstd else bits,
            "rel_error": float(err / norm),
            "encode_MBps": mbytes / t_enc,
            "encode_ef_MBps": mbytes / t_enc,  # the same figure, under the name sim plan looks for first
            "encode_no_ef_MBps": mbytes / t_plain,
            "decode_MBps": mbytes / t_dec,
            "memcpy_MBps": memcpy_mbps,
            "encode_vs_memcpy": (mbytes / t_enc) / memcpy_mbps,
            "decode_vs_memcpy": (mbytes / t_dec) / memcpy_mbps,
            "compression_vs_fp32": 32 / bits,
            "first_encode_s": first_encode_s,
            "first_encode_no_ef_s": first_plain_s,
            "first_decode_s": first_decode_s,
            "compile_s": sum(k.compile_s or 0.0 for k in kernels),
            "kernels": {k.name: {"state": k.state, "compile_s": k.compile_s, "error": k.error} for k in kernels},
        }
    return {"params": numel, "repeats": repeats, "schemes": schemes, "threads": torch.get_num_threads(),
            "memcpy_MBps": statistics.median(s["memcpy_MBps"] for s in schemes.values()),
            "compile_mode": compile_mode()}


def run(job: IslandJobConfig, steps: int, repeats: int) -> dict[str, Any]:
    result = measure(pseudo_gradient(job, steps), repeats)
    result["pseudo_gradient_steps"] = steps
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archipelago bench codec", description=__doc__)
    p.add_argument("--preset", default="ci")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="inner steps behind the pseudo-gradient")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--compile", choices=("0", "1", "auto"), default="1",
                   help=f"the codec kernels: eager (0), compiled first (1), or as in training ({COMPILE_ENV})")
    p.add_argument("--json", dest="json_path", required=True, help="write the results here")
    args = p.parse_args(argv)
    os.environ[COMPILE_ENV] = args.compile
    job = cfglib.load(IslandJobConfig, args.preset, args.overrides)
    result = run(job, args.steps, args.repeats)
    result.update(run_metadata(job.train.seed, job))
    write_json(Path(args.json_path), result)
    from rich.table import Table

    table = Table(title=f"codec on a real pseudo-gradient ({result['params']:,} params, memcpy "
                        f"{result['memcpy_MBps']:.0f} MB/s, {result['threads']} threads, compile={args.compile})")
    for col in ("scheme", "bits", "zstd/none", "rel err", "enc MB/s", "dec MB/s", "enc/mem", "dec/mem",
                "compile s"):
        table.add_column(col, justify="right")
    for name, s in result["schemes"].items():
        table.add_row(name, f"{s['bits_per_param']:.2f}",
                      f"{s['bits_per_param_zstd']:.2f}/{s['bits_per_param_no_zstd']:.2f}",
                      f"{s['rel_error']:.1e}", f"{s['encode_MBps']:.0f}", f"{s['decode_MBps']:.0f}",
                      f"{s['encode_vs_memcpy']:.3f}", f"{s['decode_vs_memcpy']:.3f}",
                      f"{s['compile_s']:.1f}" if s["kernels"] else "-")
    console.print(table)
    console.print(f"written to {args.json_path}")
    return 0
