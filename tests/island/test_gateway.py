"""The island gateway's side of the group link over real HTTP on 127.0.0.1 (no training)."""

from __future__ import annotations

import threading

import pytest
import torch

from island.diloco_config import DiLoCoConfig
from island.gateway import MERGES_KEPT, GatewayServer, GatewayState
from island.group_link import GatewayClient, merge_step, sync_points


@pytest.fixture
def gateway():
    state = GatewayState(num_groups=2, start_timeout_s=60)
    server = GatewayServer(state, "127.0.0.1").start()
    yield state, server, GatewayClient(server.url, timeout_s=5, poll_s=0.02)
    server.stop()


def test_first_step_waits_for_every_group_then_anyone_starts_at_once(gateway):
    state, _, client = gateway
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    state.publish_start({"version": 3, "order": [0], "fragments": [["a", "b"]]}, tensors)
    got: dict[int, tuple] = {}
    waiter = threading.Thread(target=lambda: got.setdefault(0, client.start(0)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "group 0 must wait until group 1 has asked too"
    meta, start = client.start(1)
    waiter.join(5)
    assert meta == {"version": 3, "order": [0], "fragments": [["a", "b"]]} and got[0][0] == meta
    assert all(torch.equal(start[n], tensors[n]) for n in tensors)
    assert client.start(1)[0]["version"] == 3, "a restarted group starts without waiting"


def test_sync_reports_first_one_wins_and_every_digest_is_kept(gateway):
    state, _, client = gateway
    meta = {"step": 10, "steps": 10, "loss_sum": 5.0, "tokens": 2048, "compute_s": 1.0}
    client.post_sync(0, {**meta, "group": 1}, {"a": torch.zeros(2)})
    client.post_sync(0, {**meta, "group": 0}, {"a": torch.ones(2)})
    report = state.take_sync(0)
    assert report.group == 1 and torch.equal(report.tensors["a"], torch.zeros(2))
    client.post_sync(0, {**meta, "group": 2}, {"a": torch.zeros(2)})  # late: recorded, not used again
    assert not state.has_sync(0)
    (entry,) = state.snapshot()["sync_digests"]
    assert entry["step"] == 10 and set(entry["groups"]) == {"0", "1", "2"} and not entry["identical"]


def test_merges_are_served_until_they_are_old(gateway):
    state, _, client = gateway
    for n in range(MERGES_KEPT + 2):
        state.publish_merge(n, {"version": n + 1, "fragment": 0}, {"a": torch.full((2,), float(n))})
    meta, tensors = client.merge(MERGES_KEPT + 1)
    assert meta["version"] == MERGES_KEPT + 2 and torch.equal(tensors["a"], torch.full((2,), MERGES_KEPT + 1.0))
    assert state.merge(0) is None and state.merge(2) is not None
    with pytest.raises(TimeoutError, match="merge of sync point 99"):
        GatewayClient(client.url, timeout_s=0.3, poll_s=0.05).merge(99)


@pytest.mark.parametrize("overlap,due", [(False, [5, 10, 15, 20]), (True, [10, 15, 20, 20])])
def test_merge_schedule_is_fixed_by_the_config(overlap, due):
    cfg = DiLoCoConfig(inner_steps=10, fragments=2, rounds=2, overlap=overlap)
    assert sync_points(cfg) == [5, 10, 15, 20]
    assert [merge_step(sync_points(cfg), n, cfg.overlap) for n in range(4)] == due
    uneven = DiLoCoConfig(inner_steps=10, rounds=2, round_steps=[4, 10])
    assert sync_points(uneven) == [4, 14]
