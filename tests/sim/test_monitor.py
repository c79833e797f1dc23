"""The parent's live view (sim/monitor.py) off a terminal: one line per committed round, a line per
refusal, rollback and injected fault, the baseline every tenth of the way; and the scrape config
(sim/scrape.py) naming every process's metrics port.

The sources are faked: progress files written here, a status function returning the coordinator's
detail as a test sets it, a fault list.
"""

from __future__ import annotations

import io
import re
import time

import yaml
from rich.console import Console

from archipelago.live import LiveView, publish_json, render, round_bar
from sim.monitor import RunMonitor
from sim.scrape import MetricsPorts

COMMIT_LINE = re.compile(r"^\[sim ci\] version (\d+): fragment (\d+) round (\d+) committed \((\d+) islands?"
                         r"(, loss \d+\.\d{4})?\) · steps [\d,]+/\d+ · [\d,]+ tokens/s · \d+s elapsed(, ETA \S+)?$")


def commit(version: int, round_: int, t: float) -> dict:
    return {"kind": "committed", "version": version, "fragment": 0, "round": round_,
            "islands": ["island-0", "island-1"], "loss_mean": 5.5 - version / 10, "time": t}


def test_off_a_terminal_each_committed_round_is_one_line(tmp_path):
    out = io.StringIO()
    live = LiveView(Console(file=out, width=300), terminal=False)
    detail = {"version": 0, "rounds": [0], "fragment_versions": [0], "history": []}
    faults: list[str] = []
    monitor = RunMonitor("sim ci", [("islands", 20), ("baseline", 20)], MetricsPorts(config_files=[]), live)
    monitor.islands_phase("islands", tmp_path, ["island-0", "island-1"], lambda: detail, lambda: faults)
    t0 = time.time()
    for step in range(1, 21):
        for island in ("island-0", "island-1"):
            publish_json(tmp_path / f"{island}.progress.json", {
                "state": "training", "rounds_done": step // 10, "rounds": 2, "step": step, "steps": 20,
                "loss": 5.0, "tokens_per_s": 1000.0, "version": step // 10})
        if step % 10 == 0:
            detail = {**detail, "version": step // 10, "rounds": [step // 10], "fragment_versions": [step // 10],
                      "history": [*detail["history"], commit(step // 10, step // 10 - 1, t0 + step)]}
        if step == 15:
            faults.append("kill_island on island-1 at 3.0s")
            detail["history"].append({"kind": "refused", "fragment": 0, "round": 2, "reason": "loss spike: 9 > 6",
                                      "time": t0 + 15.5})
        monitor._status_at = 0.0  # ask the coordinator at every poll here
        monitor.poll()
        monitor.poll()  # a second poll prints nothing new
    monitor.end_phase(detail)
    monitor.baseline_phase(tmp_path / "ddp-progress.json", 20)
    for step in range(1, 21):
        publish_json(tmp_path / "ddp-progress.json", {"step": step, "steps": 20, "loss": 4.0})
        monitor.poll()
    lines = out.getvalue().splitlines()
    commits = [line for line in lines if " committed " in line]
    assert len(commits) == 2, lines
    for line, version in zip(commits, (1, 2), strict=True):
        match = COMMIT_LINE.match(line)
        assert match, line
        assert int(match.group(1)) == version and match.group(4) == "2"
    assert sum("fault injected: kill_island on island-1" in line for line in lines) == 1
    assert sum("round 2 refused by the guard: loss spike" in line for line in lines) == 1
    baseline = [line for line in lines if "baseline step" in line]
    assert 1 <= len(baseline) <= 11 and baseline[-1].startswith("[sim ci] baseline step 20/20, loss 4.0000")
    assert lines[0] == "[sim ci] islands: 2 islands started"


def test_scrape_config_names_every_process_once_and_keeps_ports_by_name(tmp_path):
    ports = MetricsPorts("127.0.0.1", [tmp_path / "prometheus.yml"])
    first = {name: ports.port(role, name) for role, name in
             (("coordinator", "coordinator"), ("island", "island-0"), ("island", "island-1"))}
    assert ports.port("island", "island-0") == first["island-0"]  # a restart serves where it did
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "1s"
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {"archipelago-coordinator": [f"127.0.0.1:{first['coordinator']}"],
                    "archipelago-island": [f"127.0.0.1:{first['island-0']}", f"127.0.0.1:{first['island-1']}"]}


def test_on_a_terminal_each_island_shows_how_far_its_round_is(tmp_path):
    live = LiveView(Console(file=io.StringIO(), width=200), terminal=True)
    monitor = RunMonitor("sim ci", [("islands", 100)], MetricsPorts(config_files=[]), live)
    monitor.islands_phase("islands", tmp_path, ["island-0", "island-1"], lambda: None, lambda: [])
    publish_json(tmp_path / "island-0.progress.json", {
        "state": "training", "rounds_done": 1, "rounds": 2, "step": 71, "steps": 100, "round": 1,
        "round_step": 21, "round_steps": 50, "loss": 5.0, "tokens_per_s": 1000.0, "version": 1})
    publish_json(tmp_path / "island-1.progress.json", {
        "state": "done", "rounds_done": 2, "rounds": 2, "step": 100, "steps": 100, "round": 1,
        "round_step": 50, "round_steps": 50, "loss": 4.0, "tokens_per_s": 0.0, "version": 2})
    monitor.poll(status=False)
    rows = {row.name: row for row in monitor.view.islands}
    assert (rows["island-0"].round_step, rows["island-0"].round_steps) == (21, 50)
    console = Console(file=io.StringIO(), width=200)
    console.print(render(monitor.view))  # the panel a terminal redraws
    text = console.file.getvalue()
    assert "■■■■□□□□□□ 21/50" in text  # 21 of 50 steps: 4 of 10
    assert round_bar(50, 50) == "■■■■■■■■■■ 50/50" and round_bar(None, 50) == "—"
    island_1 = next(line for line in text.splitlines() if "island-1" in line)
    assert "/50" not in island_1  # a finished island shows no round in progress
