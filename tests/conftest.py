"""Fixtures shared by every package's tests."""

from __future__ import annotations

import pytest

# The small model most tests train, as overrides on top of whatever preset a test loads
# (`cfglib.load(cls, preset, SMALL + [...])`, or one `--set` each); a test adds only its extras (a
# later override of a key wins).
SMALL_MODEL = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=128"]
# ... with a small batch and a short warmup
SMALL = [*SMALL_MODEL, "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "optim.warmup_steps=3"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One prepared-dataset cache for the whole session, so the corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("data-cache"))
