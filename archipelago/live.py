"""The live view of a running job, shared by `sim`, `chaos`, `posttrain` and `coordinator status
--watch` (docs/design.md, Observability).

`RunView` is what is known now: per island its rounds done, step, last loss and tokens/s; per fragment
its committed version; the baseline's progress; an ETA; the faults injected so far. `LiveView`
shows it: on a terminal a panel redrawn in place (rich), with one line printed above it per
committed round and per fault; on a pipe or a log only those lines, so a log reads as a list of
commits. `publish_json` is how a child process hands its progress to the parent: a small JSON
file replaced atomically, which a reader never sees half written.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from archipelago.console import console as default_console


def publish_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Replace `path` with `payload` atomically (temp name, rename; no fsync: progress, not state)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, default=str))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A published JSON file, or None while it does not exist (or cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class IslandRow:
    name: str
    state: str = "starting"
    rounds_done: int | None = None  # outer rounds whose inner steps are all done
    rounds: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    version: int | None = None
    round_step: int | None = None  # inner steps done of the round being trained
    round_steps: int | None = None


@dataclass
class RunView:
    title: str
    phase: str = "starting"
    elapsed_s: float = 0.0
    islands: list[IslandRow] = field(default_factory=list)
    fragments: list[dict[str, int]] = field(default_factory=list)  # {fragment, version, round}
    version: int | None = None
    coordinator: str = ""  # why the coordinator's state is not known now, or ""
    baseline: dict[str, Any] | None = None  # {step, steps, loss, steps_per_s}
    eta_s: float | None = None
    faults: list[str] = field(default_factory=list)


def duration(seconds: float | None) -> str:
    """42s, 3m05s, 1h02m; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _of(value: int | None, total: int | None) -> str:
    if value is None:
        return "—"
    return f"{value}/{total}" if total else str(value)


def round_bar(done: int | None, total: int | None, width: int = 10) -> str:
    """`■■■■□□□□□□ 21/50`: how far the round being trained is; "—" when unknown."""
    if done is None or not total:
        return "—"
    filled = min(width, max(0, round(width * done / total)))
    return f"{'■' * filled}{'□' * (width - filled)} {done}/{total}"


def render(view: RunView) -> Group:
    """The panel a terminal shows."""
    eta = f" · ETA {duration(view.eta_s)}" if view.eta_s is not None else ""
    parts: list[Any] = [Text.from_markup(f"[bold]{view.title}[/] · {view.phase} · {duration(view.elapsed_s)} "
                                         f"elapsed{eta}")]
    if view.islands:
        table = Table("island", "state", "rounds", "this round", "step", "loss", "tokens/s", "θ_b version", box=None,
                      header_style="bold")
        for row in view.islands:
            this_round = round_bar(row.round_step, row.round_steps) if row.state not in ("done", "stopped") else "—"
            table.add_row(row.name, row.state, _of(row.rounds_done, row.rounds), this_round, _of(row.step, row.steps),
                          _num(row.loss, ".4f"), _num(row.tokens_per_s, ",.0f"), _num(row.version, "d"))
        parts.append(table)
    if view.fragments or view.coordinator:
        committed = "  ".join(f"fragment {f['fragment']}: v{f['version']} (round {f['round']} open)"
                              for f in view.fragments)
        parts.append(Text(f"committed: version {_num(view.version, 'd')}  {committed}"
                          + (f"  [{view.coordinator}]" if view.coordinator else "")))
    if view.baseline is not None:
        b = view.baseline
        parts.append(Text(f"baseline (data parallel): step {_of(b.get('step'), b.get('steps'))}, "
                          f"loss {_num(b.get('loss'), '.4f')}, {_num(b.get('steps_per_s'), '.1f')} steps/s"))
    for fault in view.faults:
        parts.append(Text(f"fault: {fault}", style="yellow"))
    return Group(*parts)


def islands_summary(view: RunView) -> str:
    """`steps 150,150,148/300 · 15,230 tokens/s`: where the islands are, in one line."""
    steps = [r.step for r in view.islands if r.step is not None]
    total = next((r.steps for r in view.islands if r.steps), None)
    rate = sum(r.tokens_per_s or 0.0 for r in view.islands if r.state not in ("done", "stopped"))
    if not steps:
        return "islands starting"
    return f"steps {','.join(str(s) for s in steps)}{f'/{total}' if total else ''} · {rate:,.0f} tokens/s"


def commit_line(view: RunView, entry: dict[str, Any]) -> str:
    """One line per committed round (the coordinator's history entry of the commit)."""
    loss = entry.get("loss_mean")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
    islands = entry.get("islands") or []
    eta = f", ETA {duration(view.eta_s)}" if view.eta_s is not None else ""
    return (f"[{view.title}] version {entry['version']}: fragment {entry['fragment']} round {entry['round']} "
            f"committed ({len(islands)} island{'s' if len(islands) != 1 else ''}{loss_text}) · "
            f"{islands_summary(view)} · {duration(view.elapsed_s)} elapsed{eta}")


def event_line(view: RunView, entry: dict[str, Any]) -> str | None:
    """The line of one entry of the coordinator's history (`coordinator status --json`: a commit,
    a round the guard refused, a rollback), or None for another kind."""
    kind = entry.get("kind")
    if kind == "committed":
        return commit_line(view, entry)
    if kind == "refused":
        return (f"[{view.title}] fragment {entry['fragment']} round {entry['round']} refused by the guard: "
                f"{entry.get('reason', '')}")
    if kind == "rollback":
        return (f"[{view.title}] rolled back from version {entry['from_version']} to {entry['to_version']} "
                f"(by {entry.get('by')}): {entry.get('reason', '')}")
    return None


def apply_status(view: RunView, detail: dict[str, Any], since: float) -> tuple[list[str], float]:
    """Take the committed versions from the coordinator's status detail into `view`; the lines of
    its history entries newer than `since` (their `time`), and the newest time seen."""
    view.coordinator = ""
    view.version = detail.get("version")
    rounds = detail.get("rounds", [])
    versions = detail.get("fragment_versions") or [None] * len(rounds)
    view.fragments = [{"fragment": f, "version": v, "round": r}
                      for f, (r, v) in enumerate(zip(rounds, versions, strict=False))]
    lines = []
    for entry in detail.get("history", []):
        if entry.get("time", 0) > since:
            since = entry["time"]
            line = event_line(view, entry)
            if line is not None:
                lines.append(line)
    return lines, since


class LiveView:
    """A panel redrawn in place on a terminal; elsewhere only the lines `line` is given."""

    def __init__(self, console: Console | None = None, terminal: bool | None = None,
                 refresh_per_second: float = 2.0) -> None:
        self.console = console or default_console
        self.terminal = self.console.is_terminal if terminal is None else terminal
        self.refresh_per_second = refresh_per_second
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        if self.terminal:
            self._live = Live(console=self.console, refresh_per_second=self.refresh_per_second, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, view: RunView) -> None:
        if self._live is not None:
            self._live.update(render(view))

    def line(self, text: str) -> None:
        """Printed in both modes (above the panel on a terminal)."""
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


class Stopwatch:
    """Seconds since the start, and steps per second of a counter, for ETAs."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: tuple[float, float] | None = None  # (time, count) when the counter first moved

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def rate(self, count: float) -> float | None:
        """Counts per second since the counter first moved (start-up is not counted)."""
        now = time.monotonic()
        if self.first is None:
            if count > 0:
                self.first = (now, count)
            return None
        t0, c0 = self.first
        return (count - c0) / (now - t0) if count > c0 and now > t0 else None
