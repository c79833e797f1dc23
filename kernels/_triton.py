"""Where Triton kernels run: CUDA tensors always (when Triton imports), CPU tensors only under
Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported), which is how
tests and ``archipelago bench kernels --interpret`` exercise the kernels without a GPU.

Kernel modules define their ``@triton.jit`` functions under ``if triton is not None:`` so that
importing them never fails on a machine without Triton; their dispatchers then run the torch twin.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux x86_64 only; elsewhere every kernel runs its torch twin
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel (rather than the torch twin) should process ``t``."""
    return triton is not None and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


# Launch options for kernels whose results must match the torch twin bit for bit: Triton fuses
# ``a * b + c`` into one FMA by default (one rounding instead of torch's two).
EXACT_FP: dict[str, bool] = {"enable_fp_fusion": False}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
