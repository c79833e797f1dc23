"""`archipelago data prepare`: prepare (or find in the cache) a corpus's tokenizer and shards.

Preparing ahead of training lets an operator check the corpus (counts, chars per token) and
fill the cache once; training would otherwise do the same on first use.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from archipelago import config
from island.data.config import DataConfig
from island.data.loader import load_dataset
from island.data.prepare import prepare


@dataclass
class DataJob:
    """The part of a preset this command reads: its `[data]` table."""

    data: DataConfig = field(default_factory=DataConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archipelago data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="train the tokenizer and write the token shards of a corpus")
    prep.add_argument("--preset", default="tiny", help="preset under configs/ (default: tiny)")
    prep.add_argument("--corpus", help="built-in corpus name, or a .txt/.jsonl file or folder (overrides data.corpus)")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. data.vocab_size=8192 (repeatable)")
    prep.add_argument("--out", help="write the dataset here instead of the cache folder")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    job = config.load(DataJob, args.preset, args.overrides)
    cfg = job.data if args.corpus is None else dataclasses.replace(job.data, corpus=args.corpus)
    started = time.perf_counter()
    folder = prepare(cfg, out_dir=args.out)
    elapsed = time.perf_counter() - started
    ds = load_dataset(folder)
    num_tokens = ds.num_train_tokens + ds.num_eval_tokens

    table = Table(title=f"dataset '{cfg.corpus}'", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("documents", f"{ds.index['documents']:,}")
    table.add_row("characters", f"{ds.index['chars']:,}")
    table.add_row("train tokens", f"{ds.num_train_tokens:,}")
    table.add_row("eval tokens", f"{ds.num_eval_tokens:,}")
    table.add_row("vocab size", f"{ds.tokenizer.vocab_size:,} (asked {cfg.vocab_size:,})")
    table.add_row("chars per token", f"{ds.index['chars'] / max(num_tokens, 1):.2f}")
    table.add_row("folder", str(folder))
    table.add_row("time", f"{elapsed:.1f}s")
    Console().print(table)
    return 0
