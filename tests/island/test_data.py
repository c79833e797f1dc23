"""The data pipeline: tokenizer, prepare (cache, index, errors), loaders, CLI."""

from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import archipelago.cli
from archipelago.config import ConfigError, load
from island.data import (
    SPECIAL_TOKENS,
    DataConfig,
    DataError,
    Tokenizer,
    TokenLoader,
    eval_batches,
    load_dataset,
    open_dataset,
    prepare,
)
from island.data import cli as data_cli

WORDS = "the king queen lord of and to my a is that in thou thy with not be his for me this you".split()


def synthetic_text(seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(num_words)]
    for i in range(0, num_words, 17):
        words[i] = f"{rng.randint(0, 99999)}\n"
    return " ".join(words) + " café, naïve — 東京 🎭"


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    return Tokenizer.train([synthetic_text(s, 3000) for s in range(3)], vocab_size=512)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(synthetic_text(1, 4000))
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(synthetic_text(2, 3000))
    lines = [json.dumps({"text": synthetic_text(10 + i, 300), "id": i}) for i in range(5)]
    (root / "c.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    (root / "notes.md").write_text("not part of the corpus")
    return root


def small_cfg(corpus: Path, cache: Path, **kw: object) -> DataConfig:
    return DataConfig(corpus=str(corpus), vocab_size=512, cache_dir=str(cache), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return open_dataset(small_cfg(corpus_dir, tmp_path_factory.mktemp("cache")))


# --- tokenizer ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tok = small_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_round_trips_awkward_text() -> None:
    tok = small_tokenizer()
    for text in ["", " ", "\x00\r\n\t", "  leading", "é" * 50, "<|user|>hi<|end|>", "a\u2028b", "\ufeffx"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2


def test_digits_are_single_tokens() -> None:
    tok = small_tokenizer()
    ids = tok.encode("31415926")
    assert [tok.decode([i]) for i in ids] == list("31415926")
    pieces = [tok.decode([i]) for i in tok.encode("in 2024 the king")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "4"]


def test_special_tokens_have_fixed_ids() -> None:
    tok = small_tokenizer()
    assert list(SPECIAL_TOKENS) == ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert tok.special_tokens == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert [tok.token_id(name) for name in SPECIAL_TOKENS] == list(range(6))
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.encode("<|user|>") == [3]
    assert 262 < tok.vocab_size <= 512  # merges run out on a tiny corpus


def test_training_is_deterministic_and_saves(tmp_path: Path) -> None:
    texts = [synthetic_text(s, 3000) for s in range(3)]
    a, b = Tokenizer.train(texts, 512), Tokenizer.train(iter(texts), 512)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256
    loaded = Tokenizer.load(a.save(tmp_path / "tok.json"))
    assert loaded.to_json() == a.to_json()
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"vocab_size": 300}, "data.vocab_size"), ({"eval_fraction": 0.5}, "data.eval_fraction"),
     ({"shard_tokens": 0}, "data.shard_tokens")],
)
def test_config_is_validated(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kwargs)


