"""The synchronous data-parallel baseline that `archipelago sim` compares DiLoCo against.

`run_ddp` starts one real OS process per worker; they form a gloo process group over TCP and,
every step, average their gradients with one all-reduce before AdamW steps. Worker `r` trains
on shard `r` of `N` with the same seed as DiLoCo island `r`, so both runs see the same model
init, the same data and the same tokens; only the communication pattern differs. The parent
bounds every wait and, on a timeout or any worker failure, kills every worker it started, so a
broken run never leaves processes behind to eat the (shared) cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from archipelago.checkpoint import read_checkpoint
from archipelago.config import build
from archipelago.live import publish_json
from archipelago.procs import free_port, kill_group
from archipelago.runinfo import write_json
from island.data import prepare
from island.train import Trainer, TrainJobConfig, load_model_tensors, model_tensors

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = "ddp_result.json"
PARAMS_FILE = "ddp_final.safetensors"
PROGRESS_FILE = "progress.json"  # rank 0's step and loss, for the parent's live view (sim/monitor.py)
PROGRESS_EVERY_S = 0.5
POLL_S = 0.05


class WorkerError(RuntimeError):
    """A worker failed or the run timed out; `pids` are the workers that were started (all dead
    by the time this is raised)."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


def _worker_argv(spec_path: Path, rank: int) -> list[str]:
    """The command that runs worker `rank` (a seam the tests replace to fake a crash)."""
    return [sys.executable, "-m", "sim.ddp", str(spec_path), str(rank)]


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each worker's process group (each worker leads its own session) and reap it."""
    for proc in procs:
        kill_group(proc, timeout_s=None)
        if proc.stdin:
            proc.stdin.close()


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_ddp(job: TrainJobConfig, num_workers: int, steps: int, out_dir: Path, eval_every: int,
            master_port: int | None = None, master_addr: str = "127.0.0.1",
            timeout_s: float = 1800, init: Path | None = None) -> dict[str, Any]:
    """Train `steps` synchronous data-parallel steps on `num_workers` processes; rank 0's results.

    The eval curve starts at step 0 (the shared init), then every `eval_every` steps and the
    last step. Raises `WorkerError` (a RuntimeError) on a worker failure or after `timeout_s`.

    `wall_s` is rank 0's time from a ready process group to the end of training (evals
    included), so process start-up does not count against the baseline.

    `init`, when given, is a checkpoint folder (model.safetensors) every rank starts from instead
    of the seeded init.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare(job.data)  # once here, so the workers only open the cached dataset
    port = master_port or free_port(master_addr)
    # Only the local-training tables: a subclass (an island or sim job) carries more.
    spec = {"job": {f.name: dataclasses.asdict(getattr(job, f.name))
                    for f in dataclasses.fields(TrainJobConfig)}, "world_size": num_workers, "steps": steps,
            "eval_every": eval_every, "init_method": f"tcp://{master_addr}:{port}",
            "timeout_s": timeout_s, "out_dir": str(out_dir.resolve()),
            "init": str(Path(init).resolve()) if init else None}
    spec_path = write_json(out_dir / "ddp_spec.json", spec)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    logs = [out_dir / f"ddp_worker{rank}.log" for rank in range(num_workers)]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank, log in enumerate(logs):
            with open(log, "wb") as fh:
                # stdin stays open for the worker's life: its EOF tells the worker we died.
                procs.append(subprocess.Popen(_worker_argv(spec_path, rank), stdin=subprocess.PIPE,
                                              stdout=fh, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        pids = [p.pid for p in procs]
        while True:
            codes = [p.poll() for p in procs]
            if all(code == 0 for code in codes):
                break
            failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
            if failed or time.monotonic() > deadline:
                _kill(procs)
                if not failed:
                    raise WorkerError(f"ddp run timed out after {timeout_s:g} s; all workers killed. "
                                      f"Tail of {logs[0]}:\n{_tail(logs[0])}", pids)
                raise WorkerError("; ".join(f"ddp worker {r} (pid {pids[r]}) exited with code {codes[r]}"
                                            for r in failed) + "; all workers killed."
                                  + "".join(f"\nTail of {logs[r]}:\n{_tail(logs[r])}" for r in failed), pids)
            time.sleep(POLL_S)
    finally:
        _kill(procs)
    result = json.loads((out_dir / RESULT_FILE).read_text())
    params = result["params"]
    return {"workers": num_workers, "steps": steps,
            "tokens": steps * num_workers * result["tokens_per_step"],
            "eval_curve": result["eval_curve"], "final_eval_loss": result["eval_curve"][-1]["loss"],
            "wall_s": result["wall_s"], "params": params,
            # Per step a ring all-reduce has each of the N workers send 2·(N−1)/N·P fp32 values.
            "baseline_wan_bytes": 8 * (num_workers - 1) * params * steps,
            "final_params": str(out_dir / PARAMS_FILE)}


# ---- the worker ------------------------------------------------------------------------------


def _exit_when_parent_dies() -> None:
    """Block on stdin (the parent's pipe); EOF means the parent is gone, so stop at once.

    A raw `os.read`, not `sys.stdin`: a daemon thread parked in a buffered read makes the
    interpreter abort at shutdown.
    """
    while os.read(0, 4096):
        pass
    os._exit(3)


def _checksum(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """All-reduce every gradient as one flat fp32 bucket and divide by the world size.

    A parameter without a gradient (an MoE expert no token reached on this rank) counts as a
    zero gradient, so every rank contributes a bucket of the same layout.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _worker(spec_path: str, rank: int) -> None:
    threading.Thread(target=_exit_when_parent_dies, daemon=True).start()
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)  # the job's train.num_threads, when set, wins inside Trainer
    job = build(TrainJobConfig, spec["job"])
    world, steps, eval_every = spec["world_size"], spec["steps"], spec["eval_every"]
    dist.init_process_group("gloo", init_method=spec["init_method"], rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["timeout_s"]))
    trainer = Trainer(job, island_id=rank, num_islands=world, total_steps=steps)
    if spec.get("init"):
        files, _ = read_checkpoint(spec["init"])
        load_model_tensors(trainer.model, files["model.safetensors"], spec["init"])
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    sums: list[str] = [""] * world
    dist.all_gather_object(sums, _checksum(params))
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks start from different models (checksums {sums}); same seed expected")
    tokens_per_step = trainer.tokens_per_step * world
    curve = []
    start = time.perf_counter()
    published = 0.0
    for step in range(steps + 1):
        if rank == 0 and (step % eval_every == 0 or step == steps):
            curve.append({"step": step, "tokens": step * tokens_per_step, "loss": trainer.evaluate()})
        if step == steps:
            break
        trainer.model.train()
        loss = trainer.forward_backward()
        average_gradients(params, world)
        trainer.optimizer_step()
        if rank == 0 and (time.monotonic() - published >= PROGRESS_EVERY_S or step + 1 == steps):
            published = time.monotonic()
            publish_json(Path(spec["out_dir"]) / PROGRESS_FILE, {"step": step + 1, "steps": steps, "loss": loss})
    wall = time.perf_counter() - start
    if rank == 0:
        out_dir = Path(spec["out_dir"])
        save_file({k: v.detach().cpu().contiguous() for k, v in model_tensors(trainer.model).items()},
                  str(out_dir / PARAMS_FILE))
        write_json(out_dir / RESULT_FILE, {
            "eval_curve": curve, "wall_s": wall, "tokens_per_step": trainer.tokens_per_step,
            "params": sum(p.numel() for p in params)})
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
