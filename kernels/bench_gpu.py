"""The CUDA half of `archipelago bench kernels`: median times and ratios to baselines measured in
the same run. It needs a GPU: `kernels.bench` imports it only when CUDA is present.

Per kernel: median time (CUDA events, after warm-up, which includes Triton's compile), GB/s for
memory-bound kernels (the bytes they must move) or TFLOP/s for matmul-bound ones, and ratios:
``speedup_vs_eager`` (the torch twin run op by op), ``speedup_vs_compile`` (torch.compile of the
same twin), ``fraction_of_peak`` (against this device's measured copy bandwidth or bf16 matmul
rate), and for FP8 linear, torchao's ``Float8Linear`` when torchao imports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(repeats: int) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src), repeats) * 1e-3) / 1e9


def bf16_matmul_tflops(repeats: int, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (median_ms(lambda: a @ b, repeats) * 1e-3) / 1e12


def torchao_float8_linear(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """{"torchao_float8": fwd+bwd of torchao's Float8Linear (tensorwise, dynamic) on x, w}, or {}."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        return {}
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda"))
    with torch.no_grad():
        model[0].weight.copy_(w)
    convert_to_float8_training(model)
    xg = x.detach().clone().requires_grad_()
    probe = torch.randn(x.shape[0], w.shape[0], device="cuda", dtype=x.dtype)

    def run() -> None:
        xg.grad = None
        model.zero_grad(set_to_none=True)
        model(xg).backward(probe)
    return {"torchao_float8": run}


def _compiled(fn: Callable[[], Any]) -> Callable[[], Any] | str:
    """torch.compile(fn), or the reason it would not compile (recorded, not fatal)."""
    compiled = torch.compile(fn)
    try:
        compiled()
    except Exception as exc:  # a baseline that fails to compile is reported, not fatal
        return f"{type(exc).__name__}: {exc}"[:200]
    return compiled


def time_cases(cases: list[Any], repeats: int) -> dict[str, Any]:
    """cases: `kernels.bench.Case` list → {"baselines": {...}, "kernels": {name: timings}}."""
    copy_gbps, matmul_tflops = copy_bandwidth_gbps(repeats), bf16_matmul_tflops(repeats)
    out: dict[str, Any] = {"baselines": {"copy_GBps": copy_gbps, "bf16_matmul_TFLOPs": matmul_tflops},
                           "kernels": {}}
    for case in cases:
        kernel, eager = case.timed or (case.kernel, case.oracle)
        ms = median_ms(kernel, repeats)
        r: dict[str, Any] = {"ms": ms, "eager_ms": median_ms(eager, repeats)}
        r["speedup_vs_eager"] = r["eager_ms"] / ms
        compiled = _compiled(eager)
        if isinstance(compiled, str):
            r["compile_error"] = compiled
        else:
            r["compile_ms"] = median_ms(compiled, repeats)
            r["speedup_vs_compile"] = r["compile_ms"] / ms
        if case.flops:
            r["tflops"] = case.flops / (ms * 1e-3) / 1e12
            r["fraction_of_peak"] = r["tflops"] / matmul_tflops
        else:
            r["gbps"] = case.bytes / (ms * 1e-3) / 1e9
            r["fraction_of_peak"] = r["gbps"] / copy_gbps
        for name, fn in case.baselines.items():
            r[f"{name}_ms"] = median_ms(fn, repeats)
            r[f"speedup_vs_{name}"] = r[f"{name}_ms"] / ms
        out["kernels"][case.name] = r
    return out
