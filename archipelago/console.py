"""Progress bars and summary tables (rich) shared by every long command."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)


def progress() -> Progress | PlainProgress:
    """A live bar on a terminal; on a log (CI, nohup) a plain line every tenth of the way."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    transient=False)


class PlainProgress:
    """The subset of rich.progress.Progress our commands use, printing lines instead of a bar."""

    def __init__(self) -> None:
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if task["printed"] < 10:
                self._print(task)

    def add_task(self, description: str, total: int, completed: int = 0, info: str = "") -> int:
        tid = len(self.tasks)
        self.tasks[tid] = {"description": description, "total": total, "completed": completed,
                           "info": info, "printed": -1, "start": time.monotonic()}
        return tid

    def update(self, tid: int, completed: int | None = None, info: str | None = None) -> None:
        task = self.tasks[tid]
        if completed is not None:
            task["completed"] = completed
        if info is not None:
            task["info"] = info
        tenth = task["completed"] * 10 // max(1, task["total"])
        if tenth > task["printed"]:
            task["printed"] = tenth
            self._print(task)

    def _print(self, task: dict[str, Any]) -> None:
        console.print(f"{task['description']} {task['completed']}/{task['total']} {task['info']} "
                      f"({time.monotonic() - task['start']:.0f}s)", highlight=False)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    return table


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)
