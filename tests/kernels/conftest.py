"""The Triton interpreter for kernel tests, run once per session in a subprocess.

``TRITON_INTERPRET=1`` must be set before Triton is first imported, so the interpreted checks
(the ``triton_check_*`` functions in this folder's test modules) run in one child process and
each test asserts on its own result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def interpreted() -> Callable[[str], None]:
    """check("test_module.triton_check_name"): fails with the child's traceback unless it passed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable here (Linux x86_64 only), so its interpreter cannot run")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._interpreted"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])

    def check(key: str) -> None:
        assert key in results, f"{key} did not run under the interpreter"
        assert results[key] == "ok", f"{key} failed under the Triton interpreter:\n{results[key]}"
    return check
