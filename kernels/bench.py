"""`archipelago bench kernels [--json FILE] [--seed N]`: every kernel against its reference.

For each kernel, on fresh random inputs of awkward sizes (never a multiple of a block or tile):
the dispatched kernel's outputs (and gradients, for the differentiable ones) against an oracle,
as ``max_rel_error = max |kernel − oracle| / max |oracle|`` over every output, and a stated
tolerance. The oracle is the most independent one the layering allows: `protos.quant` for the
quantizers, ``F.cross_entropy`` on full logits for the chunked loss, an fp32 ``F.linear`` for FP8,
the torch twin otherwise.

On CPU the dispatcher runs the torch twins (the Triton kernels under ``TRITON_INTERPRET=1``), so
the report is correctness only and says so. With CUDA, `kernels.bench_gpu` adds timings and
ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from archipelago.console import console
from archipelago.runinfo import run_metadata, write_json
from kernels import cross_entropy, fp8, fp8_cast, moe_permute, outer_step, quantize, rmsnorm, swiglu
from kernels._triton import INTERPRET, triton
from protos.quant import SCHEMES as WIRE  # the codec's own quantizers: the kernels' contract


@dataclass
class Case:
    """kernel, oracle: fresh outputs per call (a tensor or a tuple), compared for correctness.
    timed: (kernel, torch eager) as CUDA times them, when that differs from (kernel, oracle);
    bytes or flops: the work, for GB/s or TFLOP/s; baselines: more named callables to time."""

    name: str
    kernel: Callable[[], Any]
    oracle: Callable[[], Any]
    tolerance: float
    timed: tuple[Callable[[], Any], Callable[[], Any]] | None = None
    bytes: int = 0
    flops: int = 0
    extra: Callable[[], dict[str, Any]] = field(default=lambda: {})
    baselines: dict[str, Callable[[], Any]] = field(default_factory=dict)
    fp8: bool = False  # casts to fp8 inside: not judged under the interpreter (see check)


def _grads(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], tuple]:
    """A callable returning (fn(*inputs), d sum(out · r)/d inputs) for a fixed random r."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    probe: list[torch.Tensor] = []

    def run() -> tuple:
        for x in xs:
            x.grad = None
        out = fn(*xs)
        if not probe:
            probe.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out))
        out.backward(probe[0])
        return (out.detach(), *[x.grad for x in xs])
    return run


