"""The model's contracts: causality, attention equivalences, MoE routing and balancing."""

from __future__ import annotations

import math

import pytest
import torch

from archipelago.config import ConfigError
from island.model import Attention, ModelConfig, Transformer, apply_rope, build_model, rope_tables
from island.moe import MoE, update_router_biases


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96,
                max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("cfg", [small(), small(num_experts=4, num_experts_per_tok=2,
                                                 num_shared_experts=1, moe_ffn_dim=32),
                                 small(logit_softcap=30.0, qk_norm=False, tie_embeddings=False)])
def test_changing_token_t_never_changes_logits_before_t(cfg):
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    base = model(tokens)
    for t in (0, 5, 15):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 7) % cfg.vocab_size
        out = model(changed)
        # Bit-equal for dense layers; an MoE layer groups tokens by expert, so other positions'
        # routing changes matmul batch shapes and thus float rounding, never values beyond that.
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0,
                                   msg=f"logits before position {t} changed")
        if not cfg.is_moe:
            assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:]), "the change had no effect at all"


def plain_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Textbook multi-head attention with an explicit causal mask, K/V heads repeated for GQA."""
    b, t, _ = x.shape
    h, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, h, d)
    k = attn.k_proj(x).view(b, t, hk, d)
    v = attn.v_proj(x).view(b, t, hk, d)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return attn.o_proj((probs @ v).transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_equals_plain_attention(num_kv_heads):
    cfg = small(num_kv_heads=num_kv_heads)
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(2, 12, cfg.dim)
    cos, sin = rope_tables(cfg.head_dim, 12, cfg.rope_theta)
    torch.testing.assert_close(attn(x, cos, sin), plain_attention(attn, x, cos, sin),
                               atol=1e-5, rtol=1e-5)


def test_gqa_with_equal_heads_is_plain_attention_without_any_grouping():
    cfg = small(num_kv_heads=4)
    torch.manual_seed(1)
    attn = Attention(cfg)
    assert attn.k_proj.weight.shape == attn.q_proj.weight.shape
    x = torch.randn(1, 9, cfg.dim)
    cos, sin = rope_tables(cfg.head_dim, 9, cfg.rope_theta)
    ref = torch.nn.MultiheadAttention(cfg.dim, cfg.num_heads, bias=False, batch_first=True)
    # Same projections, no RoPE and no QK-norm: the torch reference must agree.
    cfg_plain = small(num_kv_heads=4, qk_norm=False)
    attn_plain = Attention(cfg_plain)
    attn_plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "norm" not in k})
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.out_proj.weight.copy_(attn.o_proj.weight)
    ones, zeros = torch.ones(9, cfg.head_dim // 2), torch.zeros(9, cfg.head_dim // 2)
    mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn_plain(x, ones, zeros), expected, atol=1e-5, rtol=1e-5)


def moe_cfg(**kw) -> ModelConfig:
    return small(num_experts=8, num_experts_per_tok=2, moe_ffn_dim=32, **kw)


def test_moe_routing_respects_top_k():
    torch.manual_seed(0)
    moe = MoE(moe_cfg())
    x = torch.randn(50, 64)
    routing = moe.route(x)
    assert routing.experts.shape == (50, 2)
    # two distinct experts per token, weights positive and summing to one
    assert (routing.experts[:, 0] != routing.experts[:, 1]).all()
    assert (routing.weights > 0).all()
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50))
    # the chosen experts are the two most probable ones (bias is zero)
    probs = torch.softmax(moe.gate(x), dim=-1)
    top = probs.topk(2, dim=-1).indices
    assert torch.equal(routing.experts.sort(-1).values, top.sort(-1).values)
    # output equals the explicit weighted sum over exactly those experts
    out = moe.local_experts_forward(x, routing)
    expected = torch.stack([
        sum(routing.weights[i, j] * moe.experts[int(routing.experts[i, j])](x[i:i + 1])[0]
            for j in range(2)) for i in range(50)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_balancing_bias_moves_load_toward_underused_experts():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(router_bias_update_rate=0.005))
    with torch.no_grad():  # a router that prefers experts 0 and 1 for every token
        moe.gate.weight.normal_(0.0, 0.002)
        moe.gate.weight[0] += 0.02
        moe.gate.weight[1] += 0.015
    x = torch.randn(400, 64).abs()

    def loads() -> torch.Tensor:
        return torch.bincount(moe.route(x).experts.reshape(-1), minlength=8).float()

    before = loads()
    moe.train()
    for _ in range(100):
        moe(x[None])
        moe.update_bias()
    after = loads()
    assert before[:2].sum() == 2 * 400, "setup: every token starts on experts 0 and 1"
    assert moe.expert_bias[0] < 0, "the most used expert must be penalised"
    assert moe.expert_bias[2:].mean() > 0, "under-used experts must be favoured"
    assert after.std() < 0.5 * before.std(), (before, after)
    assert after[2:].sum() > before[2:].sum()


def test_bias_update_runs_from_training_model_and_keeps_it_trainable():
    cfg = moe_cfg()
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    update_router_biases(model)
    assert all(m.expert_load.sum() == 0 for m in model.moe_layers())
    assert "layers.0.mlp.expert_bias" in model.state_dict()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.0.mlp.gate.weight"] is not None, "the router must get gradients"
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n)


def test_same_seed_same_model_and_names_follow_hf_layout():
    a, b = build_model(small(), seed=3), build_model(small(), seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    names = set(a.state_dict())
    for expected in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                     "layers.0.self_attn.q_norm.weight", "layers.1.mlp.down_proj.weight",
                     "layers.1.post_attention_layernorm.weight", "norm.weight"):
        assert expected in names
    moe_names = set(build_model(moe_cfg(num_shared_experts=1), seed=0).state_dict())
    assert "layers.0.mlp.gate.weight" in moe_names
    assert "layers.0.mlp.experts.7.up_proj.weight" in moe_names
    assert "layers.0.mlp.shared_experts.gate_proj.weight" in moe_names


def test_z_loss_and_softcap_change_the_loss_as_documented():
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = build_model(small(), seed=0)
    z = build_model(small(z_loss=1e-2), seed=0)
    capped = build_model(small(logit_softcap=0.5), seed=0)
    lp = plain.loss(tokens[:, :-1], tokens[:, 1:])
    assert z.loss(tokens[:, :-1], tokens[:, 1:]) > lp
    assert capped(tokens).abs().max() <= 0.5


def test_kv_cache_decoding_matches_full_forward():
    from island.model import KVCache

    model = build_model(small(), seed=0).eval()
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = KVCache(2)
    steps = [model(tokens[:, :4], kv_cache=cache)]
    for t in range(4, 10):
        steps.append(model(tokens[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(dim=100, num_heads=6), "divisible"),
    (dict(num_heads=6, num_kv_heads=4, dim=192), "num_kv_heads"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_layers=0), "num_layers"),
])
def test_bad_model_config_names_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        small(**bad)


def test_presets_build_and_keep_head_dim_at_least_32():
    from archipelago import config as cfglib
    from island.train import TrainJobConfig

    for preset in ("tiny", "tiny-moe", "125m", "1b", "moe-1b"):
        job = cfglib.load(TrainJobConfig, preset)
        assert job.model.head_dim >= 32, preset
        with torch.device("meta"):
            model = Transformer(job.model)
        assert model.num_params() > 0
