"""The tensor-dict operations every holder of θ_b shares (docs/design.md, steps 9 and 10).

The coordinator and every island apply the same decoded δ̂ with the same fp32 add in the same
order, so θ_b is bit-identical everywhere; `digest` is how that is checked. An island merges a new
θ_b into the weights it kept training with `merge_local`; `l2_norm` is the one norm of a
pseudo-gradient, an outer step or a delta.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch


def apply_delta(theta_b: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    """θ_b[name] += δ̂[name] in fp32, in place."""
    for name, d in delta.items():
        theta_b[name].add_(d)


@torch.no_grad()
def merge_local(local: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor],
                snapshot: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
    """θ_local ← θ_b + (θ_local − snapshot), in place, for `names` (default: the snapshot's).

    What the island trained since it took `snapshot` at the sync point is kept on top of the new
    θ_b (an island that did not train since then ends holding θ_b exactly). `theta_b` may hold a
    rank's part of each tensor rather than the whole one, matching `local`'s shapes.
    """
    for name in snapshot if names is None else names:
        local[name].copy_(theta_b[name] + (local[name] - snapshot[name]))


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a tensor dict as one vector, accumulated in float64."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes and bytes in name order: equal digests mean bit-identical copies."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
