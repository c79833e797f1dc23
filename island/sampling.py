"""Batched sampling from our `Transformer` with its `KVCache`: the one generation engine that
post-training rollouts and `archipelago generate` share.

Prompts of different lengths are left-padded into one batch. `Transformer.forward` takes no
attention mask and gives every row the same positions, so a padded batch run through it would
attend to the padding and rotate each row by the wrong RoPE angle. `masked_forward` therefore
runs the model's own modules (norms, projections, QK-norm, `apply_rope`, MLP/MoE, head) with
per-row positions and a padding mask; the test against full recomputation through
`Transformer.forward` is what keeps the two in step. Rows that finish are dropped from the batch
(`KVCache.select`), so a long straggler does not keep the finished rows computing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from archipelago.config import ConfigError
from archipelago.errors import UserError
from island.model import KVCache, Transformer, apply_rope


class GenerationError(UserError):
    """A generation request the model cannot serve (e.g. prompt + new tokens > max_seq_len)."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling (Holtzman et al., arXiv:1904.09751); 1 disables
    stop: tuple[str, ...] = ()  # the text is cut before the first of these
    stop_token_ids: tuple[int, ...] = ()  # e.g. <|endoftext|>, <|end|>
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One prompt's continuation.

    token_ids: every sampled token, a final stop token included (RL needs the model to learn to
    emit it); text: the decoded continuation without the stop token and cut before the first stop
    string (None when no `decode` was given); finish_reason: "stop" or "length".
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration: generation must not count toward MoE balancing load."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def masked_forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                   key_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, T, vocab] (fp32) of `tokens` [B, T] at `positions` [B, T] (long).

    key_mask [B, S] (bool, S = cached length + T) marks the real tokens among all keys; padding
    is never attended to, except by padding queries themselves (so no softmax row is empty and
    no NaN reaches the cache).
    """
    cfg = model.cfg
    b, t = tokens.shape
    s = key_mask.shape[1]
    if int(positions.max()) >= cfg.max_seq_len:
        raise GenerationError(f"position {int(positions.max())} exceeds model.max_seq_len {cfg.max_seq_len}")
    cos = model.rope_cos[positions][:, None]  # [B, 1, T, D/2]: broadcast over heads
    sin = model.rope_sin[positions][:, None]
    query_abs = torch.arange(s - t, s, device=tokens.device)
    causal = torch.arange(s, device=tokens.device)[None, :] <= query_abs[:, None]  # [T, S]
    itself = torch.arange(s, device=tokens.device)[None, :] == query_abs[:, None]
    mask = ((causal[None] & key_mask[:, None, :]) | itself[None])[:, None]  # [B, 1, T, S]
    x = model.embed_tokens(tokens)
    for block in model.layers:
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(block.layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=attn.num_kv_heads != attn.num_heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    logits = model.lm_head(model.norm(x)).float()
    if cfg.logit_softcap > 0:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a (nucleus) sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token once the mass ranked above it already reaches top_p; the top token always stays.
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, P], positions [B, P], key_mask [B, P]) with every prompt right-aligned.

    Each row's real tokens sit at positions 0..L-1, as they would alone; padding gets position 0.
    """
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    offsets = torch.arange(width)[None, :] - (width - lengths)[:, None]
    return tokens.to(device), offsets.clamp(min=0).to(device), (offsets >= 0).to(device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             decode: Callable[[list[int]], str] | None = None, pad_id: int = 0) -> list[Completion]:
    """Continue every prompt (token ids) under `cfg`; one `Completion` per prompt, in order.

    `decode` turns ids into text; it is needed for stop strings and to fill `Completion.text`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt must hold at least one token")
    if cfg.stop and decode is None:
        raise ValueError("stop strings need a decode function")
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens - 1 > model.cfg.max_seq_len:
        raise GenerationError(f"prompt of {longest} tokens + {cfg.max_new_tokens} new tokens exceeds "
                              f"model.max_seq_len {model.cfg.max_seq_len}")
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in prompts]
    texts: list[str | None] = [None] * len(prompts)
    reasons = ["length"] * len(prompts)
    with _eval_mode(model):
        tokens, positions, key_mask = left_pad(prompts, pad_id, device)
        cache = KVCache(model.cfg.num_layers)
        logits = masked_forward(model, tokens, positions, key_mask, cache)[:, -1]
        rows = list(range(len(prompts)))  # original index of each row still in the batch
        next_pos = positions[:, -1] + 1
        for step in range(cfg.max_new_tokens):
            picked = pick_tokens(logits, cfg.temperature, cfg.top_p, generator)
            keep = []
            for slot, (row, token) in enumerate(zip(rows, picked.tolist(), strict=True)):
                out[row].append(token)
                done = token in cfg.stop_token_ids
                if cfg.stop and not done:
                    _, done = _cut_at_stop(decode(out[row]), cfg.stop)
                if done:
                    reasons[row] = "stop"
                else:
                    keep.append(slot)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.select(index)
                key_mask, next_pos, picked = key_mask[index], next_pos[index], picked[index]
                rows = [rows[i] for i in keep]
            key_mask = torch.cat((key_mask, key_mask.new_ones(len(rows), 1)), dim=1)
            logits = masked_forward(model, picked[:, None], next_pos[:, None], key_mask, cache)[:, -1]
            next_pos = next_pos + 1
    if decode is not None:
        for row, ids in enumerate(out):
            body = ids[:-1] if ids and ids[-1] in cfg.stop_token_ids else ids
            texts[row] = _cut_at_stop(decode(body), cfg.stop)[0]
    return [Completion(ids, text, reason) for ids, text, reason in zip(out, texts, reasons, strict=True)]
