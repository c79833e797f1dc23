"""`archipelago generate`: continue a prompt with an exported model, on our own engine.

    archipelago generate --model models/x --prompt "To be" [--max-tokens 64] [--temperature 1]
                         [--top-p 1] [--seed 0]

The folder is read back into our `Transformer` (the reverse of the export's renaming) and
sampled with `island.sampling`, so what it prints is what post-training rollouts would produce;
comparing it with `archipelago serve` checks the serving path end to end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from island.sampling import SamplingConfig, generate
from serving.hf_folder import STOP_TOKENS, load_exported


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="folder written by `archipelago export`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, _ = load_exported(args.model)
    cfg = SamplingConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, stop_token_ids=tuple(tokenizer.token_id(t) for t in STOP_TOKENS))
    completion = generate(model, [tokenizer.encode(args.prompt)], cfg, decode=tokenizer.decode)[0]
    # One line, last, so scripts can take the final line of output.
    print((args.prompt + (completion.text or "")).replace("\r", "\\r").replace("\n", "\\n"))
    return 0
