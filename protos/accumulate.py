"""A weighted sum of pseudo-gradients, taken straight from their payloads: the coordinator's merge.

    S = Σ_i w_i · Q⁻¹(payload_i)   (summed in call order),   mean = S / Σ_i w_i

One fp32 buffer holds S for a fixed list of tensors (a fragment), laid out as the block schemes
lay out a payload: every tensor from a multiple of `DEFAULT_BLOCK` elements, zeros in between. A
block-scheme payload is added in one fused kernel call over that buffer (codes and scales are
gathered from the body where they lie, decoded, multiplied by the weight and added; see
`_BlockScheme.accumulate_raw`), so no fp32 copy of a push is ever made. Any other scheme is
decoded, then added tensor by tensor with the same two roundings: ``S += decoded × w``.

Float addition is not associative: S depends on the order of the calls, so callers that need a
result independent of arrival order add in a fixed order (the coordinator adds a round's pushes in
key order, docs/design.md step 7).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from protos.codec import Payload, TensorSpec, check_payload, decode, raw_reader
from protos.quant import DEFAULT_BLOCK, _BlockScheme


class WeightedSum:
    """``Σ w_i x_i`` and ``Σ w_i`` over one fixed list of tensors (``specs``), in fp32."""

    def __init__(self, specs: Sequence[TensorSpec], unit: int = DEFAULT_BLOCK) -> None:
        self.specs = list(specs)
        self.unit = unit
        self.starts: list[int] = []
        total = 0
        for spec in self.specs:
            self.starts.append(total)
            total += -(-math.prod(spec.shape) // unit) * unit
        self.flat = torch.zeros(total, dtype=torch.float32)
        self.tensors = {s.name: self.flat[a:a + math.prod(s.shape)].view(s.shape) for s, a in zip(self.specs, self.starts,
                                                                                      strict=True)}
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self.weight = 0.0
        self.count = 0

    def zero_(self) -> None:
        self.flat.zero_()
        self.weight = 0.0
        self.count = 0

    def add(self, payload: Payload, weight: float, *, verify_sha256: bool = True) -> None:
        """S += weight × the payload's values (checked against ``specs`` first, like `decode`).

        ``verify_sha256=False`` for a body this process verified when it received it."""
        scheme, entries = check_payload(payload, self.specs, verify_sha256=verify_sha256)
        w = torch.tensor(weight, dtype=torch.float32)
        if isinstance(scheme, _BlockScheme) and self.unit % scheme.unit == 0:
            spans = [(e.numel, e.parts[0][2], e.parts[1][2]) for e in entries]  # layout: scales, values
            starts = [self.starts[self._index[e.name]] for e in entries]
            if starts != sorted(starts):  # tensors in another order than the specs: add them one by one
                for span, start in zip(spans, starts, strict=True):
                    size = -(-span[0] // self.unit) * self.unit
                    scheme.accumulate_raw(self.flat[start:start + size], raw_reader(payload), [span], [0], weight)
            else:
                scheme.accumulate_raw(self.flat, raw_reader(payload), spans, starts, weight)
        else:
            self._add_tensors(decode(payload, self.specs, verify_sha256=False), w)
        self.weight += weight
        self.count += 1

    def add_tensors(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """S += weight × ``tensors`` (decoded fp32 values, every name of ``specs``): the same bits as
        `add` of a payload that decodes to them."""
        self._add_tensors(tensors, torch.tensor(weight, dtype=torch.float32))
        self.weight += weight
        self.count += 1

    def _add_tensors(self, tensors: Mapping[str, torch.Tensor], w: torch.Tensor) -> None:
        for spec in self.specs:
            self.tensors[spec.name].add_(tensors[spec.name].reshape(spec.shape) * w)

    def mean(self) -> dict[str, torch.Tensor]:
        """S / Σ w, each tensor in its shape (views of one new buffer)."""
        assert self.weight > 0, "the mean of nothing (or of zero weight)"
        flat = self.flat / self.weight
        return {s.name: flat[a:a + math.prod(s.shape)].view(s.shape) for s, a in zip(self.specs, self.starts, strict=True)}
