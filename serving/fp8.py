"""FP8 (e4m3) weights in the compressed-tensors `float-quantized` format that vLLM reads.

The scheme is llm-compressor's FP8_DYNAMIC: weights quantized once, here with one scale per
output channel by the project's own cast (`kernels.fp8_cast`, the one FP8 training uses), and
activations quantized per token at run time by the server, so no calibration data is needed.
Only the linear layers of the blocks are quantized (attention projections, dense MLPs, experts,
shared experts); embeddings, norms, the router and the head stay in the export dtype, because
their error reaches every token's logits directly.
"""

from __future__ import annotations

import torch

from kernels.fp8_cast import fp8_cast

FP8_DTYPE = torch.float8_e4m3fn

# HF module names (see `serving.hf_names`) kept in full precision; compressed-tensors matches
# them against module names, "re:" entries as regular expressions.
IGNORE = ["lm_head", "model.embed_tokens", "re:.*mlp\\.gate$"]


def is_quantized_weight(hf_name: str) -> bool:
    """True for the `.weight` of a linear layer inside a block (never the router `mlp.gate`)."""
    return hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in] float8_e4m3fn, scale [out, 1] fp32); w ≈ q · scale."""
    return fp8_cast(weight, FP8_DTYPE, rowwise=True)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the quantized pair stands for (what compressed-tensors' dequantize gives)."""
    return q.to(torch.float32) * scale.to(torch.float32)


def quantization_config() -> dict:
    """The `quantization_config` entry of config.json for these weights."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
           "block_structure": None, "actorder": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**fp8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**fp8, "strategy": "token", "dynamic": True, "observer": None},
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def quantize_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named tensors -> the same with every block linear weight as (weight, weight_scale)."""
    out = {}
    for name, tensor in tensors.items():
        if is_quantized_weight(name):
            q, scale = quantize(tensor)
            out[name] = q
            out[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            out[name] = tensor
    return out


def dequantize_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_tensors` up to FP8 rounding: fp32 weights, no scales."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        scale = tensors.get(name.removesuffix("weight") + "weight_scale")
        out[name] = dequantize(tensor, scale) if scale is not None else tensor
    return out
