"""The model: a decoder-only, Llama-style transformer (dense, or MoE through `island.moe`).

RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QK-norm (as in OLMo 2 / Qwen3),
optional logit soft-capping (Gemma 2, arXiv:2408.00118) and z-loss (PaLM, arXiv:2204.02311).

Parameter names follow the Hugging Face Llama / Qwen3-MoE layouts minus the leading `model.`
(`layers.0.self_attn.q_proj.weight`, `layers.0.mlp.experts.3.down_proj.weight`, ...), so the
export to those layouts is a rename (see `serving/hf_names.py`). How the model is sharded lives
in `island/parallelize.py`, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from island.mlp import MLP
from island.model_config import ModelConfig
from island.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim/2] (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D/2]. Rotates halves (the Llama/HF convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]. With a cache, x holds only the new positions."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        causal = kv_cache is None or t > 1
        if kv_cache is not None and t > 1 and k.shape[2] != t:
            raise ValueError("a multi-token step with a non-empty KV cache is not supported")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.layer_is_moe(layer):
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, self.layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Per-layer key/value tensors [B, H_kv, T_so_far, D] for incremental decoding."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, scaled by 1/sqrt(2·layers) on residual outputs
        (GPT-2's scheme), ones for norms."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0) if name.endswith("norm.weight") or "layernorm" in name else p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """tokens: [B, T] (long) -> logits [B, T, vocab] (fp32)."""
        start = kv_cache.length if kv_cache is not None else 0
        t = tokens.shape[1]
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds model.max_seq_len "
                             f"{self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x, cos, sin, kv_cache)
        logits = self.lm_head(self.norm(x)).float()
        if self.cfg.logit_softcap > 0:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy (+ z-loss when configured) over targets != ignore_index."""
        logits = self(tokens)
        return lm_loss(logits, targets, self.cfg.z_loss, ignore_index)

    def moe_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
            ignore_index: int = -100) -> torch.Tensor:
    """logits [B, T, V] fp32, targets [B, T] -> scalar."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    loss = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
    if z_loss > 0:
        mask = tgt != ignore_index
        lse = torch.logsumexp(flat[mask], dim=-1)
        loss = loss + z_loss * lse.pow(2).mean()
    return loss


def build_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """The model on CPU in fp32, initialised from `seed` (every island builds the same one)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Transformer(cfg)
    else:
        model = Transformer(cfg)
    if cfg.fp8:
        from kernels.fp8 import convert_to_fp8

        convert_to_fp8(model)
    return model
