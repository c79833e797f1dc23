"""Islands that finish their run: once an island's last push (PushHeader.last) is applied, rounds
stop counting it among the live islands, so a straggler's last round closes as soon as its push
arrives instead of waiting for the finished islands' leases to run out."""

from __future__ import annotations

import json
import threading

from archipelago.procs import free_port
from coordinator.config import CoordinatorConfig
from island.job import load_job, open_client
from island.train import Trainer
from sim.run import ProcessGroup
from tests.coordinator.conftest import SMALL, TOKENS, CoordinatorHarness
from tests.coordinator.processes import harness_for, restart_coordinator, start_coordinator


def states(c: CoordinatorHarness) -> dict[str, str]:
    return {s.island_id: s.state for s in c.admin_status().islands}


def test_a_straggler_closes_its_last_round_alone_once_the_others_finished(coordinator_factory):
    c = coordinator_factory(quorum=1.0, lease_ttl_s=60.0)  # every live island must push; leases outlive the test
    a, b, late = (c.register(f"island-{i}") for i in range(3))

    assert c.push(a, round=0, base_version=0, last=True).version == 0
    assert c.push(b, round=0, base_version=0, last=True).version == 0
    assert c.push(late, round=0, base_version=0).version == 1  # all three pushed: round 0 committed
    detail = json.loads(c.admin_status().json)
    assert detail["finished_islands"] == ["island-0", "island-1"]
    assert states(c) == {"island-0": "finished", "island-1": "finished", "island-2": "live"}

    # The two finished islands still hold live leases, yet round 1 closes on the straggler alone.
    assert c.push(late, round=1, base_version=1, last=True).version == 2
    assert c.status().rounds == (2,)
    assert json.loads(c.admin_status().json)["finished_islands"] == ["island-0", "island-1", "island-2"]


def test_without_the_last_flag_a_round_waits_for_every_live_island(coordinator_factory):
    c = coordinator_factory(quorum=1.0, lease_ttl_s=60.0)
    a, b, late = (c.register(f"island-{i}") for i in range(3))
    for lease in (a, b, late):
        c.push(lease, round=0, base_version=0)
    assert c.status().version == 1

    assert c.push(late, round=1, base_version=1).version == 1  # islands 0 and 1 are live: it waits
    assert c.status().rounds == (1,)
    assert json.loads(c.admin_status().json)["finished_islands"] == []
    assert set(states(c).values()) == {"live"}


def test_an_island_that_does_not_wait_for_its_last_merge_leaves_once_acknowledged(coordinator_factory, data_cache):
    """`diloco.wait_last_merge = false` (with overlap): the real client returns as soon as its last push is
    acknowledged, with the round still open; the coordinator applies the push without it."""
    c = coordinator_factory(quorum=1.0, lease_ttl_s=60.0)
    other = c.register("island-1")  # live, and has not pushed: round 0 cannot close yet
    job = load_job("ci", SMALL + [f"data.cache_dir={data_cache}", "train.batch_size=2", "train.seq_len=16",
                                  "optim.warmup_steps=1", "diloco.inner_steps=2", "diloco.rounds=1",
                                  "diloco.eval_every_rounds=0", "diloco.overlap=true", "diloco.wait_last_merge=false",
                                  "diloco.chunk_bytes=65536", "diloco.max_message_bytes=262144"])
    client = open_client(job.diloco, Trainer(job, island_id=0, num_islands=2, total_steps=2), c.address,
                          "island-0", TOKENS["island-0"])
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.run()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert done.wait(120), "the island did not leave after its last push was acknowledged"
    thread.join(timeout=30)
    assert not errors, errors
    assert client.stats.pushes == 1 and client.version == 0  # it left before round 0 closed
    detail = json.loads(c.admin_status().json)
    assert detail["pending_pushes"] == 1 and detail["version"] == 0

    assert c.push(other, round=0, base_version=0).version == 1  # the round closes with both pushes
    detail = json.loads(c.admin_status().json)
    assert detail["pending_pushes"] == 0 and detail["finished_islands"] == ["island-0"]


def test_finished_islands_are_remembered_across_a_coordinator_restart(run_files, tmp_path):
    state_dir, port = tmp_path / "coordinator", free_port()
    overrides = ("coordinator.quorum=1.0", "coordinator.lease_ttl_s=60")
    c = harness_for(run_files, CoordinatorConfig(chunk_bytes=65536, max_message_bytes=262144), port)
    group = ProcessGroup(tmp_path)
    try:
        start_coordinator(group, "coordinator", run_files, state_dir, port, *overrides)
        done, late = c.register("island-0"), c.register("island-1")
        assert c.push(done, 0, 0, 0, c.pseudo_grad(0, seed=0), last=True).version == 0
        assert c.push(late, 0, 0, 0, c.pseudo_grad(0, seed=1)).version == 1

        status = restart_coordinator(group, run_files, state_dir, port, *overrides)
        assert status["version"] == 1 and status["finished_islands"] == ["island-0"]
        # island-0 does not come back (it finished); the straggler's next round closes on its push.
        late = c.register("island-1")
        assert c.push(late, 0, 1, 1, c.pseudo_grad(0, seed=2)).version == 2
    finally:
        group.kill_all()
        c.stop()
