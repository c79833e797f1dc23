"""The chat template and the batches built from it.

A conversation is `<|user|>{prompt}<|end|><|assistant|>{response}<|end|>`: the prompt ends with
the assistant marker, and the response (what the model writes, and what the loss is taken on)
ends with `<|end|>`, which is also the token that stops generation. The markers have fixed ids
(island.data.tokenizer.SPECIAL_TOKENS), so nothing here depends on the corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from island.data.tokenizer import Tokenizer

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a user turn followed by the assistant marker: where generation starts."""
    return ([tokenizer.token_id(USER)] + tokenizer.encode(prompt) +
            [tokenizer.token_id(END), tokenizer.token_id(ASSISTANT)])


def response_ids(tokenizer: Tokenizer, response: str) -> list[int]:
    return tokenizer.encode(response) + [tokenizer.token_id(END)]


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return (tokenizer.token_id(END), tokenizer.eos_id)


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   pad_id: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, T], targets [B, T], response_mask [B, T]) for teacher forcing, right-padded.

    Row i is prompt_i + response_i; `targets` is the input shifted by one, and the mask is 1
    exactly where the target is a response token. Right padding leaves every real token at the
    position it has alone, so these log-probabilities match what the sampler computed.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need one response per prompt, and at least one")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        n = len(row) - 1
        inputs[i, :n] = torch.tensor(row[:-1])
        targets[i, :n] = torch.tensor(row[1:])
        mask[i, len(p) - 1:n] = 1.0
    return inputs.to(device), targets.to(device), mask.to(device)