def build_cases(device: torch.device, seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    big = device.type == "cuda"
    lowp = torch.bfloat16 if big else torch.float32  # bf16 is what CUDA training runs
    low_tol = 2.0**-6 if big else 1e-5

    def randn(*shape: int, dtype: torch.dtype = torch.float32, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    cases: list[Case] = []
    n = 25_000_013 if big else 300_007
    d, e = randn(n, std=1e-3), randn(n, std=1e-5)
    for name, spec in quantize.SCHEMES.items():
        def kernel(name: str = name) -> tuple:
            q, r = quantize.quantize_with_feedback(d, e, name)
            return quantize.dequantize(q, name), r, q.scales

        def oracle(name: str = name) -> tuple:
            y = (d + e).cpu()
            parts = WIRE[name].quantize(y)
            y_hat = WIRE[name].dequantize(parts, n)
            return y_hat, y - y_hat, torch.from_numpy(parts["scales"])

        def bit_exact(name: str = name) -> dict[str, Any]:
            q, _ = quantize.quantize_with_feedback(d, e, name)
            parts = WIRE[name].quantize((d + e).cpu())
            ours = quantize.to_parts(q)
            return {"bit_exact": all((ours[k] == parts[k]).all() for k in ("scales", "values"))}

        timed = (lambda name=name: quantize.quantize_with_feedback(d, e, name),
                 lambda name=name: quantize.quantize_ef_reference(d, e, name))
        cases.append(Case(f"quantize_ef/{name}", kernel, oracle, 0.0, timed, fp8=spec.fp8,
                          bytes=12 * n + spec.num_code_bytes(n) + 4 * (n // 128), extra=bit_exact))

    k, n = 4, (25_000_013 if big else 300_007)
    theta, mom, deltas = randn(n), randn(n, std=1e-2), randn(k, n, std=1e-3)
    weights = [1.0, 0.5, 2.0, 0.25]

    def step(fn: Callable[..., None]) -> Callable[[], tuple]:
        def run() -> tuple:
            t, m = theta.clone(), mom.clone()
            fn(t, m, deltas, weights, 0.7, 0.9, True)
            return t, m
        return run

    timed = (lambda: outer_step.fused_outer_step(theta, mom, deltas, weights, 0.7, 0.9, True),
             lambda: outer_step.outer_step_reference(theta, mom, deltas, weights, 0.7, 0.9, True))
    cases.append(Case("outer_step/nesterov", step(outer_step.fused_outer_step),
                      step(outer_step.outer_step_reference), 1e-6, timed, bytes=(k + 4) * 4 * n))

    x = randn(4099 if big else 1003, 8191 if big else 517, dtype=lowp)
    for dt, rowwise in ((fp8.E4M3, False), (fp8.E4M3, True), (fp8.E5M2, False)):
        def cast(fn: Callable, dt: torch.dtype = dt, rowwise: bool = rowwise) -> Callable[[], torch.Tensor]:
            return lambda: (lambda q, s: q.float() * s)(*fn(x, dt, rowwise))

        label = f"fp8_cast/{str(dt).split('_')[1]}-{'row' if rowwise else 'tensor'}"
        cases.append(Case(label, cast(fp8_cast.fp8_cast), cast(fp8_cast.fp8_cast_reference), 0.0,
                          bytes=x.numel() * (x.element_size() + 1), fp8=True))

    m, dim = (16_381, 4099) if big else (1003, 259)
    x, w = randn(m, dim, dtype=lowp), randn(dim, dtype=lowp)
    cases.append(Case("rmsnorm/fwd+bwd", _grads(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), x, w),
                      _grads(lambda a, b: rmsnorm.rmsnorm_reference(a, b, 1e-6), x, w), low_tol,
                      bytes=5 * x.numel() * x.element_size()))

    g, u = randn(m, 3 * dim, dtype=lowp), randn(m, 3 * dim, dtype=lowp)
    cases.append(Case("swiglu/fwd+bwd", _grads(swiglu.swiglu, g, u), _grads(swiglu.swiglu_reference, g, u),
                      low_tol, bytes=8 * g.numel() * g.element_size()))

    n_tok, dim, vocab = (8191, 2053, 32_003) if big else (1003, 129, 5003)
    h, wv = randn(n_tok, dim, dtype=lowp), randn(vocab, dim, dtype=lowp, std=dim**-0.5)
    y = torch.randint(vocab, (n_tok,), generator=gen).to(device)
    y[::7] = -100
    cases.append(Case("cross_entropy/chunked", _grads(lambda a, b: cross_entropy.linear_cross_entropy(a, b, y), h, wv),
                      _grads(lambda a, b: cross_entropy.cross_entropy_reference(a, b, y), h, wv),
                      2.0**-5 if big else 1e-5, flops=6 * n_tok * vocab * dim))

    n_tok, dim, experts, top_k = (16_381, 4099, 64, 6) if big else (1003, 259, 8, 2)
    xt = randn(n_tok, dim, dtype=lowp)
    route = torch.rand(n_tok, experts, generator=gen).topk(top_k, dim=-1)
    chosen, mix = route.indices.to(device), route.values.softmax(-1).to(device)

    def moe(permute: Callable, unpermute: Callable) -> Callable[[], tuple]:
        def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            p = moe_permute.plan(chosen, experts)
            return unpermute(permute(a, p) * 2.0, p, b)
        return _grads(run, xt, mix)

    cases.append(Case("moe_permute/round_trip", moe(moe_permute.permute, moe_permute.unpermute),
                      moe(moe_permute.permute_reference, moe_permute.unpermute_reference),
                      low_tol,
                      bytes=4 * top_k * xt.numel() * xt.element_size()))

    m, k_in, n_out = (4096, 4096, 11_008) if big else (1003, 320, 640)
    xl, wl = randn(m, k_in), randn(n_out, k_in, std=k_in**-0.5)

    def linear(layer_cls: type) -> Callable[[], tuple]:
        layer = layer_cls(k_in, n_out, bias=False, device="meta")
        return _grads(lambda a, b: torch.func.functional_call(layer, {"weight": b}, (a,)), xl, wl)

    # fp8 (e4m3: 2^-4 relative per element, e5m2 gradients 2^-3) against an fp32 matmul.
    fp8_linear = linear(fp8.FP8Linear)
    bf16 = _grads(lambda a, b: F.linear(a.to(torch.bfloat16), b.to(torch.bfloat16)), xl, wl)
    baselines = {}
    if big:
        from kernels.bench_gpu import torchao_float8_linear

        baselines = torchao_float8_linear(xl, wl)
    cases.append(Case("fp8_linear/fwd+bwd", fp8_linear, linear(torch.nn.Linear), 0.125, (fp8_linear, bf16),
                      flops=6 * m * k_in * n_out, baselines=baselines, fp8=True))
    return cases


def _flatten(out: Any) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def check(case: Case, device: torch.device) -> dict[str, Any]:
    """{"correct": bool (None: not judged), "max_rel_error", "tolerance", ...}."""
    got, want = _flatten(case.kernel()), _flatten(case.oracle())
    err = 0.0
    for a, b in zip(got, want, strict=True):
        b = b.to(a.device).float()
        err = max(err, float((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    result = {"correct": err <= case.tolerance, "max_rel_error": err, "tolerance": case.tolerance,
              **case.extra()}
    if case.fp8 and INTERPRET and device.type == "cpu":
        # Triton 3.x's interpreter rounds fp32→fp8 wrongly for a few % of values (a carry into
        # the exponent is dropped); tests/kernels checks these kernels with that in mind.
        result.update(correct=None, note="not judged: the interpreter's fp8 cast is inexact")
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archipelago bench kernels", description=__doc__)
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (CUDA)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cases = build_cases(device, args.seed)
    results = {c.name: check(c, device) for c in cases}
    if cuda:
        from kernels.bench_gpu import time_cases

        extra = time_cases(cases, args.repeats)
        for name, timing in extra["kernels"].items():
            results[name].update(timing)
        baselines = extra["baselines"]
    else:
        baselines = {}
    runner = "Triton" if cuda else "Triton interpreter" if INTERPRET else "torch twins"
    report = {
        "kernels": results,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": cuda,
        "runner": runner,
        "note": ("CUDA: correctness, median times and ratios to baselines from this run" if cuda else
                 f"CPU: correctness only ({runner}); no timings"),
        "baselines": baselines,
        "triton": triton.__version__ if triton is not None else None,
        **run_metadata(args.seed, {"repeats": args.repeats, "interpret": INTERPRET}),
    }
    _print(report)
    if args.json_path:
        write_json(Path(args.json_path), report)
        console.print(f"written to {args.json_path}")
    return 0 if all(r["correct"] is not False for r in results.values()) else 1


def _print(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"kernels on {report['device']} — {report['note']}")
    timed = report["cuda"]
    cols = ["kernel", "correct", "max rel err", "tolerance"]
    cols += ["ms", "GB/s | TFLOP/s", "× eager", "× compile", "of peak"] if timed else []
    for col in cols:
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for name, r in report["kernels"].items():
        verdict = {True: "[green]yes", False: "[red]NO", None: "[yellow]not judged"}[r["correct"]]
        row = [name, verdict, f"{r['max_rel_error']:.2e}",
               f"{r['tolerance']:.1e}"]
        if timed:
            rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r.get('tflops', 0):.1f} TF/s"
            row += [f"{r['ms']:.3f}", rate, f"{r['speedup_vs_eager']:.2f}",
                    f"{r.get('speedup_vs_compile', float('nan')):.2f}", f"{r['fraction_of_peak']:.0%}"]
        table.add_row(*row)
    console.print(table)