def test_preset_loads_data_table() -> None:
    job = load(data_cli.DataJob, "tiny", ["data.vocab_size=1024"])
    assert (job.data.corpus, job.data.vocab_size) == ("shakespeare", 1024)


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_writes_index_and_reuses_cache(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_cfg(corpus_dir, tmp_path)
    folder = prepare(cfg)
    assert folder.parent == tmp_path and folder.name.startswith(corpus_dir.name + "-")
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == 1 and index["dtype"] == "uint16" and index["eos_id"] == 0
    assert [s["name"] for s in index["sources"]] == ["a.txt", "c.jsonl", "sub/b.txt"]
    assert index["documents"] == 1 + 5 + 1
    assert index["chars"] == sum(s["chars"] for s in index["sources"])
    num_train = sum(r["num_tokens"] for r in index["train"])
    num_eval = sum(r["num_tokens"] for r in index["eval"])
    assert num_train + num_eval == sum(s["tokens"] for s in index["sources"])
    assert 0.03 < num_eval / (num_train + num_eval) < 0.08
    for row in index["train"] + index["eval"]:
        assert (folder / row["file"]).stat().st_size == 2 * row["num_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp folder left

    stamp = (folder / "index.json").stat().st_mtime_ns
    assert prepare(cfg) == folder and (folder / "index.json").stat().st_mtime_ns == stamp
    assert prepare(small_cfg(corpus_dir, tmp_path, eval_fraction=0.1)) != folder

    ds = load_dataset(folder)
    text = ds.tokenizer.decode(ds.train.tolist())
    assert text.startswith(synthetic_text(1, 4000)[:200]) and "<|endoftext|>" in text


def test_prepare_into_out_dir_and_shards(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_cfg(corpus_dir / "a.txt", tmp_path / "cache", shard_tokens=1000)
    out = prepare(cfg, out_dir=tmp_path / "out")
    assert out == tmp_path / "out" and not (tmp_path / "cache").exists()
    ds = load_dataset(out)
    assert isinstance(ds.train, list) and len(ds.train) > 2
    assert all(len(s) == 1000 for s in ds.train[:-1])
    assert ds.num_train_tokens == sum(len(s) for s in ds.train)
    loader = TokenLoader(ds.train, seq_len=64, batch_size=4)
    starts = loader.window_starts()
    assert all(offset + 65 <= len(ds.train[shard]) for shard, offset in starts)  # never across shards
    assert len(starts) == sum((len(s) - 1) // 64 for s in ds.train)
    other = small_cfg(corpus_dir / "a.txt", tmp_path / "cache", shard_tokens=2000)
    with pytest.raises(DataError, match="different dataset"):
        prepare(other, out_dir=out)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "no text"),
        ("blank.txt", "  \n\t\n ", "no text"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', r"bad.jsonl:2: line is not valid JSON"),
        ("nofield.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n', r'nofield.jsonl:3: line has no "text"'),
        ("notstr.jsonl", '{"text": 5}\n', r"notstr.jsonl:1: \"text\" is a int"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("corpus.csv", "a,b", "must end in .txt or .jsonl"),
    ],
)
def test_bad_corpus_is_a_data_error(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as info:
        prepare(small_cfg(path, tmp_path / "cache"))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist"):
        prepare(small_cfg(tmp_path / "nowhere", tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hello")
    with pytest.raises(DataError, match=f"{tmp_path / 'docs'} has no .txt or .jsonl files"):
        prepare(small_cfg(tmp_path / "docs", tmp_path / "cache"))
    (tmp_path / "docs" / "a.txt").write_text("   ")
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": " "}\n')
    with pytest.raises(DataError, match=f"{tmp_path / 'docs'} has no text"):
        prepare(small_cfg(tmp_path / "docs", tmp_path / "cache"))


def test_failed_prepare_leaves_nothing(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    # `island.data.prepare` the attribute is the function; the module is in sys.modules.
    monkeypatch.setattr(sys.modules["island.data.prepare"], "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_cfg(corpus_dir / "a.txt", tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_index_is_a_data_error(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_cfg(corpus_dir / "c.jsonl", tmp_path)
    folder = prepare(cfg)
    (folder / "index.json").write_text("{truncated")
    with pytest.raises(DataError, match=f"{folder / 'index.json'} is corrupt"):
        open_dataset(cfg)
    (folder / "index.json").unlink()
    with pytest.raises(DataError, match=f"{folder / 'index.json'} is missing"):
        open_dataset(cfg)


# --- loaders -----------------------------------------------------------------------------------


def test_batches_are_shifted_windows(dataset) -> None:
    loader = TokenLoader(dataset.train, seq_len=32, batch_size=8, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(dataset.train.astype(np.int64))
    for row_x, row_y in zip(x, y, strict=True):
        start = next(o for o in range(0, len(train), 32) if torch.equal(train[o : o + 32], row_x))
        assert torch.equal(train[start + 1 : start + 33], row_y)


def test_islands_get_disjoint_windows(dataset) -> None:
    everyone = set(TokenLoader(dataset.train, seq_len=32, batch_size=4).window_starts())
    per_island = [set(TokenLoader(dataset.train, 32, 4, island_id=i, num_islands=3).window_starts())
                  for i in range(3)]
    assert not (per_island[0] & per_island[1]) and not (per_island[0] & per_island[2])
    assert not (per_island[1] & per_island[2])
    assert set().union(*per_island) == everyone
    loader = TokenLoader(dataset.train, 32, 4, island_id=1, num_islands=3)
    first_epoch = [loader.next_batch()[0] for _ in range(loader.batches_per_epoch)]
    rows = {tuple(r.tolist()) for b in first_epoch for r in b}
    assert len(rows) == loader.batches_per_epoch * 4  # an epoch repeats no window


def test_loader_resumes_exactly(dataset) -> None:
    def make() -> TokenLoader:
        return TokenLoader(dataset.train, seq_len=64, batch_size=16, island_id=1, num_islands=2, seed=7)

    straight = make()
    steps = straight.batches_per_epoch * 2 + 3  # cross two epoch boundaries
    expected = [straight.next_batch() for _ in range(steps)]
    interrupted = make()
    for _ in range(5):
        interrupted.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint file
    resumed = make()
    resumed.load_state_dict(state)
    for want_x, want_y in expected[5:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert resumed.state_dict()["epoch"] == 2
    other_seed = TokenLoader(dataset.train, 64, 16, island_id=1, num_islands=2, seed=8)
    assert not torch.equal(other_seed.next_batch()[0], expected[0][0])
    with pytest.raises(DataError, match="seed=7"):
        other_seed.load_state_dict(state)


def test_too_few_windows_is_a_data_error(dataset) -> None:
    with pytest.raises(DataError, match="batch_size 100000"):
        TokenLoader(dataset.train, seq_len=32, batch_size=100_000, island_id=2, num_islands=3)


def test_eval_batches_are_fixed(dataset) -> None:
    a = eval_batches(dataset.eval, seq_len=16, batch_size=4, num_batches=3)
    b = eval_batches(dataset.eval, seq_len=16, batch_size=4, num_batches=3)
    assert len(a) == 3 and all(x.shape == (4, 16) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    rows = [tuple(r.tolist()) for x, _ in a for r in x]
    assert len(set(rows)) == 12
    assert torch.equal(a[0][0][0], torch.from_numpy(dataset.eval[:16].astype(np.int64)))  # starts at the top
    with pytest.raises(DataError, match="eval split has"):
        eval_batches(dataset.eval, seq_len=16, batch_size=64, num_batches=1000)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_prepare(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prepare", "--corpus", str(corpus_dir / "a.txt"), "--set", "data.vocab_size=512",
            "--set", f"data.cache_dir={tmp_path}"]
    assert data_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "train tokens" in out and "chars per token" in out
    assert len(list(tmp_path.iterdir())) == 1


def test_cli_reports_bad_corpus_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = archipelago.cli.main(["data", "prepare", "--corpus", str(empty), "--set", "data.vocab_size=512",
                                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and str(empty) in err and "no text" in err


# --- the shipped corpus ------------------------------------------------------------------------


@pytest.mark.slow
def test_shakespeare(tmp_path: Path) -> None:
    ds = open_dataset(DataConfig(cache_dir=str(tmp_path)))
    index = ds.index
    assert index["documents"] == 42 and index["vocab_size"] == 4096
    assert index["chars"] > 5_000_000 and 2.5 < index["chars"] / (ds.num_train_tokens + ds.num_eval_tokens) < 4
    assert ds.num_eval_tokens > 50_000
    line = "To be, or not to be, that is the question:"
    assert ds.tokenizer.decode(ds.tokenizer.encode(line)) == line
    assert len(ds.tokenizer.encode(line)) < 20
    x, y = TokenLoader(ds.train, seq_len=128, batch_size=16, island_id=0, num_islands=4).next_batch()
    assert x.shape == (16, 128) and int(x.max()) < 4096
    assert len(eval_batches(ds.eval, 128, 16, 8)) == 8
