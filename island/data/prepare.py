"""Corpus -> tokenizer + token shards on disk, cached by content hash.

A prepared dataset is a folder:
    tokenizer.json               the trained byte-level BPE (see `tokenizer.py`)
    train_000.bin, ...           raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    eval_000.bin, ...            at most `shard_tokens` ids per file
    index.json                   what is in it: counts, files, per-source hashes

Each document is tokenized and cut in two: the head goes to the train split and the tail
(`eval_fraction` of its tokens) to the eval split, and each piece is followed by
`<|endoftext|>`, so both splits cover every document and documents never run into each other
unmarked. The folder name carries a hash of the corpus bytes and of every setting that changes
its contents, so preparing again reuses it, and it is built in a temporary folder and renamed
into place, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from archipelago.runinfo import write_json
from island.data.config import DataConfig, DataError
from island.data.tokenizer import Tokenizer

FORMAT = 1
CORPUS_ROOT = Path(__file__).resolve().parent / "corpus"
SUFFIXES = (".txt", ".jsonl")
ENCODE_CHUNK = 1024  # documents per encode_batch call: bounds memory on big .jsonl files


def builtin_corpora() -> list[str]:
    """Names of the corpora shipped in `island/data/corpus/`."""
    return sorted(p.name for p in CORPUS_ROOT.iterdir() if p.is_dir())


@dataclass(frozen=True)
class Source:
    """One corpus file: `name` is its path relative to the corpus root (stable across machines)."""

    name: str
    path: Path


def resolve_corpus(corpus: str) -> tuple[str, Path, list[Source]]:
    """`data.corpus` -> (short label for folder names, root path, files in sorted order)."""
    root = CORPUS_ROOT / corpus if corpus in builtin_corpora() else Path(corpus).expanduser()
    if not root.exists():
        raise DataError(
            f"corpus {root} does not exist (give a .txt/.jsonl file, a folder of them, or a "
            f"built-in corpus: {', '.join(builtin_corpora())})"
        )
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise DataError(f"corpus file {root} must end in .txt or .jsonl")
        sources = [Source(root.name, root)]
    else:
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES]
        sources = sorted((Source(p.relative_to(root).as_posix(), p) for p in files), key=lambda s: s.name)
        if not sources:
            raise DataError(f"corpus folder {root} has no .txt or .jsonl files")
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", root.stem if root.is_file() else root.name) or "corpus"
    return label, root, sources


def read_documents(path: Path, data: bytes | None = None) -> list[str]:
    """The non-blank documents of one file: a .txt is one document, a .jsonl one per line."""
    raw = path.read_bytes() if data is None else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus file {path} is not UTF-8 text (bad byte at offset {exc.start})") from exc
    if path.suffix.lower() == ".txt":
        docs = [text]
    else:
        docs = []
        # Split on "\n" only: a JSON string may hold a raw U+2028, which splitlines() would cut.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: line is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f'{path}:{lineno}: line has no "text" field')
            if not isinstance(record["text"], str):
                raise DataError(f'{path}:{lineno}: "text" is a {type(record["text"]).__name__}, not a string')
            docs.append(record["text"])
    return [d for d in docs if d.strip()]


def _iter_texts(sources: list[Source]) -> Iterator[str]:
    for source in sources:
        yield from read_documents(source.path)


def split_point(num_tokens: int, eval_fraction: float) -> int:
    """Where a document of `num_tokens` ids is cut: ids[:cut] train, ids[cut:] eval.

    Every document of two or more tokens gives at least one token to each split.
    """
    if num_tokens < 2:
        return num_tokens
    num_eval = min(num_tokens - 1, max(1, round(num_tokens * eval_fraction)))
    return num_tokens - num_eval


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32 (halves the disk and page cache)."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class _ShardWriter:
    """Appends token ids to `{split}_000.bin`, `{split}_001.bin`, ..., `shard_tokens` per file."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self._fh is None or self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            take = arr[: self.shard_tokens - self.shards[-1]["num_tokens"]]
            self._fh.write(take.tobytes())
            self.shards[-1]["num_tokens"] += int(take.size)
            arr = arr[take.size :]

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._fh = open(self.folder / name, "wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self._fh is None:  # an empty split still gets one (empty) file, so readers need no special case
            self._open_next()
        self._fh.close()
        return self.shards


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_key(cfg: DataConfig, source_hashes: list[tuple[str, str]]) -> str:
    """Hash of everything that decides a dataset's bytes: corpus files and the settings."""
    table = {
        "format": FORMAT,
        "tokenizers": tokenizers.__version__,
        "vocab_size": cfg.vocab_size,
        "eval_fraction": cfg.eval_fraction,
        "shard_tokens": cfg.shard_tokens,
        "sources": source_hashes,
    }
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, out_dir: str | os.PathLike | None = None) -> Path:
    """Prepare the dataset of `cfg` (or reuse the one already there) and return its folder.

    The folder is `out_dir` when given, else `{cfg.cache_dir}/{corpus label}-{key}`.
    """
    label, root, sources = resolve_corpus(cfg.corpus)
    hashes = [(s.name, _sha256_file(s.path)) for s in sources]
    key = dataset_key(cfg, hashes)
    final = Path(out_dir) if out_dir is not None else Path(cfg.cache_dir) / f"{label}-{key}"
    # An empty folder (say one made for --out) counts as absent; anything else must be this dataset.
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        if read_index(final).get("key") != key:
            raise DataError(f"{final} already holds a different dataset; remove it or choose another folder")
        return final

    # Validate every file (and count) before spending time on training.
    counts = []
    for source in sources:
        docs = read_documents(source.path)
        counts.append((len(docs), sum(len(d) for d in docs)))
    if sum(n for n, _ in counts) == 0:
        raise DataError(f"corpus {root} has no text: its {len(sources)} file(s) are empty or whitespace only")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        index = _build(cfg, tmp, sources, hashes, counts)
        index.update(key=key, corpus=cfg.corpus)
        write_json(tmp / "index.json", index)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "index.json").is_file():  # not a concurrent prepare winning the race
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build(
    cfg: DataConfig,
    folder: Path,
    sources: list[Source],
    hashes: list[tuple[str, str]],
    counts: list[tuple[int, int]],
) -> dict[str, Any]:
    """Train the tokenizer, write the shards and tokenizer into `folder`; return the index."""
    tok = Tokenizer.train(_iter_texts(sources), cfg.vocab_size)
    tok.save(folder / "tokenizer.json")
    dtype = token_dtype(cfg.vocab_size)
    train = _ShardWriter(folder, "train", dtype, cfg.shard_tokens)
    held_out = _ShardWriter(folder, "eval", dtype, cfg.shard_tokens)
    source_rows = []
    for source, (name, sha), (_, chars) in zip(sources, hashes, counts, strict=True):
        docs = read_documents(source.path)
        num_tokens = 0
        for start in range(0, len(docs), ENCODE_CHUNK):
            for ids in tok.encode_batch(docs[start : start + ENCODE_CHUNK]):
                cut = split_point(len(ids), cfg.eval_fraction)
                train.write(ids[:cut] + [tok.eos_id])
                num_tokens += cut + 1
                if cut < len(ids):
                    held_out.write(ids[cut:] + [tok.eos_id])
                    num_tokens += len(ids) - cut + 1
        source_rows.append({"name": name, "sha256": sha, "chars": chars, "tokens": num_tokens})
    corpus_sha = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "corpus": cfg.corpus,
        "corpus_sha256": corpus_sha,
        "documents": sum(n for n, _ in counts),
        "chars": sum(c for _, c in counts),
        "train": train.close(),
        "eval": held_out.close(),
        "sources": source_rows,
        "tokenizer_sha256": tok.sha256,
        "config": {
            "vocab_size": cfg.vocab_size,
            "eval_fraction": cfg.eval_fraction,
            "shard_tokens": cfg.shard_tokens,
        },
    }


_INDEX_KEYS = ("format", "dtype", "vocab_size", "eos_id", "train", "eval")


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked `index.json` of a prepared dataset folder."""
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: {folder} is not a prepared dataset (delete it and prepare again)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete {folder} and prepare again") from exc
    if not isinstance(index, dict) or any(k not in index for k in _INDEX_KEYS):
        raise DataError(f"{path} is corrupt (needs keys {', '.join(_INDEX_KEYS)}); delete {folder} and prepare again")
    if index["format"] != FORMAT:
        raise DataError(f"{path} has format {index['format']}, this version reads {FORMAT}; prepare again")
    return index
