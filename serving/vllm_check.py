"""Greedy tokens from vLLM for exported model folders, as JSON on stdout (the last line).

Run with the serve venv's interpreter, not the project's (vLLM pins its own torch and
transformers):

    .venv-serve/bin/python serving/vllm_check.py models/a [models/b ...] [--max-tokens 8]

For each folder vLLM loads it in fp32 (eager, CPU-friendly), tokenizes the fixed prompts with the
folder's own tokenizer files and decodes greedily with end-of-text ignored, so the tokens can be
compared one for one with `island.sampling` on the same folder (tests/serving/test_vllm.py); the
log-probabilities of the prompt and of each chosen token come along, which checks the numbers
even where a barely trained model repeats one token. A folder whose MoE layers carry a nonzero
expert-selection bias is loaded with vLLM's Transformers backend, as `archipelago serve` does on
CPU: vLLM's CPU router drops that bias under softmax scoring.
This file imports nothing from the project, so it runs where only vLLM is installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

PROMPTS = (
    "First Citizen: Before we proceed any further, hear me speak.",
    "In 1599 the company paid 1234 pounds;",
    "Ünïcödé — naïve café, 東京",
    "<|user|>What is 7 * 8?<|end|><|assistant|>",
)


def has_selection_bias(folder: str) -> bool:
    from safetensors import safe_open

    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if name.endswith("e_score_correction_bias") and bool(fh.get_tensor(name).any()):
                        return True
    return False


def greedy(folder: str, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    with open(os.path.join(folder, "config.json")) as fh:
        max_len = json.load(fh)["max_position_embeddings"]
    model_impl = "transformers" if has_selection_bias(folder) else "auto"
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=max_len,
              generation_config="vllm", seed=0, model_impl=model_impl)
    # logprobs=0 / prompt_logprobs=0: the log-probability of each chosen (or given) token only.
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            skip_special_tokens=False, logprobs=0, prompt_logprobs=0)
    outputs = llm.generate(list(PROMPTS), params)
    result: dict = {"model_impl": model_impl, "prompts": list(PROMPTS), "prompt_token_ids": [], "token_ids": [], "logprobs": [],
                    "prompt_logprobs": []}
    for o in outputs:
        ids, out = list(o.prompt_token_ids), o.outputs[0]
        result["prompt_token_ids"].append(ids)
        result["token_ids"].append(list(out.token_ids))
        result["logprobs"].append([step[t].logprob
                                   for step, t in zip(out.logprobs, out.token_ids, strict=True)])
        # Entry i is log p(prompt[i] | prompt[:i]); there is none for the first token.
        result["prompt_logprobs"].append([step[t].logprob
                                          for step, t in zip(o.prompt_logprobs[1:], ids[1:], strict=True)])
    del llm
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default 4 is far more than needed
    # The engine in this process: a few seconds per model instead of minutes spawning an engine
    # process per folder, and its errors surface here rather than as "worker failed".
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = {folder: greedy(folder, args.max_tokens) for folder in args.folders}
    print(json.dumps(results))


if __name__ == "__main__":  # vLLM starts worker processes that re-import this module
    main()
