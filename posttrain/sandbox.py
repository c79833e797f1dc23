"""Run untrusted Python (a model's answer plus its unit tests) in a bounded child process.

Layers, each of which alone stops a different escape:
- a fresh interpreter (`python -I -S`) in its own session and temp working directory, with an
  environment of nothing but PATH-less essentials;
- rlimits set before exec: CPU seconds, address space, file size (which also caps output, since
  stdout and stderr go to files), open files, no core dumps, and a process count;
- when the parent runs as root, the child enters a new network namespace with no interfaces where
  the kernel allows, and drops to `nobody` (so the process-count limit binds) when `nobody` can
  run the interpreter;
- an audit hook installed before the untrusted code runs refuses process creation (fork, exec,
  spawn, subprocess, os.system), signals, sockets and ctypes, and the imports of the modules that
  reach them; audit hooks cannot be removed from Python;
- a wall-clock timeout after which the whole process group is killed (SIGKILL).

The result says what happened (`status`), and never raises for anything the code does.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
NOBODY = 65534

# Exit codes the harness uses to say how the untrusted code ended.
EXIT_OK, EXIT_ERROR, EXIT_MEMORY, EXIT_FORBIDDEN, EXIT_TESTS, EXIT_OUTPUT = 0, 11, 12, 13, 14, 15

_HARNESS_TEMPLATE = r'''
import sys
_BANNED_MODULES = {"_posixsubprocess", "subprocess", "_ctypes", "ctypes", "_socket", "socket",
                   "multiprocessing", "_multiprocessing", "pty", "_signal", "signal", "resource"}
def _guard(event, args):
    if event == "import" and args[0].split(".")[0] in _BANNED_MODULES:
        raise PermissionError("sandbox: import of " + args[0] + " is not allowed")
    if (event in ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                  "os.kill", "os.killpg", "subprocess.Popen", "ctypes.dlopen", "ctypes.cdata",
                  "os.startfile", "pty.spawn")
            or event.startswith("socket.")):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_guard)
def _run(path, code_exit, tests_exit):
    namespace = {"__name__": "__sandbox__"}
    stage = code_exit
    try:
        with open(path + "/solution.py") as fh:
            exec(compile(fh.read(), "solution.py", "exec"), namespace)
        stage = tests_exit
        with open(path + "/tests.py") as fh:
            exec(compile(fh.read(), "tests.py", "exec"), namespace)
    except MemoryError:
        sys.stderr.write("sandbox: MemoryError\n"); return {EXIT_MEMORY}
    except PermissionError as exc:
        if str(exc).startswith("sandbox:"):
            sys.stderr.write(str(exc) + "\n"); return {EXIT_FORBIDDEN}
        sys.stderr.write("PermissionError: " + str(exc) + "\n"); return stage
    except OSError as exc:
        if exc.errno == 27:  # EFBIG: the output file reached its size limit
            sys.stderr.write("sandbox: output limit\n"); return {EXIT_OUTPUT}
        sys.stderr.write("OSError: " + str(exc)[:500] + "\n"); return stage
    except RecursionError:
        sys.stderr.write("sandbox: RecursionError\n"); return stage
    except BaseException as exc:
        sys.stderr.write(type(exc).__name__ + ": " + str(exc)[:500] + "\n"); return stage
    return 0
sys.setrecursionlimit(2000)
sys.exit(_run(sys.argv[1], {EXIT_ERROR}, {EXIT_TESTS}))
'''
HARNESS = _HARNESS_TEMPLATE
for _name, _value in (("EXIT_MEMORY", EXIT_MEMORY), ("EXIT_FORBIDDEN", EXIT_FORBIDDEN),
                      ("EXIT_ERROR", EXIT_ERROR), ("EXIT_TESTS", EXIT_TESTS), ("EXIT_OUTPUT", EXIT_OUTPUT)):
    HARNESS = HARNESS.replace("{" + _name + "}", str(_value))


@dataclass
class SandboxLimits:
    cpu_s: int = 2  # CPU seconds (SIGXCPU, then SIGKILL one second later)
    wall_s: float = 5.0  # wall-clock seconds before the process group is killed
    memory_bytes: int = 512 << 20  # address space
    output_bytes: int = 64 << 10  # stdout + stderr files, each
    max_processes: int = 8  # binds when the child runs as an unprivileged user
    max_files: int = 32


@dataclass
class SandboxResult:
    """status: ok | tests_failed | error | timeout | cpu_limit | memory | forbidden | output_limit | killed."""

    status: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _limit_child(limits: SandboxLimits, workdir: str, drop_root: bool) -> None:
    """Runs in the child between fork and exec: rlimits, new netns, drop root."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_files, limits.max_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        try:  # no network at all where the kernel lets us make a namespace
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        except Exception:
            pass
    if drop_root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    os.chdir(workdir)


def run_python(code: str, tests: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute `code`, then `tests` (e.g. assert statements) in the same namespace, sandboxed."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="archipelago-sandbox-")
    start = time.perf_counter()
    try:
        Path(workdir, "solution.py").write_text(code)
        Path(workdir, "tests.py").write_text(tests)
        Path(workdir, "harness.py").write_text(HARNESS)
        out_path, err_path = Path(workdir, "stdout"), Path(workdir, "stderr")
        drop = os.geteuid() == 0 and world_executable(sys.executable)
        if drop:
            for p in (workdir, *(str(f) for f in Path(workdir).iterdir())):
                os.chown(p, NOBODY, NOBODY)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            if drop:
                os.chown(out_path, NOBODY, NOBODY)
                os.chown(err_path, NOBODY, NOBODY)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(Path(workdir, "harness.py")), workdir],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, close_fds=True,
                env={"LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                preexec_fn=lambda: _limit_child(limits, workdir, drop))  # noqa: PLW1509 (no threads touch it)
            try:
                proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
        code_ = proc.returncode
        stdout = out_path.read_text(errors="replace")[: limits.output_bytes]
        stderr = err_path.read_text(errors="replace")[: limits.output_bytes]
        return SandboxResult(_status(code_, timed_out), code_, stdout, stderr, time.perf_counter() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def world_executable(path: str) -> bool:
    """Whether an unprivileged user can run the interpreter at `path` (every directory on the way
    searchable by others, the file readable and executable by others)."""
    try:
        real = Path(os.path.realpath(path))
        for d in real.parents:
            if not os.stat(d).st_mode & 0o001:
                return False
        return os.stat(real).st_mode & 0o005 == 0o005
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _status(code: int, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if code == EXIT_OK:
        return "ok"
    return {EXIT_TESTS: "tests_failed", EXIT_ERROR: "error", EXIT_MEMORY: "memory",
            EXIT_FORBIDDEN: "forbidden", EXIT_OUTPUT: "output_limit", -signal.SIGXCPU: "cpu_limit", -signal.SIGKILL: "killed",
            -signal.SIGXFSZ: "output_limit", 1: "error"}.get(code, "error")
