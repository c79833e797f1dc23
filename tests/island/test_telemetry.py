"""An island's live telemetry (island/telemetry.py): the progress file and the Prometheus endpoint
follow the outer loop, and leave its numbers alone.

The client runs over tests/island/test_diloco.py's `ScriptedLink` with its counting trainer (every
inner step adds one to each weight, loss 2.0, 8 tokens), so every expected value is exact.
"""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import torch

from archipelago.procs import free_port
from island.diloco import InnerSteps
from island.telemetry import Telemetry
from protos.broadcast import l2_norm
from tests.island.test_diloco import config, start_client, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_one_round(**overrides):
    """Two inner steps, a sync of fragment 0 and its merge; the client, closed, and θ_local."""
    client, link, theta0 = start_client(config(codec="int8-block", overlap=True, **overrides))
    try:
        InnerSteps().train(client, 2, 0)
        client.sync(0)
        wait_for(lambda: link.pushes and not client.pushes[0].running(), client, "the push")
        link.commit({n: torch.full_like(t, 0.25) for n, t in theta0.items()})
        wait_for(lambda: client.version == 1, client, "the merge")
        local = {n: t.clone() for n, t in client.local.items()}
    finally:
        client.close()
    return client, local


def test_progress_file_and_metrics_follow_the_outer_loop(tmp_path):
    port = free_port()
    progress = tmp_path / "{island_id}.progress.json"
    client, _ = run_one_round(metrics_port=port, metrics_host="127.0.0.1", progress_file=str(progress))
    state = json.loads((tmp_path / "island-1.progress.json").read_text())
    assert {k: state[k] for k in ("island", "state", "round", "rounds_done", "rounds", "step", "steps", "loss",
                                  "tokens", "version", "pushes")} == {
        "island": "island-1", "state": "stopped", "round": 0, "rounds_done": 1, "rounds": 3, "step": 2, "steps": 6,
        "loss": 2.0, "tokens": 16, "version": 1, "pushes": 1}
    assert state["tokens_per_s"] > 0

    samples = scrape(port)
    island = (("island", "island-1"),)
    assert samples[("archipelago_island_step_seconds_count", island)] == 2
    assert samples[("archipelago_island_tokens_total", island)] == 16
    assert samples[("archipelago_island_loss", island)] == 2.0
    assert samples[("archipelago_island_version", island)] == 1
    assert samples[("archipelago_island_round", island)] == 0  # step 2 closed round 0, which is being synced
    assert samples[("archipelago_island_pushes_total", island)] == 1
    assert samples[("archipelago_island_tokens_per_second", island)] == state["tokens_per_s"]
    assert samples[("archipelago_island_blocked_seconds_total", island)] == client.stats.blocked_s
    residual = samples[("archipelago_island_error_feedback_residual_norm", (("fragment", "0"), *island))]
    assert residual == l2_norm(client.feedback[0].state_dict()["residuals"])


def test_telemetry_does_not_change_the_model():
    _, plain = run_one_round()
    _, observed = run_one_round(metrics_port=free_port(), metrics_host="127.0.0.1")
    assert all(torch.equal(plain[n], observed[n]) for n in plain)


def test_rounds_are_counted_from_steps_with_the_sync_step_in_the_round_it_closes():
    telemetry = Telemetry(SimpleNamespace(cfg=config(round_steps=[2, 4, 2]), island_id="island-1"))
    assert [telemetry.rounds_done(s) for s in range(9)] == [0, 0, 1, 1, 1, 1, 2, 2, 3]
    assert [telemetry.round_of(s) for s in range(9)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
