"""The sandbox: hostile code ends within its limits, reported as a failure, never hanging."""

from __future__ import annotations

import time

import pytest

from posttrain.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(cpu_s=2, wall_s=8.0, memory_bytes=256 << 20, output_bytes=16 << 10)


def run(code: str, tests: str = ""):
    start = time.monotonic()
    result = run_python(code, tests, LIMITS)
    assert time.monotonic() - start < LIMITS.wall_s + 5  # never past the wall clock (plus cleanup)
    assert not result.ok
    return result


def test_good_code_passes_and_wrong_code_fails():
    ok = run_python("def f(x):\n    return x * 2\n", "assert f(3) == 6", LIMITS)
    assert ok.ok and ok.status == "ok"
    assert run("def f(x):\n    return x\n", "assert f(3) == 6").status == "tests_failed"
    assert run("def f(x) return x").status == "error"
    assert run("raise SystemExit(0)", "assert False").status == "error"  # cannot exit its way past the tests


def test_an_infinite_loop_is_killed():
    assert run("while True:\n    pass\n").status in ("cpu_limit", "timeout")
    assert run("import time\ntime.sleep(60)\n").status == "timeout"


def test_a_fork_bomb_is_refused():
    r = run("import os\nwhile True:\n    os.fork()\n")
    assert r.status == "forbidden" and "fork" in r.stderr
    assert run("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n").status == "forbidden"
    assert run("import multiprocessing\n").status == "forbidden"


def test_a_memory_hog_is_stopped():
    assert run("x = bytearray(8 * 1024**3)\n").status == "memory"
    assert run("x = []\nwhile True:\n    x.append(bytearray(10**7))\n").status == "memory"


def test_output_floods_and_the_network_are_cut_off():
    assert run("while True:\n    print('x' * 1000)\n").status == "output_limit"
    assert run("import socket\nsocket.create_connection(('127.0.0.1', 1))\n").status == "forbidden"


@pytest.mark.parametrize("code", ["import os\nos.kill(os.getppid(), 9)\n", "import os\nos.system('true')\n"])
def test_the_parent_cannot_be_reached(code):
    assert run(code).status == "forbidden"
