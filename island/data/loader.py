"""Prepared dataset -> batches: per-island disjoint, shuffled, resumable train batches and fixed
eval batches.

The token stream is cut into windows of `seq_len + 1` tokens at stride `seq_len` (each window
gives `seq_len` next-token targets, and consecutive windows share one boundary token). Window
`w` belongs to island `w % num_islands`, so islands never train on the same tokens, and a window
never spans two shard files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from island.data.config import DataConfig, DataError
from island.data.prepare import prepare, read_index
from island.data.tokenizer import Tokenizer

# One 1-D array of token ids, or the list of a split's shards.
Tokens = np.ndarray | Sequence[np.ndarray]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Dataset:
    """A prepared dataset, opened. `train`/`eval` are read-only memmaps of the shard files: a
    single 1-D array when the split has one shard, else a list of them (one per shard)."""

    path: Path
    tokenizer: Tokenizer
    index: dict[str, Any]
    train: Tokens
    eval: Tokens

    @property
    def num_train_tokens(self) -> int:
        return sum(len(s) for s in _as_shards(self.train))

    @property
    def num_eval_tokens(self) -> int:
        return sum(len(s) for s in _as_shards(self.eval))


def open_dataset(cfg: DataConfig) -> Dataset:
    """The dataset of `cfg`, prepared first if it is not in the cache yet."""
    return load_dataset(prepare(cfg))


def load_dataset(folder: str | os.PathLike) -> Dataset:
    """Open an already prepared dataset folder (e.g. one written with `--out`)."""
    folder = Path(folder)
    index = read_index(folder)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    if index.get("tokenizer_sha256", tokenizer.sha256) != tokenizer.sha256:
        raise DataError(f"{folder / 'tokenizer.json'} does not match {folder / 'index.json'}; prepare again")
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    splits = {}
    for split in ("train", "eval"):
        shards = [_open_shard(folder / row["file"], dtype, int(row["num_tokens"])) for row in index[split]]
        splits[split] = shards[0] if len(shards) == 1 else shards
    return Dataset(folder, tokenizer, index, splits["train"], splits["eval"])


def _open_shard(path: Path, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    expected = num_tokens * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        found = path.stat().st_size if path.is_file() else "no file"
        raise DataError(f"shard {path} should hold {expected} bytes, found {found}; prepare again")
    if num_tokens == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _as_shards(tokens: Tokens) -> list[np.ndarray]:
    return [tokens] if isinstance(tokens, np.ndarray) else list(tokens)


def _window_table(shards: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, start offset) of every window, in stream order; shapes [num_windows]."""
    counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
    shard_idx = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
    offsets = np.concatenate([np.arange(c, dtype=np.int64) * seq_len for c in counts] or [np.zeros(0, np.int64)])
    return shard_idx, offsets


def _gather(shards: list[np.ndarray], shard_idx: np.ndarray, offsets: np.ndarray, seq_len: int) -> Batch:
    """Windows -> (x, y), both torch.long [len(offsets), seq_len], y[:, t] == x[:, t + 1]."""
    rows = np.stack([shards[s][o : o + seq_len + 1] for s, o in zip(shard_idx, offsets, strict=True)])
    windows = torch.from_numpy(rows.astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TokenLoader:
    """Endless shuffled train batches for one island, resumable from `state_dict()`.

    Each epoch visits the island's windows in a fresh permutation drawn from
    `(seed, island_id, epoch)`, so the order depends on nothing but those numbers and the
    position; the last `num_windows % batch_size` windows of an epoch's permutation are skipped
    so every batch is full.
    """

    def __init__(
        self,
        tokens: Tokens,
        seq_len: int,
        batch_size: int,
        island_id: int = 0,
        num_islands: int = 1,
        seed: int = 0,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= island_id < num_islands:
            raise DataError(f"island_id must be in [0, {num_islands}), got {island_id}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.island_id, self.num_islands = island_id, num_islands
        self._shards = _as_shards(tokens)
        shard_idx, offsets = _window_table(self._shards, seq_len)
        self._shard_idx = shard_idx[island_id::num_islands]
        self._offsets = offsets[island_id::num_islands]
        if self.num_windows < batch_size:
            raise DataError(
                f"island {island_id} of {num_islands} has {self.num_windows} windows of {seq_len + 1} "
                f"tokens ({sum(len(s) for s in self._shards)} tokens in the split), fewer than "
                f"batch_size {batch_size}; use a bigger corpus or smaller seq_len/batch_size"
            )
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        """Windows this island owns."""
        return len(self._offsets)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.batch_size

    def window_starts(self) -> list[tuple[int, int]]:
        """(shard, offset) of every window this island owns, in stream order."""
        return list(zip(self._shard_idx.tolist(), self._offsets.tolist(), strict=True))

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.island_id, self.epoch])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> Batch:
        """(x, y): torch.long [batch_size, seq_len], y the next token of each x."""
        if self.position + self.batch_size > self.num_windows:
            self.epoch += 1
            self.position = 0
        pick = self._permutation()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return _gather(self._shards, self._shard_idx[pick], self._offsets[pick], self.seq_len)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the loader is, plus the settings the position only makes sense with."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "island_id": self.island_id,
            "num_islands": self.num_islands,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`: the next batches are those the saved loader would have given."""
        mine = self.state_dict()
        for key in ("seed", "island_id", "num_islands", "seq_len", "batch_size", "num_windows"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"loader state has {key}={state[key]}, but this loader has {key}={mine[key]}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def eval_batches(tokens: Tokens, seq_len: int, batch_size: int, num_batches: int) -> list[Batch]:
    """`num_batches` fixed batches of evenly spaced windows over the eval split.

    The same split and numbers always give the same batches, so every island and every eval
    step measure loss on identical tokens. Each batch is (x, y), torch.long [batch_size, seq_len].
    """
    shards = _as_shards(tokens)
    shard_idx, offsets = _window_table(shards, seq_len)
    need = batch_size * num_batches
    if len(offsets) < need:
        raise DataError(
            f"eval split has {len(offsets)} windows of {seq_len + 1} tokens, fewer than the {need} "
            f"({num_batches} batches x {batch_size}) asked for; raise data.eval_fraction or ask for fewer"
        )
    pick = (np.arange(need, dtype=np.int64) * len(offsets)) // need
    return [_gather(shards, shard_idx[p], offsets[p], seq_len) for p in pick.reshape(num_batches, batch_size)]
