"""`archipelago bench codec|kernels|coordinator|local-checkpoint`: benchmarks that print ratios against a baseline
measured in the same run and write JSON."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "codec": ("sim.bench_codec", "codec schemes on a real pseudo-gradient vs memcpy"),
    "kernels": ("kernels.bench", "kernels vs their torch reference twins"),
    "coordinator": ("coordinator.bench", "one coordinator driven by many lightweight islands"),
    "local-checkpoint": ("sim.bench_local_checkpoint", "an inner step with island-local checkpoints on and off"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        names = "\n".join(f"  {k:<12} {v[1]}" for k, v in BENCHES.items())
        print(f"usage: archipelago bench NAME [--json FILE] ...\n\nbenchmarks:\n{names}",
              file=sys.stderr if argv else sys.stdout)
        return 2 if argv else 0
    module = importlib.import_module(BENCHES[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
