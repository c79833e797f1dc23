"""The sampler's contracts: a KV-cached, left-padded batch decodes exactly like recomputing each
prompt alone; stop strings and stop tokens stop; a tiny top-p is greedy; seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from island.model import ModelConfig, build_model
from island.sampling import GenerationError, SamplingConfig, generate

PROMPTS = [[5, 17, 3, 99, 42, 8, 61], [7], [11, 12, 13, 14]]


def letters(ids: list[int]) -> str:
    """A stand-in tokenizer: every id is one lowercase letter."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    kw = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96,
              max_seq_len=64)
    if request.param == "moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_ffn_dim=32, num_shared_experts=1)
    return build_model(ModelConfig(**kw), seed=3).eval()


def greedy_by_recomputation(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_kv_cache_batch_equals_full_recomputation_per_prompt(model):
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    for prompt, completion in zip(PROMPTS, out, strict=True):
        assert completion.token_ids == greedy_by_recomputation(model, prompt, 12)
        assert completion.finish_reason == "length"


def test_a_stop_token_ends_only_its_row_and_is_kept(model):
    full = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0))
    stop_id = full[0].token_ids[3]
    first = full[0].token_ids.index(stop_id)
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0,
                                                  stop_token_ids=(stop_id,)), decode=letters)
    assert out[0].token_ids == full[0].token_ids[:first + 1]
    assert out[0].finish_reason == "stop"
    assert out[0].text == letters(full[0].token_ids[:first])
    for row in (1, 2):  # the other rows go on exactly as before (or stop at their own stop_id)
        ids = full[row].token_ids
        cut = ids.index(stop_id) + 1 if stop_id in ids else len(ids)
        assert out[row].token_ids == ids[:cut]


def test_a_stop_string_stops_and_is_cut_from_the_text(model):
    full = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=10, temperature=0.0),
                    decode=letters)[0]
    stop = full.text[4:6]
    where = full.text.find(stop)
    out = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=10, temperature=0.0,
                                                      stop=(stop,)), decode=letters)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:where]
    assert out.token_ids == full.token_ids[:where + len(stop)]


def test_tiny_top_p_is_greedy_and_seeds_reproduce(model):
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0))
    nucleus = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6,
                                                      seed=5))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]
    a = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=7))
    b = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=7))
    c = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_generation_leaves_the_model_in_training_mode_and_moe_load_untouched(model):
    model.train()
    try:
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=3, temperature=0.0))
        assert model.training
        for moe in model.moe_layers():
            assert moe.expert_load.sum() == 0
    finally:
        model.eval()


def test_too_long_a_request_is_refused(model):
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(model, [[1] * 60], SamplingConfig(max_new_tokens=10))
