"""Quantization schemes for pseudo-gradients on the wire: the registry (`SCHEMES`, `get_scheme`).

The interface and the scales-free schemes are in `protos.scheme`, the block schemes
(int8/int4/int2/fp8-block) in `protos.block_schemes` with their fused kernels in
`protos.codec_kernels`; this module adds top-k and re-exports the
names callers use.  All schemes are deterministic: ties are broken by index, rounding is
round-half-to-even.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import torch

from protos import sparse
from protos.block_schemes import (
    BlockBatch,
    Fp8Block,
    Int2Block,
    Int4Block,
    Int8Block,
    _BlockScheme,
    _IntBlock,
)
from protos.codec_kernels import COMPILE_ENV, Kernel, compile_mode
from protos.scheme import (
    _ABS_EPS,
    _REL_EPS,
    DEFAULT_BLOCK,
    Bf16,
    CodecError,
    Fp32,
    Parts,
    PartSpec,
    Scheme,
    _max_abs,
)
from protos.sparse import ChunkTopK

__all__ = ["COMPILE_ENV", "DEFAULT_BLOCK", "SCHEMES", "Bf16", "BlockBatch", "CodecError",
           "Fp8Block", "Fp32", "Int2Block", "Int4Block", "Int8Block", "Kernel", "PartSpec", "Parts", "Scheme",
           "ChunkTopK", "TopKInt8", "_BlockScheme", "_IntBlock", "compile_in_background", "compile_mode", "get_scheme",
           "kernel_states", "wait_background"]


class TopKInt8(Scheme):
    """Keep the ``k = ceil(density * numel)`` largest-|x| entries, values int8 with one scale.

    Indices are sorted and delta-coded (first delta is the first index) as uint16 when every
    delta fits, else uint32, so zstd sees small, regular integers.  Ties in |x| go to the lower
    index (stable sort), which keeps encoding deterministic.  Bound:
    ``max(max |dropped|, scale/2 + eps)``.
    """

    name = "topk+int8"

    def __init__(self, density: float = 0.01) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"topk+int8: density must be in (0, 1], got {density}")
        self.density = density

    def k(self, numel: int) -> int:
        """How many entries survive for a tensor of ``numel`` elements."""
        return min(numel, math.ceil(self.density * numel))

    def layout(self, numel: int) -> dict[str, PartSpec]:
        k = self.k(numel)
        return {
            "indices": PartSpec(("uint16", "uint32"), k),
            "values": PartSpec(("int8",), k),
            "scale": PartSpec(("float32",), 1),
        }

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [numel]`` → ascending int64 indices ``[k]`` of the k largest |x|.

        O(numel): find the k-th largest |x|, keep everything above it, then fill up with the
        lowest-index entries equal to it (torch.topk's own tie order is unspecified).
        """
        k, a = self.k(x.numel()), x.abs()
        if k == 0:
            return torch.zeros(0, dtype=torch.int64)
        kth = torch.topk(a, k, sorted=False).values.min()
        above = (a > kth).nonzero().squeeze(1)
        ties = (a == kth).nonzero().squeeze(1)[: k - above.numel()]
        return torch.sort(torch.cat([above, ties])).values

    def quantize(self, x: torch.Tensor) -> Parts:
        idx = self._select(x)
        kept = x[idx]
        scale = kept.abs().max() / 127 if kept.numel() else torch.tensor(0.0)  # fp32 scalar
        safe = scale if scale > 0 else torch.tensor(1.0)
        q = torch.round(kept / safe).clamp(-127, 127).to(torch.int8)
        deltas = np.diff(idx.numpy(), prepend=0)
        wide = deltas.size > 0 and int(deltas.max()) >= 1 << 16
        return {
            "indices": deltas.astype(np.uint32 if wide else np.uint16),
            "values": q.numpy().copy(),
            "scale": np.array([scale.item()], dtype=np.float32),
        }

    def dequantize(self, parts: Parts, numel: int) -> torch.Tensor:
        deltas = parts["indices"].astype(np.int64)
        idx = np.cumsum(deltas)
        if deltas.size and (idx[-1] >= numel or (deltas[1:] == 0).any()):
            raise CodecError(
                f"topk+int8: indices must be strictly increasing and < numel={numel}, "
                f"got last index {int(idx[-1])} and {int((deltas[1:] == 0).sum())} repeats"
            )
        out = torch.zeros(numel, dtype=torch.float32)
        scale = float(parts["scale"].astype(np.float32)[0])
        values = torch.from_numpy(parts["values"].astype(np.float32)) * torch.tensor(scale)
        out[torch.from_numpy(idx)] = values
        return out

    def error_bound(self, x: torch.Tensor) -> float:
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        keep[self._select(x)] = True
        dropped = _max_abs(x[~keep])
        kept = _max_abs(x[keep])
        return max(dropped, kept / 127 / 2 + kept * _REL_EPS + _ABS_EPS)


SCHEMES: dict[str, Scheme] = {
    s.name: s for s in (Fp32(), Bf16(), Int8Block(), Fp8Block(), Int4Block(), Int2Block(), TopKInt8())
}


_SPARSE: dict[str, ChunkTopK] = {}  # the chunked top-k schemes named so far (`protos.sparse`)


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``, or the chunked top-k scheme a
    ``sparse-{k}of{chunk}-{bits}bit`` name describes; CodecError listing the known names otherwise."""
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        pass
    if isinstance(name, str) and name in _SPARSE:
        return _SPARSE[name]
    scheme = sparse.parse(name)
    if scheme is None:
        raise CodecError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}, "
                         "sparse-{k}of{chunk}-{bits}bit") from None
    return _SPARSE.setdefault(name, scheme)


MERGE_KERNELS = ("accumulate", "quantize", "dequantize")
"""What a coordinator runs of a block scheme: the merge's accumulate, the broadcast's quantize and
the θ_b update's dequantize."""

_BACKGROUND: dict[str, threading.Thread] = {}


def compile_in_background(name: str, kinds: tuple[str, ...] = MERGE_KERNELS) -> None:
    """Compile scheme ``name``'s kernels of ``kinds`` on a daemon thread (once per scheme and
    process; nothing for a scheme without kernels, or with `COMPILE_ENV` at ``0``). For a process
    whose results do not depend on torch's RNG (see `COMPILE_ENV`): a coordinator. Until a kernel
    is ready its eager twin runs, with the same bits."""
    scheme = SCHEMES.get(name)
    if not isinstance(scheme, _BlockScheme) or compile_mode() == "0" or name in _BACKGROUND:
        return
    thread = threading.Thread(target=scheme.compile_kernels, args=(kinds,), name=f"compile-{name}", daemon=True)
    _BACKGROUND[name] = thread
    thread.start()


def wait_background(timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the background compiles to end; True when none is left running."""
    deadline = time.monotonic() + timeout_s
    for thread in list(_BACKGROUND.values()):
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in _BACKGROUND.values())


def kernel_states() -> dict[str, dict[str, object]]:
    """How each kernel made so far runs: ``state`` (eager, compiling, ready, failed, never), the
    compile's seconds and, if it failed, why."""
    return {k.name: {"state": k.state, "compile_s": k.compile_s, **({"error": k.error} if k.error else {})}
            for s in SCHEMES.values() if isinstance(s, _BlockScheme) for k in s._kernels.values()}
