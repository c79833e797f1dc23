"""The coordinator's Prometheus endpoint, scraped over HTTP from an in-process coordinator driven
through its real gRPC API: commits, a pull, guard refusals and the rollback they cause each show
in the series docs/design.md (Observability) lists, and `coordinator status` reports per island
what its pushes said; `coordinator status --watch` prints a line per commit and shows the islands."""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import urllib.request

import pytest
import torch
from rich.console import Console

from archipelago.live import LiveView
from archipelago.procs import free_port
from coordinator.cli import main as coordinator_cli
from coordinator.metrics import guard_reason
from coordinator.watch import watch
from protos import archipelago_pb2 as pb
from tests.coordinator.conftest import CoordinatorHarness

SCRAPE_WAIT_S = 10.0


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(port: int, ok) -> dict:
    """Scrape until `ok(samples)` (the ticker copies the engine's state every ~0.25 s); bounded."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        samples = scrape(port)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_commits_pulls_refusals_and_rollbacks_show_in_the_metrics(coordinator_factory):
    port = free_port()
    c: CoordinatorHarness = coordinator_factory(metrics_port=port, guard_max_refusals=2, keep_checkpoints=3)
    lease = c.register("island-0")
    for seed in range(3):
        c.commit_round(lease, seed=seed)
    parts = list(c.stub().PullParams(pb.PullRequest(lease=lease, full=False, since_version=1), timeout=30))
    samples = scrape_until(port, lambda s: value(s, "archipelago_coordinator_version") == 3)
    assert value(samples, "archipelago_coordinator_version") == 3
    assert value(samples, "archipelago_coordinator_fragment_version", fragment="0") == 3
    assert value(samples, "archipelago_coordinator_rounds_committed_total", fragment="0") == 3
    assert value(samples, "archipelago_coordinator_round_latency_seconds_count") == 3
    assert value(samples, "archipelago_coordinator_merge_seconds_count") == 3
    assert value(samples, "archipelago_coordinator_push_staleness_versions_count") == 3
    assert value(samples, "archipelago_coordinator_guard_decisions_total", decision="commit", reason="none") == 3
    assert value(samples, "archipelago_coordinator_pushes_accepted_total", island="island-0") == 3
    assert value(samples, "archipelago_coordinator_received_bytes_total", island="island-0") > 0
    assert value(samples, "archipelago_coordinator_sent_bytes_total", island="island-0") == sum(
        p.ByteSize() for p in parts)
    assert value(samples, "archipelago_coordinator_outer_update_norm", fragment="0") > 0
    assert value(samples, "archipelago_coordinator_island_loss", island="island-0") > 0
    assert value(samples, "archipelago_coordinator_live_islands") == 1

    # finite, but weighted by its 1024 tokens the round's sum overflows: a non-finite aggregate
    huge = {n: torch.full(c.files.shapes[n], 3e38) for n in c.fragment_names(0)}
    rounds = c.status().rounds[0]
    c.push(lease, 0, rounds, 3, huge, scheme="fp32")
    c.push(lease, 0, rounds + 1, 3, huge, scheme="fp32")  # the second refusal in a row rolls back
    samples = scrape_until(port, lambda s: value(s, "archipelago_coordinator_rollbacks_total", reason="guard") == 1)
    assert value(samples, "archipelago_coordinator_guard_decisions_total", decision="refuse",
                 reason="non_finite_aggregate") == 2
    assert value(samples, "archipelago_coordinator_rollbacks_total", reason="guard") == 1
    assert value(samples, "archipelago_coordinator_timeline") == 1
    assert value(samples, "archipelago_coordinator_version") == 2

    progress = json.loads(c.admin_status().json)["islands_progress"]["island-0"]
    assert progress["pushes_merged"] == 3 and progress["tokens"] == 3 * 1024 and progress["round"] == rounds + 1


def test_guard_reasons_map_to_a_bounded_label():
    assert guard_reason("update-norm spike: ‖Δθ_g‖ 3 > 10 × median 0.1") == "update_norm_spike"
    assert guard_reason("loss spike: islands report 9 > 1.5 × median 4") == "loss_spike"
    assert guard_reason("non-finite outer step: tensor 'x'") == "non_finite_step"
    assert guard_reason("something new") == "other"


def test_status_watch_prints_a_line_per_commit_and_shows_the_islands(coordinator):
    lease = coordinator.register("island-0")
    coordinator.commit_round(lease, seed=0)  # before the watch: not printed
    out = io.StringIO()
    live = LiveView(Console(file=out, width=200, force_terminal=True), terminal=True, refresh_per_second=20)
    stop = threading.Event()
    args = argparse.Namespace(address=coordinator.address, interval=0.05)
    thread = threading.Thread(target=watch, args=(args, coordinator.admin_status, live, stop), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        coordinator.commit_round(lease, seed=1)
        coordinator.commit_round(lease, seed=2)
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while out.getvalue().count("committed (1 island") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
    text = out.getvalue()
    assert text.count("committed (1 island") == 2, text
    assert "version 2: fragment 0 round 1 committed" in text and "version 3: fragment 0 round 2" in text
    assert "version 1:" not in text
    assert "island-0" in text and "fragment 0: v3" in text  # the panel


def test_status_watch_refuses_a_non_positive_interval(capsys):
    with pytest.raises(SystemExit) as exc:
        coordinator_cli(["status", "--address", "127.0.0.1:1", "--watch", "--interval", "0"])
    assert exc.value.code == 2 and "--interval" in capsys.readouterr().err
