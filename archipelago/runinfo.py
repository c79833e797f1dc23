"""What every report records about the run that wrote it: seed, config, versions, host."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import archipelago


def versions() -> dict[str, str]:
    import torch

    return {
        "archipelago": archipelago.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_metadata(seed: int, config: Any) -> dict[str, Any]:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return {
        "seed": seed,
        "config": cfg,
        "versions": versions(),
        "host": socket.gethostname(),
        "platform": f"{platform.system()} {platform.machine()}",
        "argv": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it serializes as strict JSON
    (a bare NaN or Infinity is not JSON, and a strict parser refuses the whole document)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temp name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
