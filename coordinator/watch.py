"""`archipelago coordinator status --watch [--interval S]`: the live view `sim` shows, of a running
coordinator, refreshed every S seconds from Admin.Status (docs/design.md, Observability).

Per island the coordinator knows what its pushes said: rounds pushed, the loss it reported, tokens per
second of compute between two pushes (`islands_progress` of the status), and its lease's state; per
fragment the committed version and open round. Each new commit, refusal or rollback in the status
history is printed as a line (on a pipe only those lines). A coordinator that does not answer (a
restart, a failover) is shown as such, and the watch goes on until interrupted.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable
from typing import Any

import grpc

from archipelago.live import IslandRow, LiveView, RunView, apply_status


def island_rows(reply: Any, detail: dict[str, Any]) -> list[IslandRow]:
    """The islands as the coordinator sees them: lease state from the reply, the rest from what
    their pushes reported."""
    progress = detail.get("islands_progress", {})
    last_fragment = len(detail.get("rounds", [])) - 1
    rows = []
    for island in sorted(reply.islands, key=lambda i: i.island_id):
        p = progress.get(island.island_id, {})
        # its last reported push was of `round`: that round is done once its last fragment is pushed
        done = None if "round" not in p else p["round"] + (1 if p.get("fragment") == last_fragment else 0)
        rows.append(IslandRow(island.island_id, island.state, done, None, None, None, p.get("loss"),
                              p.get("tokens_per_s"), None))
    return rows


def watch(args: argparse.Namespace, fetch: Callable[[], Any], live: LiveView | None = None,
          stop: threading.Event | None = None) -> int:
    """Refresh the view every `args.interval` seconds until interrupted (or `stop` is set).
    `fetch()` returns the Admin.Status reply or raises grpc.RpcError."""
    view = RunView(f"coordinator {args.address}", phase="watching")
    live = live if live is not None else LiveView()
    stop = stop if stop is not None else threading.Event()
    since: float | None = None  # history entries up to this `time` are not printed
    with live:
        try:
            while not stop.is_set():
                try:
                    reply = fetch()
                except grpc.RpcError as exc:
                    view.coordinator = f"not answering: {exc.code().name}"
                else:
                    detail = json.loads(reply.json)
                    if since is None:  # lines for what happens from now on (by the coordinator's clock)
                        since = max((e.get("time", 0.0) for e in detail.get("history", [])), default=0.0)
                    lines, since = apply_status(view, detail, since)
                    for line in lines:
                        live.line(line)
                    view.elapsed_s = detail.get("uptime_s", 0.0)
                    view.islands = island_rows(reply, detail)
                live.show(view)
                stop.wait(args.interval)
        except KeyboardInterrupt:
            pass
    return 0
