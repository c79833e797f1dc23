"""Our parameter names and config <-> a Hugging Face architecture that computes the same function.

Which architecture, and why (transformers 5.x source read side by side with `island/model.py`):

- dense, no QK-norm -> `LlamaForCausalLM`: RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head.
- dense, QK-norm -> `Qwen3ForCausalLM`: Llama plus RMSNorm(head_dim) on q and k per head, before
  RoPE, with the model's `rms_norm_eps`, exactly our `Attention`.
- MoE, QK-norm -> `Qwen3MoeForCausalLM`: softmax router, top-k on the probabilities,
  `norm_topk_prob=True` renormalises, `decoder_sparse_step` = our `moe_every`. It has neither
  a selection bias nor a shared expert, so it is exact only with no shared expert and an
  all-zero `expert_bias`.
- MoE, no QK-norm -> `Ernie4_5_MoeForCausalLM`: the one layout whose router is ours with the
  bias (softmax, top-k on probs + `e_score_correction_bias`, renormalised unbiased probs) and
  whose shared expert is an ungated SwiGLU of `moe_intermediate_size * moe_num_shared_experts`,
  exactly ours. It has no QK-norm and rotates interleaved pairs (2i, 2i+1) where we rotate
  (i, i + d/2), so q_proj/k_proj rows are permuted per head: q·k is unchanged, since both sides
  get the same permutation.

No layout has QK-norm together with a selection bias or a shared expert (Qwen3-Next and
Qwen3.5-MoE gate their shared expert with a sigmoid; the biased routers with QK-norm, e.g.
GLM-4-MoE, dots1, score with a sigmoid), so such a model is refused rather than exported
approximately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from archipelago.errors import UserError
from island.model import ModelConfig


class ExportError(UserError):
    """A model or file that cannot be exported to (or read back from) a HF layout exactly."""


@dataclass(frozen=True)
class HFLayout:
    architecture: str
    model_type: str
    interleaved_rope: bool = False  # Ernie 4.5: q/k rows permuted per head


LLAMA = HFLayout("LlamaForCausalLM", "llama")
QWEN3 = HFLayout("Qwen3ForCausalLM", "qwen3")
QWEN3_MOE = HFLayout("Qwen3MoeForCausalLM", "qwen3_moe")
ERNIE_MOE = HFLayout("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", interleaved_rope=True)
LAYOUTS = {layout.model_type: layout for layout in (LLAMA, QWEN3, QWEN3_MOE, ERNIE_MOE)}


def choose_layout(cfg: ModelConfig, expert_bias_is_zero: bool) -> HFLayout:
    """The HF layout that reproduces `cfg` exactly, or an ExportError naming what cannot be."""
    if cfg.logit_softcap > 0:
        raise ExportError(f"model.logit_softcap = {cfg.logit_softcap} has no equivalent in the Llama/Qwen3/"
                          "Ernie layouts; export a model trained with logit_softcap = 0")
    if not cfg.is_moe:
        return QWEN3 if cfg.qk_norm else LLAMA
    if not cfg.qk_norm:
        return ERNIE_MOE
    missing = [what for what, present in (("a shared expert (model.num_shared_experts > 0)",
                                           cfg.num_shared_experts > 0),
                                          ("a nonzero expert_bias", not expert_bias_is_zero)) if present]
    if missing:
        raise ExportError(f"an MoE model with QK-norm and {' and '.join(missing)} has no exact HF layout "
                          "(Qwen3-MoE lacks both, Ernie-4.5-MoE lacks QK-norm); train with "
                          "model.qk_norm = false, or without a shared expert and with "
                          "model.router_bias_update_rate = 0")
    return QWEN3_MOE


def hf_config(cfg: ModelConfig, layout: HFLayout, dtype: str, eos_id: int, pad_id: int) -> dict[str, Any]:
    """config.json for `layout`. `dtype` is the dtype the weights are stored in ("bfloat16"...)."""
    out: dict[str, Any] = {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if layout in (QWEN3, QWEN3_MOE):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if layout is LLAMA:
        out.update(mlp_bias=False)
    if layout is QWEN3_MOE:
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_ffn_dim, decoder_sparse_step=cfg.moe_every,
                   mlp_only_layers=[], norm_topk_prob=True)
    if layout is ERNIE_MOE:
        out.update(use_bias=False, moe_num_experts=cfg.num_experts, moe_k=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_ffn_dim, moe_num_shared_experts=cfg.num_shared_experts,
                   moe_layer_start_index=0, moe_layer_end_index=cfg.num_layers - 1,
                   moe_layer_interval=cfg.moe_every, moe_norm_min=0.0)
    return out


def model_config_from_hf(config: dict[str, Any]) -> tuple[ModelConfig, HFLayout]:
    """The inverse of `hf_config` (for `archipelago generate` on an exported folder)."""
    layout = LAYOUTS.get(config.get("model_type", ""))
    if layout is None:
        raise ExportError(f"model_type {config.get('model_type')!r} is not one we export "
                          f"({', '.join(LAYOUTS)})")
    kw: dict[str, Any] = dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], ffn_dim=config["intermediate_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"], max_seq_len=config["max_position_embeddings"],
        norm_eps=config["rms_norm_eps"], rope_theta=config["rope_parameters"]["rope_theta"],
        tie_embeddings=config["tie_word_embeddings"], qk_norm=layout in (QWEN3, QWEN3_MOE))
    if layout is QWEN3_MOE:
        kw.update(num_experts=config["num_experts"], num_experts_per_tok=config["num_experts_per_tok"],
                  moe_ffn_dim=config["moe_intermediate_size"], moe_every=config["decoder_sparse_step"])
    if layout is ERNIE_MOE:
        kw.update(num_experts=config["moe_num_experts"], num_experts_per_tok=config["moe_k"],
                  moe_ffn_dim=config["moe_intermediate_size"], moe_every=config["moe_layer_interval"],
                  num_shared_experts=config["moe_num_shared_experts"])
    return ModelConfig(**kw), layout


def _interleave(head_dim: int) -> torch.Tensor:
    """Row order that turns rotate-half pairs (i, i + d/2) into interleaved pairs (2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=-1).reshape(-1)


