"""The real-text data pipeline of an island: corpus -> tokenizer + token shards -> batches.

`prepare` reads a corpus (the shipped Shakespeare, or your .txt/.jsonl files), trains a
byte-level BPE tokenizer on it, and writes train/eval token shards into a folder named by a
hash of the corpus and settings, so every island that prepares the same corpus gets the same
bytes without talking to the others. `open_dataset` maps that folder; `TokenLoader` deals each
island a disjoint, shuffled, resumable slice of the train windows; `eval_batches` gives every
island the same held-out batches so their losses are comparable.
"""

from island.data.config import DataConfig, DataError
from island.data.loader import Dataset, TokenLoader, eval_batches, load_dataset, open_dataset
from island.data.prepare import builtin_corpora, prepare, read_index
from island.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "DataConfig",
    "DataError",
    "Dataset",
    "TokenLoader",
    "Tokenizer",
    "builtin_corpora",
    "eval_batches",
    "load_dataset",
    "open_dataset",
    "prepare",
    "read_index",
]
