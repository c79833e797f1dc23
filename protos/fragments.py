"""How a model's tensors are split into fragments (streaming DiLoCo), shared by both ends.

Fragments are contiguous blocks of transformer layers; tensors outside the layers (embeddings)
go with the first fragment and the final norm / output head with the last. Both the island and the
coordinator compute the same split from the ordered tensor names, so it never travels.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^layers\.(\d+)\.")


def split_fragments(names: list[str], num_fragments: int) -> list[list[str]]:
    """Ordered tensor names -> `num_fragments` lists of names (every name in exactly one)."""
    layers = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
    if num_fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {num_fragments}")
    if layers and num_fragments > len(layers):
        raise ValueError(f"{num_fragments} fragments for a model with {len(layers)} layers")
    out: list[list[str]] = [[] for _ in range(num_fragments)]
    for name in names:
        m = _LAYER.match(name)
        if m:
            position = layers.index(int(m.group(1)))
            out[position * num_fragments // len(layers)].append(name)
        elif name.startswith(("embed_tokens",)) or not layers:
            out[0].append(name)
        else:
            out[-1].append(name)
    return out
