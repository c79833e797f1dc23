"""The `[data]` table of a preset, and the error every data-pipeline input problem raises.

The config is validated here, once, so the pipeline below can trust its numbers; a bad value
names its dotted field (`data.vocab_size ...`) the way `archipelago.config` does for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from archipelago.config import ConfigError
from archipelago.errors import UserError

# 256 byte tokens + the special tokens + room for a useful number of merges.
MIN_VOCAB_SIZE = 512
# Token ids are stored as uint16 or uint32 on disk, so the largest id must fit in uint32.
MAX_VOCAB_SIZE = 2**32 - 1


class DataError(UserError):
    """A corpus, dataset folder or loader request a user can fix; the message names the path."""


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into tokenizer, train split and eval split."""

    # A built-in corpus name (see `builtin_corpora()`), or a path to a .txt/.jsonl file or a
    # folder of them.
    corpus: str = "shakespeare"
    vocab_size: int = 4096
    # The held-out tail of every document: each document contributes to both splits, so the
    # eval loss measures the same distribution without sharing any token with training.
    eval_fraction: float = 0.05
    # Prepared datasets live under here, one folder per content hash.
    cache_dir: str = ".archipelago/data"
    # Max tokens per shard file.
    shard_tokens: int = 16_777_216

    def __post_init__(self) -> None:
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(
                f"data.vocab_size must be between {MIN_VOCAB_SIZE} (256 bytes + special tokens + "
                f"merges) and {MAX_VOCAB_SIZE}, got {self.vocab_size}"
            )
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(
                f"data.eval_fraction must be greater than 0 and less than 0.5, got {self.eval_fraction}"
            )
        if self.shard_tokens <= 0:
            raise ConfigError(f"data.shard_tokens must be positive, got {self.shard_tokens}")
        if not self.corpus:
            raise ConfigError("data.corpus must name a built-in corpus or a path, got ''")
