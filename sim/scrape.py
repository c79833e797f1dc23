"""Metrics ports for the processes a local run starts, and a Prometheus scrape config naming them.

Every coordinator and island process `sim`, `chaos` and `posttrain` start serves its metrics on a
port of its own (`coordinator.metrics_port`, `diloco.metrics_port`), picked free once per command
and kept by name: a restarted island or coordinator, the chaos run after the fault-free one, the
next seed of `sim --seeds` all serve where the first one did, so one config covers the command.
The config is written to REPORT/prometheus.yml and, with `--prometheus-config FILE`, to FILE too
(README, "Scraping a run"): `prometheus --config.file FILE` then scrapes the run every second.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from archipelago.procs import free_port

SCRAPE_INTERVAL_S = 1.0
JOBS = {"coordinator": "archipelago-coordinator", "island": "archipelago-island"}


class MetricsPorts:
    """One port per process name (`coordinator`, `island-0`, ...), written out as scrape targets."""

    def __init__(self, host: str = "127.0.0.1", config_files: list[Path] | None = None,
                 linger: bool = False) -> None:
        self.host = host
        self.config_files = list(config_files or [])
        # With a config someone will scrape, the run waits two scrape intervals before stopping its
        # coordinator, so that the last commit is scraped too.
        self.linger_s = 2 * SCRAPE_INTERVAL_S if linger else 0.0
        self.ports: dict[str, tuple[str, int]] = {}  # name -> (role, port)

    def port(self, role: str, name: str) -> int:
        """The metrics port of process `name` (`role`: coordinator | island), the same every time."""
        if name not in self.ports:
            self.ports[name] = (role, free_port(self.host))
            self.write()
        return self.ports[name][1]

    def assign(self, processes: list[tuple[str, str]]) -> None:
        """Ports for every (role, name) of a run before any starts, so the config lists them all at once."""
        for role, name in processes:
            if name not in self.ports:
                self.ports[name] = (role, free_port(self.host))
        self.write()

    def targets(self, role: str) -> list[str]:
        return [f"{self.host}:{port}" for r, port in self.ports.values() if r == role]

    def config(self) -> str:
        """A complete Prometheus config: one job per role, static targets, 1 s scrapes."""
        lines = ["# Written by archipelago for the processes of one run (sim/scrape.py); start Prometheus with",
                 "# prometheus --config.file THIS_FILE. Series carry their own island and fragment labels.",
                 "global:", f"  scrape_interval: {SCRAPE_INTERVAL_S:g}s", f"  evaluation_interval: {SCRAPE_INTERVAL_S:g}s",
                 "scrape_configs:"]
        for role, job in JOBS.items():
            targets = ", ".join(f'"{t}"' for t in self.targets(role))
            lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: [{targets}]"]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        text = self.config()
        for path in self.config_files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)


def add_prometheus_argument(p: argparse.ArgumentParser) -> None:
    """`--prometheus-config FILE` of the commands that start a run's processes."""
    p.add_argument("--prometheus-config", metavar="FILE",
                   help="also write the Prometheus scrape config of the run's processes here (it is always "
                        "written to REPORT/prometheus.yml), and keep the coordinator up two scrape intervals at "
                        "the end so the last commit is scraped")


def metrics_ports(out: Path, args: argparse.Namespace, host: str) -> MetricsPorts:
    """The command's metrics ports; their scrape config goes to REPORT/prometheus.yml (and FILE)."""
    extra = [Path(args.prometheus_config)] if getattr(args, "prometheus_config", None) else []
    return MetricsPorts(host, [Path(out) / "prometheus.yml", *extra], linger=bool(extra))
