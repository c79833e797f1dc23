"""Fixtures shared by every package's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One prepared-dataset cache for the whole session, so the corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("data-cache"))
