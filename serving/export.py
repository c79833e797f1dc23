"""Checkpoint -> Hugging Face model folder that transformers and vLLM load as-is.

The folder is built under a temporary sibling name and renamed into place only after (with
verify) transformers reproduced our logits, so a folder under the final name is always complete
and, when asked, checked. The promotion gate (serving/gate.py) is not this module's: the export
command (serving/cli.py) runs the gate first, then the export, whose `extra_files` puts the
gate's promotion.json in the folder before it is moved into place.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archipelago import config as cfglib
from archipelago.checkpoint import CheckpointError, read_checkpoint
from island.data import Tokenizer, open_dataset
from island.model import Transformer, build_model
from island.train import TrainJobConfig, load_model_tensors, model_tensors
from serving import fp8
from serving.hf_folder import generation_config, load_exported, write_tensors, write_tokenizer
from serving.hf_names import ExportError, HFLayout, choose_layout, hf_config, to_hf

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
# Same weights, fp32 compute on both sides: anything above this is a mapping bug, not rounding.
VERIFY_TOLERANCE = 1e-4
VERIFY_PROMPTS = (
    "First Citizen: Before we proceed any further, hear me speak.",
    "In 1599 the company paid 1234 pounds; 56 + 78 = 134.",
    "Ünïcödé — naïve café, 東京, emoji 🙂.",
    "<|system|>Be brief.<|end|><|user|>What is 7 * 8?<|end|><|assistant|>",
)


@dataclass
class ExportOptions:
    dtype: str = "bf16"
    fp8: bool = False
    max_shard_bytes: int = 2 * 10**9
    verify: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_shard_bytes <= 0:
            raise ExportError(f"--max-shard-size must be positive, got {self.max_shard_bytes} bytes")


@dataclass
class ExportReport:
    out: Path
    layout: HFLayout
    files: list[str]
    num_params: int
    metrics: dict[str, float] = field(default_factory=dict)
    verify: dict[str, float] = field(default_factory=dict)


def load_checkpoint(path: str | Path) -> tuple[Transformer, TrainJobConfig, dict[str, Any]]:
    """(fp32 model, job config, manifest) of a training checkpoint folder."""
    files, manifest = read_checkpoint(path)
    config = manifest.get("config")
    if "model.safetensors" not in files or not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (needs model.safetensors "
                              "and a manifest 'config' with 'model' and 'data')")
    known = {f.name for f in dataclasses.fields(TrainJobConfig)}
    job = cfglib.build(TrainJobConfig, {k: v for k, v in config.items() if k in known})
    model = build_model(job.model)
    load_model_tensors(model, files["model.safetensors"], str(path))
    return model.eval(), job, manifest


def hf_tensors(model: Transformer, layout: HFLayout, options: ExportOptions) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, in the export dtype, block linears FP8 when asked.

    The expert bias stays fp32: it decides ties between close router probabilities, and every
    HF/vLLM layout that has it keeps it in fp32.
    """
    tensors = to_hf(model_tensors(model), model.cfg, layout)
    dtype = DTYPES[options.dtype]
    out = {name: t if name.endswith("e_score_correction_bias") else t.to(dtype)
           for name, t in tensors.items()}
    if options.fp8:
        out = fp8.quantize_tensors({n: tensors[n] if fp8.is_quantized_weight(n) else t
                                    for n, t in out.items()})
    return out


def write_folder(folder: Path, model: Transformer, tokenizer: Tokenizer, layout: HFLayout,
                 options: ExportOptions) -> list[str]:
    folder.mkdir(parents=True)
    tensors = hf_tensors(model, layout, options)
    config = hf_config(model.cfg, layout, HF_DTYPE_NAMES[DTYPES[options.dtype]], tokenizer.eos_id,
                       tokenizer.pad_id)
    if options.fp8:
        config["quantization_config"] = fp8.quantization_config()
    files = write_tensors(folder, tensors, options.max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2))
    write_tokenizer(folder, tokenizer, model.cfg.max_seq_len)
    return [*files, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"]


def load_with_transformers(folder: Path) -> torch.nn.Module:
    """The folder as transformers loads it, fp32 on CPU (FP8 weights decompressed, so the
    comparison sees the same weights and no activation quantization)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if (json.loads((folder / "config.json").read_text())).get("quantization_config"):
        from transformers import CompressedTensorsConfig

        # transformers 5 spells "decompress on load" dequantize=True; 4.x spelled it run_compressed=False.
        params = inspect.signature(CompressedTensorsConfig).parameters
        kwargs["quantization_config"] = CompressedTensorsConfig(
            **({"dequantize": True} if "dequantize" in params else {"run_compressed": False}))
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def verify_folder(folder: Path, original: Transformer | None = None) -> dict[str, float]:
    """Max |logit difference| on `VERIFY_PROMPTS` between transformers on the folder and our model
    on the folder's weights (read back through our reverse mapping); also against `original`,
    which shows what the export dtype / FP8 cost."""
    ours, tokenizer, _ = load_exported(folder)
    theirs = load_with_transformers(folder)
    diff, vs_original = 0.0, 0.0
    for prompt in VERIFY_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        hf_logits = theirs(input_ids=ids).logits.float()
        diff = max(diff, float((hf_logits - ours(ids)).abs().max()))
        if original is not None:
            vs_original = max(vs_original, float((hf_logits - original(ids)).abs().max()))
    out = {"max_abs_logit_diff": diff, "prompts": len(VERIFY_PROMPTS)}
    if original is not None:
        out["max_abs_logit_diff_vs_checkpoint"] = vs_original
    return out


def _temporary_sibling(out: Path) -> Path:
    if out.exists() and not (out / "config.json").is_file() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not an exported model folder; choose a new or empty folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def model_layout(model: Transformer) -> HFLayout:
    """The HF layout `model` exports to (ExportError when none fits it)."""
    return choose_layout(model.cfg, all(bool((m.expert_bias == 0).all()) for m in model.moe_layers()))


def export_checkpoint(checkpoint: str | Path, out: str | Path, options: ExportOptions) -> ExportReport:
    """Export, verify, then move into place; nothing appears under `out` on any failure."""
    model, job, _ = load_checkpoint(checkpoint)
    return export_model(model, job, out, options, model_layout(model))


def export_model(model: Transformer, job: TrainJobConfig, out: str | Path, options: ExportOptions,
                 layout: HFLayout, extra_files: Callable[[ExportReport], dict[str, str]] | None = None,
                 ) -> ExportReport:
    """Export `model` (as `load_checkpoint` read it) in `layout`, verify, then move into place;
    nothing appears under `out` on any failure. `extra_files(report)` -> {name: text}: files
    added to the folder after verify and before the move (the gate's promotion.json)."""
    out = Path(out)
    model = model.cpu().eval()
    tokenizer = open_dataset(job.data).tokenizer
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                          f"{model.cfg.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out)
    try:
        files = write_folder(tmp, model, tokenizer, layout, options)
        verify = verify_folder(tmp, model) if options.verify else {}
        if verify and verify["max_abs_logit_diff"] > VERIFY_TOLERANCE:
            raise ExportError(f"verify failed: transformers' logits differ from ours by "
                              f"{verify['max_abs_logit_diff']:.3g} > {VERIFY_TOLERANCE:g} on the same weights")
        report = ExportReport(out, layout, files, model.num_params(), verify=verify)
        for name, text in (extra_files(report) if extra_files else {}).items():
            (tmp / name).write_text(text)
            files.append(name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report