def _permute_heads(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    rows = weight.view(-1, head_dim, weight.shape[-1])
    return rows[:, order].reshape(weight.shape)


def _hf_name(name: str, layout: HFLayout) -> str:
    if name == "lm_head.weight":
        return name
    if layout is ERNIE_MOE and name.endswith(".mlp.expert_bias"):
        name = name.replace(".mlp.expert_bias", ".mlp.moe_statics.e_score_correction_bias")
    return f"model.{name}"


def to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, layout: HFLayout) -> dict[str, torch.Tensor]:
    """Our state dict (tied tensors once, as `island.train.model_tensors` gives) -> HF names.

    Qwen3-MoE has no place for `expert_bias`: `choose_layout` only picks it when the bias is zero.
    """
    order = _interleave(cfg.head_dim)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".expert_bias"):
            if layout is QWEN3_MOE:
                continue
            tensor = tensor.float().reshape(1, -1)  # Ernie keeps one bias row per expert group
        elif layout.interleaved_rope and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _permute_heads(tensor, cfg.head_dim, order)
        out[_hf_name(name, layout)] = tensor
    return out


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, layout: HFLayout) -> dict[str, torch.Tensor]:
    """HF names (dequantized) -> our names: the inverse of `to_hf`; a zero bias where HF has none."""
    inverse = torch.argsort(_interleave(cfg.head_dim))
    out = {}
    for hf_name, tensor in tensors.items():
        name = hf_name.removeprefix("model.").replace(".mlp.moe_statics.e_score_correction_bias",
                                                      ".mlp.expert_bias")
        if name.endswith(".expert_bias"):
            tensor = tensor.reshape(-1)
        elif layout.interleaved_rope and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _permute_heads(tensor, cfg.head_dim, inverse)
        out[name] = tensor
    if layout is QWEN3_MOE:
        for layer in range(cfg.num_layers):
            if cfg.layer_is_moe(layer):
                out[f"layers.{layer}.mlp.expert_bias"] = torch.zeros(cfg.num_experts)
    return out
