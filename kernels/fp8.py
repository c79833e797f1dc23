"""FP8 linear layers for training: dynamic per-tensor (or per-row) scaling, fp32 master weights.

The recipe of Micikevicius et al. (arXiv:2209.05433) and torchao's ``Float8Linear``: in the
forward, activations and weights are cast to e4m3 (3 mantissa bits, range ±448) with a scale
computed from the current amax; in the backward the incoming gradient is cast to e5m2 (2 mantissa
bits, range ±57344) because gradients span more orders of magnitude. All three matmuls
(y = x Wᵀ, dx = dy W, dW = dyᵀ x) go through `torch._scaled_mm`, which accumulates in fp32.
The parameter stays an fp32 ``weight`` (same name, same state dict), so optimizers, checkpoints,
the DiLoCo codec and the HF export do not know the layer is FP8.

`torch._scaled_mm` runs on CPU in torch 2.13 with per-tensor and row-wise scales (tested in
tests/kernels/test_fp8.py; about 1.5–2× slower than an fp32 matmul there), so the same code
trains on a laptop and an H100. On CUDA it needs both inner
dimensions to be multiples of 16; a matmul that is not gets the dequantize→matmul fallback.
Row-wise scaling (``scaling="row"``, one scale per token and per output channel) applies to the
forward only; the backward's contractions run over the token and output dimensions, which
row-wise scales cannot follow, so it stays per-tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.fp8_cast import fp8_cast

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same [R, C] matrix stored column-major, as `_scaled_mm` wants its second operand."""
    return t.t().contiguous().t()


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(a · scale_a) @ (b · scale_b): a fp8 [M, K] row-major, b fp8 [K, N]; scales [] or [M, 1] /
    [1, N] → out_dtype [M, N]."""
    if a.device.type == "cpu":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    if a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0:
        # cuBLASLt's row-wise scaling only writes bf16.
        mm_dtype = torch.bfloat16 if scale_a.numel() > 1 else out_dtype
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype).to(out_dtype)
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


class _FP8Matmul(torch.autograd.Function):
    """y = x Wᵀ with x, W in e4m3 and dy in e5m2. x: [M, K], weight: [N, K] → [M, N]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
                rowwise: bool) -> torch.Tensor:
        x8, sx = fp8_cast(x, E4M3, rowwise)
        w8, sw = fp8_cast(weight, E4M3, rowwise)
        out = scaled_matmul(x8, w8.t(), sx, sw.t() if rowwise else sw, out_dtype)
        if rowwise:  # the backward is per-tensor (see module docstring)
            x8, sx = fp8_cast(x, E4M3)
            w8, sw = fp8_cast(weight, E4M3)
        # Saving the fp8 copies (not x) is also FP8's activation-memory saving.
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, sg = fp8_cast(dy, E5M2)
        dx = scaled_matmul(g8, _column_major(w8), sg, sw, x_dtype)  # [M, N] @ [N, K]
        dw = scaled_matmul(g8.t().contiguous(), _column_major(x8), sg, sx, torch.float32)  # [N, M] @ [M, K]
        return dx, dw.to(w_dtype), None, None


class FP8Linear(nn.Linear):
    """An `nn.Linear` whose matmuls run in FP8; weight (and bias) stay in their own dtype.

    Output dtype: the autocast dtype inside autocast, else the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scaling: str = "tensor", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if scaling not in ("tensor", "row"):
            raise ValueError(f"FP8Linear: scaling must be 'tensor' or 'row', got {scaling!r}")
        self.scaling = scaling

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "tensor") -> FP8Linear:
        """Wrap an existing layer, sharing its Parameter objects (so ties and optimizers hold)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  scaling=scaling, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] → [..., out_features]."""
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features)
        out = _FP8Matmul.apply(x2, self.weight, out_dtype, self.scaling == "row")
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 scaling={self.scaling}"


def convert_to_fp8(model: nn.Module, scaling: str = "tensor") -> nn.Module:
    """Replace, in place, the nn.Linear layers inside ``model.layers`` (the transformer blocks)
    with FP8Linear, except the MoE router ``gate``: routing decisions are discrete, and a few
    percent of quantization noise in the router logits flips top-k choices. Embeddings and
    ``lm_head`` live outside the blocks and stay as they are (the head's softmax is sensitive to
    the logit error FP8 adds, and it is tied to the embedding). Returns ``model``.
    """
    for block in model.layers:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] == "gate":
                continue
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], FP8Linear.from_linear(module, scaling))
    return model
