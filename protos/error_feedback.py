"""Error feedback: what quantization dropped from one round is re-sent in the next.

`ErrorFeedback.encode` is the island's encode: it runs the codec (`protos.codec`) on ``Δ + β·e``
and keeps the new residual, for block schemes in the same fused kernel call. ``β`` (``decay``) is
1 for classic error feedback; SparseLoCo (arXiv 2508.15706) decays the buffer, β = 0.95, which then
plays the part of outer momentum.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from protos import codec_kernels
from protos.codec import _NO_CAP, _TENSOR_DTYPES, Payload, _check_header, _dtype_name, _quantize, _reconstruct
from protos.codec_kernels import compile_mode
from protos.quant import BlockBatch, CodecError, _BlockScheme, get_scheme


class ErrorFeedback:
    """Per-tensor residuals so that quantization error is re-sent, not lost (EF / EF21 style).

    For each tensor: ``y = Δ + β·e``, send ``Q(y)``, reconstruct ``ŷ`` from the very bytes sent
    (the same code path the receiver runs), and keep ``e ← y − ŷ``.  Then
    ``Σ_t β^(T−t) ŷ_t = Σ_t β^(T−t) Δ_t − e_T``: the (decayed) sum of what was received tracks
    the (decayed) sum of what was meant, off by the residual, however many rounds pass; with
    β = 1 that is one round's quantization error, with β < 1 and ‖Δ_t‖∞ ≤ D it is at most
    D / (1 − β) whatever the scheme drops.  Residuals of tensors missing from a round (streaming
    fragments) are kept untouched.

    Block schemes keep the residuals of a round's tensors as views of one flat buffer and,
    while the rounds keep the same tensors, alternate between two such buffers: the kernel
    writes the new residuals into the one the round before last used, never into the live one,
    so a refused round (a NaN) leaves the state as it was.
    """

    def __init__(self, decay: float = 1.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise CodecError(f"error-feedback decay must be in [0, 1], got {decay}")
        self.decay = decay
        self._residuals: dict[str, torch.Tensor] = {}  # name → fp32, the delta's shape
        self._flat: _FlatResiduals | None = None

    def encode(
        self, deltas: Mapping[str, torch.Tensor], scheme: str, *, zstd_level: int = 3, zstd: bool | None = None
    ) -> tuple[Payload, Mapping[str, torch.Tensor]]:
        """Payload of ``Q(Δ + e)`` and the fp32 CPU tensors ``ŷ`` the receiver will decode.

        Block schemes do it in one fused kernel call for all tensors (``y = Δ + e`` written
        once; codes, scales and ``y − ŷ`` in one pass), and decode ``ŷ`` from the codes only
        when the returned mapping is first read.  Bit for bit the same as quantizing, decoding
        and subtracting tensor by tensor (tests/protos hold it to that reference).
        """
        q = get_scheme(scheme)
        residuals: list[torch.Tensor | None] = []
        dtypes: dict[str, str] = {}
        for name, d in deltas.items():
            if not isinstance(d, torch.Tensor) or not d.is_floating_point():
                raise CodecError(f"delta {name!r} must be a floating torch tensor, got {type(d).__name__}")
            e = self._residuals.get(name)
            if e is not None and e.shape != d.shape:
                shapes = f"shape {tuple(d.shape)} but its residual has {tuple(e.shape)}"
                raise CodecError(f"delta {name!r} has {shapes}; reset() first")
            residuals.append(e if e is None or self.decay == 1.0 else e * self.decay)
            dtypes[name] = _dtype_name(d.dtype)
        if isinstance(q, _BlockScheme):
            return self._encode_block(deltas, q, residuals, dtypes, zstd_level, zstd)
        ys: dict[str, torch.Tensor] = {}
        for (name, d), e in zip(deltas.items(), residuals, strict=True):
            y = d.detach().to(torch.float32)
            ys[name] = y + e.to(y.device) if e is not None else y
        payload, raw, _ = _quantize(ys, q, dtypes, zstd_level, zstd)
        assert raw is not None
        entries = _check_header(payload.header, len(raw), _NO_CAP)[1]  # our own header: no caps
        y_hat = _reconstruct(q, entries, raw)
        for name, y in ys.items():  # commit only once every tensor encoded
            self._residuals[name] = y - y_hat[name].to(y.device)
        return payload, y_hat

    def _encode_block(
        self, deltas: Mapping[str, torch.Tensor], q: _BlockScheme, residuals: list[torch.Tensor | None],
        dtypes: dict[str, str], zstd_level: int, zstd: bool | None,
    ) -> tuple[Payload, Mapping[str, torch.Tensor]]:
        if threading.current_thread() is threading.main_thread() and compile_mode() == "auto" and (
                sum(d.numel() for d in deltas.values()) >= codec_kernels.COMPILE_MIN_NUMEL):
            q.compile_kernels()  # a training island's push: the place to spend the compile (see COMPILE_ENV)
        key = (q.name, q.block, tuple((n, tuple(d.shape), d.device.type) for n, d in deltas.items()))
        flat = self._flat
        spare = flat.spare if flat is not None and flat.key == key and all(
            self._residuals.get(n) is v for n, v in flat.views.items()) else None
        # Deltas of a dtype the wire does not name go in as fp32, as y = Δ.float() + e would.
        xs = {n: d if _dtype_name(d.dtype) in _TENSOR_DTYPES else d.detach().float() for n, d in deltas.items()}
        try:
            payload, _, batch = _quantize(xs, q, dtypes, zstd_level, zstd, residuals=residuals, feedback=True,
                                          out=spare)
        except BaseException:  # a refused round may have left anything in the spare, padding included
            if flat is not None:
                flat.spare = None
            raise
        assert batch is not None and batch.residual is not None
        views = dict(zip(deltas, batch.views(batch.residual, [d.shape for d in deltas.values()]), strict=True))
        for name, d in deltas.items():  # commit only once every tensor encoded
            self._residuals[name] = views[name] if d.device.type == "cpu" else views[name].to(d.device)
        live = flat.buffer if flat is not None and flat.key == key else None
        self._flat = _FlatResiduals(key, batch.residual, views, live)
        return payload, _Decoded(batch, {n: tuple(d.shape) for n, d in deltas.items()})

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"residuals": {n: e.clone() for n, e in self._residuals.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residuals = state.get("residuals") if isinstance(state, Mapping) else None
        if not isinstance(residuals, Mapping) or not all(
            isinstance(n, str) and isinstance(e, torch.Tensor) and e.is_floating_point()
            for n, e in residuals.items()
        ):
            raise CodecError("error-feedback state must be {'residuals': {name: floating tensor}}")
        self._residuals = {n: e.detach().to(torch.float32).clone() for n, e in residuals.items()}
        self._flat = None

    def reset(self) -> None:
        """Drop every residual (after a model reset or a change of tensor shapes)."""
        self._residuals.clear()
        self._flat = None


@dataclass
class _FlatResiduals:
    """The flat buffer behind a block scheme's residual views, and the one before it."""

    key: tuple[Any, ...]  # scheme, block and the tensors (name, shape, device), in order
    buffer: torch.Tensor
    views: dict[str, torch.Tensor]
    spare: torch.Tensor | None  # free to overwrite next round if the views are still the residuals


class _Decoded(Mapping[str, torch.Tensor]):
    """ŷ of one error-feedback round: decoded from the codes sent, in one kernel call, when first read."""

    def __init__(self, batch: BlockBatch, shapes: dict[str, tuple[int, ...]]) -> None:
        self._batch, self._shapes = batch, shapes
        self._values: dict[str, torch.Tensor] | None = None

    def _decoded(self) -> dict[str, torch.Tensor]:
        if self._values is None:
            flat = self._batch.y_hat
            self._values = dict(zip(self._shapes, self._batch.views(flat, list(self._shapes.values())), strict=True))
        return self._values

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._decoded()[name]

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
