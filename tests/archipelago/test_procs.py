"""archipelago/procs.py on real child processes, each in its own session; every wait is bounded and
every child is killed by its PID when its test ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from archipelago import procs


@pytest.fixture
def spawn() -> Iterator:
    started: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        procs.kill_paused_group(proc)


def test_free_port_is_free_and_a_server_on_it_is_seen_serving(spawn):
    port = procs.free_port()
    assert not procs.tcp_accepts("127.0.0.1", port)
    server = spawn(f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
                   "time.sleep(60)")
    assert procs.wait_serving(lambda: procs.tcp_accepts("127.0.0.1", port), server, "server", 20) is True
    with pytest.raises(TimeoutError, match="never did not serve within 0.3s"):
        procs.wait_serving(lambda: None, server, "never", 0.3)


def test_waits_fail_early_with_the_exit_status_when_the_child_dies(spawn, tmp_path):
    dead = spawn("import sys; sys.exit(5)")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="server exited with 5:\nthe log's end"):
        procs.wait_serving(lambda: None, dead, "server", 20, tail=lambda: "the log's end")
    with pytest.raises(RuntimeError, match="process exited with 5 before writing"):
        procs.wait_for_file(tmp_path / "address", dead, 20)
    assert time.monotonic() - start < 10


def test_wait_for_file_returns_what_the_child_wrote_and_is_bounded(spawn, tmp_path):
    path = tmp_path / "address"
    writer = spawn(f"import time, pathlib; time.sleep(0.3); pathlib.Path({str(path)!r}).write_text('host:1\\n'); "
                   "time.sleep(60)")
    assert procs.wait_for_file(path, writer, 20) == "host:1"
    with pytest.raises(TimeoutError, match="did not appear within 0.3s"):
        procs.wait_for_file(tmp_path / "never", writer, 0.3)


def test_kill_group_kills_the_whole_group_and_tolerates_the_dead():
    # the child starts a grandchild in its group and prints its pid
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print(c.pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        assert procs.kill_group(parent) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)
        assert procs.kill_group(parent) == -signal.SIGKILL  # already dead and reaped: no error
    finally:
        procs.kill_group(parent)
        parent.stdout.close()


def test_a_paused_group_is_resumed_and_killed(spawn):
    proc = spawn("import time; time.sleep(60)")
    assert procs.signal_group(proc.pid, signal.SIGSTOP)
    assert procs.kill_paused_group(proc) == -signal.SIGKILL


def test_signalling_a_group_that_is_gone_says_so(spawn):
    proc = spawn("pass")
    assert proc.wait(timeout=20) == 0
    assert not procs.signal_group(proc.pid, signal.SIGCONT)


def _alive(pid: int) -> bool:
    """Is `pid` running (a zombie, reaped by init in its own time, counts as dead)?"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_process_knows_how_long_ago_it_was_created():
    code = "import time; time.sleep(0.5); from archipelago.procs import process_age_s; print(process_age_s())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert 0.5 <= float(out.stdout) < 10.0
