"""The parent's live view of the processes a local run started (docs/design.md, Observability).

Two sources, polled on a background thread:
- each island's progress file (`diloco.progress_file`, island/telemetry.py), twice a second: rounds
  done, step, last loss, tokens/s, θ_b version. Reading a small local file costs the island nothing and
  works while the coordinator is away (a failover, a restart in a chaos run); the coordinator itself
  only hears from an island once per sync;
- the coordinator's Admin.Status, once a second: committed version per fragment and the history of
  commits, refusals and rollbacks, of which each new one becomes a line.
The data-parallel baseline's rank 0 writes a progress file of its own (sim/ddp.py). Injected faults
come from the chaos run's injector.

`RunMonitor` feeds an `archipelago.live.LiveView`: a panel on a terminal, one line per committed
round otherwise. It also hands out the processes' metrics ports (sim/scrape.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archipelago.live import IslandRow, LiveView, RunView, Stopwatch, apply_status, duration, read_json
from sim.scrape import MetricsPorts

POLL_S = 0.5
STATUS_EVERY_S = 1.0


class RunMonitor:
    """A live view of one command's phases (islands runs, the baseline), each `steps` long."""

    def __init__(self, title: str, phases: list[tuple[str, int]], ports: MetricsPorts | None = None,
                 view: LiveView | None = None) -> None:
        self.view = RunView(title)
        self.plan = list(phases)
        self.ports = ports if ports is not None else MetricsPorts()
        self.live = view if view is not None else LiveView()
        self.lock = threading.RLock()
        self.clock = Stopwatch()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase_index = -1
        self._phase_clock = Stopwatch()
        self._rate: float | None = None  # steps/s of the current phase (the slowest island's)
        self._islands: list[str] = []
        self._folder: Path | None = None
        self._status: Callable[[], dict[str, Any] | None] | None = None
        self._faults: Callable[[], list[str]] | None = None
        self._baseline: tuple[Path, int] | None = None
        self._baseline_tenth = -1
        self._last_event = 0.0  # `time` of the newest history entry printed
        self._printed_faults: set[str] = set()
        self._status_at = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> RunMonitor:
        self.live.__enter__()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self.lock:
            self.poll(status=False)
        self.live.__exit__(*exc)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as exc:  # the view must never stop the run
                self.view.coordinator = f"monitor: {exc!r}"

    # ---- phases ---------------------------------------------------------------------------------

    def islands_phase(self, phase: str, folder: Path, islands: list[str],
                      status: Callable[[], dict[str, Any] | None] | None = None,
                      faults: Callable[[], list[str]] | None = None) -> None:
        """Islands `islands` write their progress files in `folder`; `status()` is the coordinator's
        Admin.Status detail (None while it does not answer); `faults()` the faults injected so far."""
        with self.lock:
            self._next_phase(phase)
            self._folder, self._islands, self._status, self._faults = folder, list(islands), status, faults
            self.view.islands = [IslandRow(name) for name in islands]
            self.view.fragments, self.view.version, self._last_event = [], None, 0.0
            self.live.line(f"[{self.view.title}] {phase}: {len(islands)} islands started")

    def baseline_phase(self, progress_file: Path, steps: int) -> None:
        with self.lock:
            self._next_phase("baseline")
            self._baseline, self._baseline_tenth = (progress_file, steps), -1
            self._status = self._faults = None
            self.view.baseline = {"step": 0, "steps": steps}
            self.live.line(f"[{self.view.title}] baseline: synchronous data parallel, {steps} steps")

    def end_phase(self, final_status: dict[str, Any] | None = None) -> None:
        """The phase's processes are done: print what the coordinator's last status adds."""
        with self.lock:
            self.poll(status=False)
            if final_status is not None:
                self._coordinator(final_status)
            self._status = None

    def linger(self) -> None:
        """Before stopping the coordinator: let Prometheus scrape the last commit (sim/scrape.py)."""
        if self.ports.linger_s:
            time.sleep(self.ports.linger_s)

    def _next_phase(self, phase: str) -> None:
        names = [name for name, _ in self.plan]
        self._phase_index = names.index(phase) if phase in names else self._phase_index + 1
        self._phase_clock, self._rate = Stopwatch(), None
        self.view.phase = phase

    # ---- polling --------------------------------------------------------------------------------

    def poll(self, status: bool = True) -> None:
        with self.lock:
            self.view.elapsed_s = self.clock.elapsed_s
            if self._folder is not None and self._baseline is None:
                self._read_islands()
            if status and self._status is not None and time.monotonic() - self._status_at >= STATUS_EVERY_S:
                self._status_at = time.monotonic()
                try:
                    detail = self._status()
                except Exception:  # e.g. a chaos run's coordinator between a kill and its restart
                    detail = None
                if detail is None:
                    self.view.coordinator = "coordinator not answering"
                else:
                    self._coordinator(detail)
            if self._faults is not None:
                for fault in self._faults():
                    if fault not in self._printed_faults:
                        self._printed_faults.add(fault)
                        self.view.faults.append(fault)
                        self.live.line(f"[{self.view.title}] fault injected: {fault}")
            if self._baseline is not None:
                self._read_baseline()
            self.view.eta_s = self._eta()
            self.live.show(self.view)

    def _read_islands(self) -> None:
        rows = []
        for name in self._islands:
            p = read_json(self._folder / f"{name}.progress.json") or {}
            rows.append(IslandRow(name, p.get("state", "starting"), p.get("rounds_done"), p.get("rounds"), p.get("step"),
                                  p.get("steps"), p.get("loss"), p.get("tokens_per_s"), p.get("version"),
                                  p.get("round_step"), p.get("round_steps")))
        self.view.islands = rows
        steps = [r.step or 0 for r in rows if r.state != "done"]
        self._rate = self._phase_clock.rate(min(steps)) if steps else self._rate

    def _coordinator(self, detail: dict[str, Any]) -> None:
        lines, self._last_event = apply_status(self.view, detail, self._last_event)
        for line in lines:
            self.live.line(line)

    def _read_baseline(self) -> None:
        path, steps = self._baseline
        p = read_json(path) or {}
        step = int(p.get("step", 0))
        self._rate = self._phase_clock.rate(step)
        self.view.baseline = {"step": step, "steps": steps, "loss": p.get("loss"), "steps_per_s": self._rate}
        tenth = step * 10 // max(1, steps)
        if tenth > self._baseline_tenth and step:
            self._baseline_tenth = tenth
            loss = p.get("loss")
            self.live.line(f"[{self.view.title}] baseline step {step}/{steps}"
                           + (f", loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "")
                           + f" · {duration(self.clock.elapsed_s)} elapsed, ETA {duration(self._eta())}")

    def _eta(self) -> float | None:
        """Seconds left: this phase's remaining steps at its measured rate, and the phases after it at
        the same rate (a guess until they run)."""
        if self._rate is None or self._rate <= 0 or self._phase_index < 0:
            return None
        _, total = self.plan[self._phase_index] if self._phase_index < len(self.plan) else ("", 0)
        if self._baseline is not None:
            done = self.view.baseline.get("step", 0) if self.view.baseline else 0
        else:
            steps = [r.step or 0 for r in self.view.islands if r.state != "done"]
            done = min(steps) if steps else total
        later = sum(s for _, s in self.plan[self._phase_index + 1:])
        return max(0, total - done) / self._rate + later / self._rate
