"""Child processes, for every package: a free port, bounded waits for a child to serve or to write a
file, and killing a child's process group by its PID.

The children these helpers handle lead their own session (`start_new_session=True`), so a child's
PID is also its process group's id, and a signal to the group reaches whatever the child started.
Every wait here is bounded and fails early, with the child's exit status, when the child died first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.1


def process_age_s() -> float | None:
    """Seconds since this process was created (Linux: /proc), or None where that is not known."""
    try:  # field 22 of stat: the start, in clock ticks since boot
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at the moment (the OS's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_accepts(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Does something accept TCP connections on host:port?"""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to process group `pid`; False when the group is already gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout_s: float | None = 10) -> int:
    """Signal `proc`'s process group (SIGKILL by default) if `proc` still runs, then reap `proc`
    (waiting at most `timeout_s`, None: no bound); its exit status."""
    if proc.poll() is None:
        signal_group(proc.pid, sig)
    return proc.wait(timeout=timeout_s)


def kill_paused_group(proc: subprocess.Popen, timeout_s: float | None = 10) -> int:
    """`kill_group` for a group that may be stopped (SIGSTOP): SIGCONT it first, so it can die."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGCONT)
    return kill_group(proc, timeout_s=timeout_s)


def _with_tail(message: str, tail: Callable[[], str] | None) -> str:
    text = tail() if tail is not None else ""
    return f"{message}:\n{text}" if text else message


def wait_serving(probe: Callable[[], T | None], proc: subprocess.Popen, name: str, timeout_s: float,
                 tail: Callable[[], str] | None = None, poll_s: float = POLL_S) -> T:
    """Call `probe` until it returns something other than None or False (the server `proc` runs
    answers: a status reply, `tcp_accepts`' True) and return that.

    Raises RuntimeError with `proc`'s exit status (and `tail()`, its log's end) when `proc` exits
    first, TimeoutError after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(_with_tail(f"{name} exited with {proc.returncode}", tail))
        answer = probe()
        if answer is not None and answer is not False:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(_with_tail(f"{name} did not serve within {timeout_s:g}s", tail))
        time.sleep(poll_s)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float, name: str = "process",
                  tail: Callable[[], str] | None = None) -> str:
    """The stripped text of `path` once `proc` has written some (e.g. a server's address file).

    Raises RuntimeError with `proc`'s exit status (and `tail()`) when `proc` exits before writing
    it, TimeoutError after `timeout_s`.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        if proc.poll() is not None:
            raise RuntimeError(_with_tail(f"{name} exited with {proc.returncode} before writing {path}", tail))
        time.sleep(POLL_S)
    raise TimeoutError(_with_tail(f"{path} did not appear within {timeout_s:g}s", tail))
