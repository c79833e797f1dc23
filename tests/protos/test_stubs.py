"""The committed gRPC stubs are exactly what the .proto generates."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_committed_stubs_are_fresh(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = Path(generate.HERE) / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `make protos` and commit the result")
