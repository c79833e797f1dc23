"""`ModelConfig`: the `[model]` table, shared by the transformer (island/model.py) and its MoE
layers (island/moe.py)."""

from __future__ import annotations

from dataclasses import dataclass

from archipelago.config import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    ffn_dim: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm: bool = True
    logit_softcap: float = 0.0  # 0 disables; Gemma 2 uses 30
    z_loss: float = 0.0  # coefficient of log(Z)^2; PaLM uses 1e-4
    init_std: float = 0.02
    # Mixture of experts: num_experts = 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_ffn_dim: int = 256
    num_shared_experts: int = 0
    moe_every: int = 1  # every k-th layer is MoE (1 = all layers)
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing (arXiv:2408.15664)
    fp8: bool = False  # convert linear layers (not embeddings, router, head) to FP8 on build

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.num_heads "
                              f"({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for RoPE")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok must be in 1..{self.num_experts}, "
                              f"got {self.num_experts_per_tok}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and (layer % self.moe_every == self.moe_every - 1)
