"""A real Prometheus server scrapes a short two-island simulation through the config `archipelago sim
--prometheus-config` writes, and its HTTP API answers with what the run's report says.

Checked after the run (the processes are gone by then, so every query reads a range, not the stale
instant): the committed version and the fragment's version equal the report's final version; the
round-latency histogram counted one round per version and its 0.9 quantile (histogram_quantile
over the bucket series) lies within the run; each island's tokens/s is within a factor of 2 of its
report's tokens over compute seconds; off a terminal, the run printed one line per committed round.
Skipped, with the reason, when no prometheus binary is on PATH (Debian: apt-get install prometheus).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from archipelago.procs import free_port, kill_group
from tests.conftest import SMALL

pytestmark = [pytest.mark.prometheus,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="no prometheus binary on PATH (apt-get install -y prometheus)")]

ROOT = Path(__file__).resolve().parents[2]
RUN = [*SMALL, "sim.islands=2", "diloco.inner_steps=10", "diloco.rounds=4", "optim.warmup_steps=2"]
SIM_TIMEOUT_S = 420.0
START_TIMEOUT_S = 60.0
TOKENS_PER_S_FACTOR = 2.0


def wait(predicate, what: str, timeout_s: float, alive: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:g}s")
        time.sleep(0.2)


def targets(config: Path) -> int:
    try:
        jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return 0
    return sum(len(job["static_configs"][0]["targets"]) for job in jobs)


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def scalar(port: int, promql: str) -> float:
    result = query(port, promql)
    assert len(result) == 1, f"{promql}: {result}"
    return float(result[0]["value"][1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_prometheus_scrapes_a_two_island_simulation(tmp_path, data_cache):
    report, config = tmp_path / "sim", tmp_path / "prometheus.yml"
    sets = [arg for o in [*RUN, f"data.cache_dir={data_cache}"] for arg in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sim_log = open(tmp_path / "sim.out", "w")
    sim = subprocess.Popen([sys.executable, "-m", "archipelago.cli", "sim", "--preset", "ci", "--report", str(report),
                            "--baseline", "none", "--prometheus-config", str(config), *sets],
                           stdout=sim_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                           start_new_session=True)
    prometheus = None
    try:
        wait(lambda: targets(config) == 3, "the scrape config naming the coordinator and 2 islands",
             START_TIMEOUT_S * 2, sim)
        port = free_port()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait(lambda: ready(port), "Prometheus ready", START_TIMEOUT_S, prometheus)
        assert sim.wait(timeout=SIM_TIMEOUT_S) == 0, (tmp_path / "sim.out").read_text()[-3000:]

        result = json.loads((report / "report.json").read_text())
        final = result["final_version"]
        assert final == 4
        window = "[15m]"
        assert scalar(port, f"max_over_time(archipelago_coordinator_version{window})") == final
        assert scalar(port, f'max_over_time(archipelago_coordinator_fragment_version{{fragment="0"}}{window})') == final
        assert scalar(port, f"max_over_time(archipelago_coordinator_round_latency_seconds_count{window})") == final
        p90 = scalar(port, "histogram_quantile(0.9, sum by (le) "
                           f"(max_over_time(archipelago_coordinator_round_latency_seconds_bucket{window})))")
        assert 0 < p90 <= result["wall_s"]
        seen = {"final_version": final, "wall_s": result["wall_s"], "round_latency_p90_s": p90}
        for i in range(2):
            island = json.loads((report / f"island-{i}.json").read_text())
            expected = island["tokens"] / island["compute_s"]
            measured = scalar(port, f'avg_over_time(archipelago_island_tokens_per_second{{island="island-{i}"}}'
                                    f"{window})")
            seen[f"island-{i} tokens/s (Prometheus, report)"] = (round(measured), round(expected))
            assert expected / TOKENS_PER_S_FACTOR <= measured <= expected * TOKENS_PER_S_FACTOR, (i, measured, expected)
        print(f"prometheus saw: {seen}")  # shown with pytest -s
        up = {r["metric"]["job"]: r for r in query(port, f"max_over_time(up{window})")}
        assert set(up) == {"archipelago-coordinator", "archipelago-island"}
        commits = [line for line in (tmp_path / "sim.out").read_text().splitlines() if " committed (2 islands" in line]
        assert len(commits) == final, commits
    finally:
        for proc in (sim, prometheus):
            if proc is not None:
                kill_group(proc)
        sim_log.close()
