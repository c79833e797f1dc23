"""The codec's fused kernels: eager torch, or compiled by torch.compile where that is exact.

A block scheme (`protos.block_schemes`) runs its quantize, error-feedback and dequantize passes
as three `Kernel`s.  A kernel runs eagerly or as its torch.compile'd (inductor CPU) twin
(`COMPILE_ENV`), the compiled twin only once it has reproduced the eager result bit for bit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from archipelago.errors import UserError

COMPILE_ENV = "ARCHIPELAGO_CODEC_COMPILE"
"""``0``: always eager.  ``1``: the first large call of a kernel compiles the scheme's kernels, in
whichever thread (benchmarks, tests).  ``auto`` (the default): only an explicit compile does: a
training thread's large error-feedback encode (`_BlockScheme.compile_kernels`, from the main
thread: seconds once per process, cached on disk by inductor), and a coordinator's merge and
broadcast kernels on a background thread (`protos.quant.compile_in_background`: a coordinator
draws no random numbers from torch); everything else uses them once compiled. A compile must not
run on a second thread of a process whose results depend on torch's RNG (torch.compile saves and
restores process-wide state such as the RNGs, which would move another thread's random draws),
nor where a caller waits on it (a coordinator taking over, say)."""
COMPILE_MIN_NUMEL = 1 << 18  # smaller calls always run eagerly: not worth a compile
# Exactness: no FMA contraction (a*b - c rounded once), no reciprocal or reassociated math.
_INDUCTOR_OPTIONS = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}
log = logging.getLogger(__name__)


_SCRATCH = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes``, this thread's, reused (and grown) from call to call."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _SCRATCH.buf = np.empty(max(nbytes, 2 * (buf.size if buf is not None else 0)), dtype=np.uint8)
    return buf[:nbytes]


def compile_mode() -> str:
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise UserError(f"{COMPILE_ENV} must be 0, 1 or auto, got {mode!r}")
    return mode


def _same(a: object, b: object) -> bool:
    """Bit-for-bit equality of (nested tuples of) tensors: NaN payloads and -0 included."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {torch.float32: torch.int32, torch.float8_e4m3fn: torch.uint8}.get(a.dtype)
    return torch.equal(a.view(bits), b.view(bits)) if bits else torch.equal(a, b)


class Kernel:
    """A function of CPU tensors whose first dimension counts blocks (it may overwrite its first
    argument in place), run eagerly or as its torch.compile'd (inductor CPU) twin: one compile
    per kernel and process, that dimension symbolic, so that a payload of any size reuses it.

    A scheme's kernels compile together (``group``), when the first of them gets a large call
    where `COMPILE_ENV` allows a compile: that one on (a prefix of, ``sample``) its call's inputs,
    the others on inputs of their own (``synthetic``).  A compiled twin is used only once it has
    reproduced the eager kernel bit for bit, outputs and in-place writes; if compiling fails (no
    C++ compiler, an unsupported op) or the results differ, the kernel stays eager for good and
    `error` says why.  ``exact=False``: known not to compile, never tried.
    """

    def __init__(self, name: str, fn: Callable[..., Any], sample: Callable[..., tuple[torch.Tensor, ...]],
                 synthetic: Callable[[], tuple[torch.Tensor, ...]], group: list[Kernel], *,
                 exact: bool = True) -> None:
        self.name, self.fn, self.sample, self.synthetic, self.group = name, fn, sample, synthetic, group
        self.state = "eager" if exact else "never"  # → compiling → ready | failed
        self.compiled: Callable[..., Any] | None = None
        self.compile_s: float | None = None  # wall time of the compile and the check
        self.error: str | None = None
        group.append(self)

    def __call__(self, *args: torch.Tensor) -> Any:
        if self.state == "ready" and args[0].shape[0] > 1:  # one block would be a graph of its own
            return self._run_compiled(args)
        big = args[0].numel() >= COMPILE_MIN_NUMEL  # elements of the first argument (y, or the codes)
        if self.state == "eager" and big and compile_mode() == "1":
            self.compile_group(self.sample(*args))
            if self.state == "ready":
                return self._run_compiled(args)
        return self.fn(*args)

    def compile_group(self, sample: Sequence[torch.Tensor] | None = None) -> None:
        """Compile this kernel (on ``sample``, else its synthetic inputs) and the rest of its group."""
        with _COMPILE_LOCK:  # one compile at a time, whichever thread gets there first
            for k in self.group:
                if k.state == "eager":
                    k._compile([a.clone() for a in (sample if k is self and sample is not None else k.synthetic())])

    def _run_compiled(self, args: tuple[torch.Tensor, ...]) -> Any:
        """The compiled kernel; if it fails (a recompile for new sizes that inductor cannot do, say:
        before anything runs), the kernel is eager from now on."""
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return self.fn(*args)

    def _fail(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.state, self.compiled = "failed", None
        log.warning("codec kernel %s stays eager: %s", self.name, self.error)

    def _compile(self, sample: list[torch.Tensor]) -> None:
        """Compile, and check against eager on two copies of ``sample``."""
        self.state = "compiling"
        start = time.perf_counter()
        try:
            ours, theirs = sample, [a.clone() for a in sample]
            # Only the lengths are symbolic: block, qmax and bits stay constants (vectorised code).
            compiled = torch.compile(self.fn, options=_INDUCTOR_OPTIONS)
            for a in ours:
                if a.dim():  # a 0-d argument (a weight) is a value, not a size
                    torch._dynamo.mark_dynamic(a, 0)
            if not _same((compiled(*ours), *ours), (self.fn(*theirs), *theirs)):
                raise RuntimeError("compiled result differs from eager")
        except Exception as e:  # noqa: BLE001 (any failure means: stay eager)
            self._fail(e)
            return
        finally:
            self.compile_s = time.perf_counter() - start
        self.compiled, self.state = compiled, "ready"


_COMPILE_LOCK = threading.Lock()

