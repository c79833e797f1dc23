"""`archipelago bench local-checkpoint`: what island-local checkpoints cost an inner step.

One island's trainer and DiLoCo client in this process (no coordinator: θ_b is the starting model
and every fragment's error-feedback residuals are filled by one encode, so a checkpoint holds what
it holds in a run). Blocks of `--block` inner steps alternate between local checkpoints off and on
(every `--every` steps), `--blocks` of each, so a drift of the machine's speed falls on both alike;
each step is timed on the training thread from its start to the end of its bookkeeping, the
checkpoint's copy included, with the writer thread running beside it as it does in a run.
Reports each side's median and mean step time, their ratio, the copy time on the training thread
and the write time on the writer thread per checkpoint, and checkpoints skipped because the last
one was still being written.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from archipelago.console import console, summary_table
from archipelago.runinfo import run_metadata, write_json
from island.diloco import DiLoCoClient
from island.job import load_job
from island.train import Trainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago bench local-checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="chaos-ci", help="the island job (default: the chaos run's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--every", type=int, default=5, help="inner steps between local checkpoints")
    p.add_argument("--block", type=int, default=20, help="inner steps in each block")
    p.add_argument("--blocks", type=int, default=4, help="blocks with checkpoints off, and as many on")
    p.add_argument("--dir", help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--json", help="write the figures here")
    return p


def bench(preset: str, overrides: list[str], every: int, block: int, blocks: int, folder: Path) -> dict[str, Any]:
    job = load_job(preset, overrides)
    cfg = replace(job.diloco, local_checkpoint_every=every, local_checkpoint_dir=str(folder / "{island_id}"),
                  ack_log="", metrics_port=0, progress_file="")
    trainer = Trainer(job, island_id=0, num_islands=1, total_steps=2 * blocks * block + 1)
    link = SimpleNamespace(island_id="island-0", events=queue.Queue())
    client = DiLoCoClient(cfg, trainer, link)
    client.theta_b = {n: t.detach().clone() for n, t in client.local.items()}
    trainer.train_step()  # warm up; then one encode per fragment fills the residuals
    for f, names in enumerate(client.fragments):
        client.feedback[f].encode({n: client.theta_b[n] - client.local[n] for n in names}, cfg.codec)
    checkpoints = client.local_checkpoints
    times: dict[str, list[float]] = {"off": [], "on": []}
    for k in range(2 * blocks):
        side = "off" if k % 2 == 0 else "on"
        client.local_checkpoints = checkpoints if side == "on" else None
        for _ in range(block):
            start = time.perf_counter()
            s = trainer.train_step()
            client.record_steps(s.loss, 1, s.tokens, time.perf_counter() - start)
            times[side].append(time.perf_counter() - start)
    checkpoints.close(60.0)
    out: dict[str, Any] = {"preset": preset, "every": every, "block": block, "blocks": blocks,
                           "params": sum(t.numel() for t in client.local.values()),
                           "checkpoint_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                           // max(1, len(list(folder.rglob("manifest.json")))),
                           "torch_threads": torch.get_num_threads()}
    for side, values in times.items():
        out[f"step_s_median_{side}"] = statistics.median(values)
        out[f"step_s_mean_{side}"] = statistics.fmean(values)
    out["step_time_ratio_median"] = out["step_s_median_on"] / out["step_s_median_off"]
    out["step_time_ratio_mean"] = out["step_s_mean_on"] / out["step_s_mean_off"]
    saved = max(1, checkpoints.saved)
    out.update(checkpoints_saved=checkpoints.saved, checkpoints_skipped=checkpoints.skipped,
               copy_s_per_checkpoint=checkpoints.copy_s / saved, write_s_per_checkpoint=checkpoints.write_s / saved)
    return out


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="local-checkpoint-bench-") as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp)
        out = bench(args.preset, args.overrides, args.every, args.block, args.blocks, folder)
    console.print(summary_table("bench local-checkpoint", out))
    if args.json:
        write_json(args.json, {**out, **run_metadata(0, vars(args))})
    return 0
