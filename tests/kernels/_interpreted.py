"""Runs every ``triton_check_*`` of tests/kernels under ``TRITON_INTERPRET=1`` (set by the
parent, see conftest.py) and prints {"module.function": "ok" | traceback} as one JSON line."""

from __future__ import annotations

import importlib
import json
import os
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run through the `interpreted` fixture"


def main() -> None:
    results: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        module = importlib.import_module(f"tests.kernels.{path.stem}")
        for name in dir(module):
            if name.startswith("triton_check_"):
                try:
                    getattr(module, name)()
                    results[f"{path.stem}.{name}"] = "ok"
                except Exception:
                    results[f"{path.stem}.{name}"] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
