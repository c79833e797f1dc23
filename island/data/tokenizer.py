"""A byte-level BPE tokenizer (HF `tokenizers`) with fixed special-token ids.

Why these choices:
- Byte-level with no normalizer: every unicode string encodes and decodes back exactly, so no
  text is ever lost or rewritten between the corpus and the model.
- Digits are split into one token each: numbers tokenize the same way wherever they appear,
  which later stages (arithmetic rewards in RLVR) rely on.
- The special tokens always hold ids 0..5 in `SPECIAL_TOKENS` order, whatever the corpus, so
  code can refer to `<|endoftext|>` or the chat markers without looking them up per dataset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from island.data.config import MIN_VOCAB_SIZE, DataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


class Tokenizer:
    """Text <-> token ids. Build one with `Tokenizer.train` or `Tokenizer.load`."""

    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        for i, name in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(name) != i:
                raise DataError(f"tokenizer has {name} at id {hf.token_to_id(name)}, expected {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn BPE merges from `texts`; the same texts always give the same tokenizer.

        The result may have fewer than `vocab_size` tokens when the text runs out of pairs.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 bytes, so text never seen in training still encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer saved by `save` (a HF `tokenizer.json`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for bad JSON
            raise DataError(f"tokenizer file {path} is not a valid tokenizer: {exc}") from exc
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON (the HF `tokenizer.json` format)."""
        path = Path(path)
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return self._hf.to_str()

    @property
    def sha256(self) -> str:
        """Hash of the serialized tokenizer: identifies it in indexes and checkpoints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their special ids."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel on the Rust side."""
        return [enc.ids for enc in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included, so `decode(encode(s)) == s`."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (ids are 0..vocab_size-1), special tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def pad_id(self) -> int:
        return 1

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id, in id order."""
        return {name: i for i, name in enumerate(SPECIAL_TOKENS)}

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (e.g. `"<|user|>"`); KeyError if absent."""
        tid = self._hf.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
