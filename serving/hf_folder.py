"""A Hugging Face model folder on disk: (sharded) safetensors, tokenizer files, and reading it
back into our own `Transformer` and `Tokenizer` (what `archipelago generate` runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from island.data.tokenizer import EOS, PAD, SPECIAL_TOKENS, Tokenizer
from island.model import Transformer, build_model
from island.train import load_model_tensors
from serving import fp8
from serving.hf_names import ExportError, HFLayout, from_hf, model_config_from_hf

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Ids that end a completion: end of document, and end of a chat turn.
STOP_TOKENS = (EOS, "<|end|>")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units as in HF's max_shard_size; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ExportError(f"--max-shard-size must look like 2GB, 500MB or 1GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """One model.safetensors, or shards plus the index HF and vLLM read when it would exceed
    `max_shard_bytes`. Returns the file names written."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())
    metadata = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS), metadata)
        return [WEIGHTS]
    shards: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / file), metadata)
        weight_map.update(dict.fromkeys(names, file))
        files.append(file)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                           "weight_map": weight_map}, indent=2))
    return [*files, INDEX]


def weight_files(folder: Path) -> list[str]:
    if (folder / INDEX).is_file():
        return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    raise ExportError(f"{folder} holds neither {WEIGHTS} nor {INDEX}")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, whether in one file or sharded."""
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        out.update(load_file(str(folder / file)))
    return out


def has_selection_bias(folder: Path) -> bool:
    """Whether any MoE layer of the folder carries a nonzero expert-selection bias.

    Reads only the bias tensors (`e_score_correction_bias`), not the weights.
    """
    for file in weight_files(Path(folder)):
        with safe_open(str(Path(folder) / file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name.endswith("e_score_correction_bias") and bool(fh.get_tensor(name).any()):
                    return True
    return False


def write_tokenizer(folder: Path, tokenizer: Tokenizer, max_len: int) -> None:
    """tokenizer.json is ours verbatim; tokenizer_config.json names the generic fast class, so
    transformers does not rebuild it as the config's model family (Qwen2's class, e.g., would
    replace our digit-splitting pre-tokenizer with its own)."""
    tokenizer.save(folder / "tokenizer.json")
    added = {str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False} for i, tok in enumerate(SPECIAL_TOKENS)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "bos_token": None, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added,
              "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS, PAD)]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = {"eos_token": EOS, "pad_token": PAD,
               "additional_special_tokens": config["additional_special_tokens"]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def generation_config(tokenizer: Tokenizer) -> dict:
    """Defaults servers read: stop at end of document or end of turn."""
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": [tokenizer.token_id(t) for t in STOP_TOKENS],
            "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 1.0, "top_p": 1.0}


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not an exported model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc


def load_exported(folder: str | Path) -> tuple[Transformer, Tokenizer, HFLayout]:
    """Our fp32 model and tokenizer from an exported folder (FP8 weights dequantized)."""
    folder = Path(folder)
    cfg, layout = model_config_from_hf(read_config(folder))
    tensors = {k: v.float() for k, v in fp8.dequantize_tensors(read_tensors(folder)).items()}
    model = build_model(cfg)
    load_model_tensors(model, from_hf(tensors, cfg, layout), str(folder))
    return model.eval(), Tokenizer.load(folder / "tokenizer.json"), layout
