"""Applying an outer delta to the broadcast copy θ_b: the one operation both ends must share.

The coordinator and every island call this with the same decoded δ̂ in the same order, so θ_b is
bit-identical everywhere (an fp32 elementwise add is deterministic).
"""

from __future__ import annotations

import hashlib

import torch


def apply_delta(theta_b: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    """θ_b[name] += δ̂[name] in fp32, in place."""
    for name, d in delta.items():
        theta_b[name].add_(d)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 bytes in name order: equal digests mean bit-identical copies."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()
