"""The acknowledgement log: one JSON line per start and per push outcome of an island process.

Chaos runs (sim/) read these files to count lost and duplicated updates across kills: an entry is
written only once the coordinator has answered, so a push in the log is durable there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


class AckLog:
    """Appends records to `path` ("{island_id}" in it is replaced by the island's id); a no-op
    when `path` is empty."""

    def __init__(self, path: str, island_id: str) -> None:
        self.island_id = island_id
        self.path = path.replace("{island_id}", island_id) if path else ""

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        line = json.dumps({"island": self.island_id, "pid": os.getpid(), "t": time.time(), **record})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
