"""`ShardedLink`'s bookkeeping in one process (island/shard_link.py): the ';' address list, the
composite version and its renumbering, a push's base version rewritten into its owner shard's,
events and heartbeats in composite terms. Each shard's `CoordinatorLink` is real (its channel never
connects); its `fetch` and `push`, the network, are replaced by scripts. Over real gRPC the link is
exercised by tests/sim/test_shards.py and tests/coordinator/test_shard_faults.py."""

from __future__ import annotations

import pytest
import torch

from island.connection import PushOutcome
from island.diloco_config import DiLoCoConfig
from island.shard_link import ShardedLink, View, split_shards
from protos import archipelago_pb2 as pb
from protos.codec import decode, encode


def test_the_address_list_names_shards_by_semicolon_and_failover_by_comma():
    assert split_shards(" a:1,a2:1 ; b:2") == ["a:1,a2:1", "b:2"]
    for bad in ("a:1", "a:1;", ";b:2", "a:1;;b:2"):
        with pytest.raises(ValueError, match="separated by ';'"):
            split_shards(bad)


@pytest.fixture
def link():
    link = ShardedLink(DiLoCoConfig(fragments=4, inner_steps=4), "127.0.0.1:1,127.0.0.1:2;127.0.0.1:3", "island-0")
    yield link
    link.close(1.0)


def delta(version: int, fragment: int, timeline: int = 0):
    return (pb.PayloadHeader(version=version, fragment=fragment, timeline=timeline),
            encode({f"w{fragment}": torch.full((2,), float(version))}, "fp32"))


def test_shards_fragments_and_lanes(link):
    assert [(s.addresses, s.shard) for s in link.shards] == [(["127.0.0.1:1", "127.0.0.1:2"], (0, 2)),
                                                             (["127.0.0.1:3"], (1, 2))]
    assert [link.push_lane(f) for f in range(4)] == [0, 1, 0, 1]


def test_deltas_are_renumbered_and_pushes_rewritten_into_the_owner_shard(link):
    link._remember(View((3, 5), (0, 1)))  # the island holds composite version 8, timeline 1
    link.shards[0].fetch = lambda since, full=False, patient=True: [delta(4, 0), delta(5, 2)]
    link.shards[1].fetch = lambda since, full=False, patient=True: [delta(6, 1, timeline=1)]
    got = link.fetch(8)
    assert [(h.version, h.fragment, h.timeline) for h, _ in got] == [(9, 0, 1), (10, 2, 1), (11, 1, 1)]
    assert decode(got[2][1])["w1"].tolist() == [6.0, 6.0]  # the shard's own payload, untouched
    assert link.view == View((5, 6), (0, 1))

    sent = []

    def push(header, payload):
        sent.append(pb.PushHeader(base_version=header.base_version, timeline=header.timeline,
                                  fragment=header.fragment))
        return PushOutcome("accepted", "ok", 7)

    link.shards[1].push = push
    header = pb.PushHeader(fragment=3, round=2, base_version=9, timeline=1)  # base: composite 9 = (4, 5)
    outcome = link.push(header, encode({"w3": torch.zeros(2)}, "fp32"))
    assert [(h.fragment, h.base_version, h.timeline) for h in sent] == [(3, 5, 1)]  # shard 1's version 5
    assert header.base_version == 9 and header.timeline == 1  # the caller's header is not changed
    assert outcome.status == "accepted" and outcome.version == 9 + 7 - 5
    assert link.push(pb.PushHeader(fragment=1, base_version=123, timeline=1), None).status == "stale"


def test_a_shard_that_is_unreachable_is_skipped(link):
    import grpc

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    def down(since, full=False, patient=True):
        assert not patient  # a delta pull does not wait for a shard that is away
        raise Unavailable()

    link._remember(View((1, 1), (0, 0)))
    link.shards[0].fetch = down
    link.shards[1].fetch = lambda since, full=False, patient=True: [delta(2, 1)]
    assert [(h.version, h.fragment) for h, _ in link.fetch(2)] == [(3, 1)]
    assert link.view == View((1, 2), (0, 0))


def test_events_and_heartbeats_in_composite_terms(link):
    link._remember(View((2, 2), (0, 0)))
    commit = link.translate(1, pb.Event(kind=pb.Event.COMMITTED, version=3, fragment=1, timeline=0))
    assert (commit.version, commit.timeline) == (5, 0)  # one commit the island has not fetched
    seen = link.translate(1, pb.Event(kind=pb.Event.COMMITTED, version=2, fragment=1, timeline=0))
    assert seen.version == 4  # already fetched: not above the island's version
    rollback = link.translate(0, pb.Event(kind=pb.Event.ROLLBACK, version=1, timeline=1, message="guard"))
    assert rollback.timeline == 1 and rollback.message == "shard 0: guard"
    heard = []
    link.on_heartbeat = heard.append
    link._heard(0, pb.HeartbeatReply(version=2, timeline=0, fragments=[
        pb.FragmentState(fragment=0, round=3, version=2), pb.FragmentState(fragment=2, round=2, version=1)]))
    link._heard(1, pb.HeartbeatReply(version=4, timeline=0, fragments=[
        pb.FragmentState(fragment=1, round=4, version=4), pb.FragmentState(fragment=3, round=2, version=2)]))
    last = heard[-1]
    assert (last.version, last.timeline) == (6, 0)  # shard 1 is two commits ahead of the island
    assert [(f.fragment, f.round, f.version) for f in last.fragments] == [(0, 3, 4), (1, 4, 6), (2, 2, 4), (3, 2, 4)]


def test_island_run_takes_the_shards_from_the_preset_without_coordinator(tmp_path):
    from argparse import Namespace

    from archipelago.config import ConfigError
    from island.run_cli import check_island_index

    preset = tmp_path / "run.toml"
    preset.write_text('base = "ci"\n[coordinator]\nshards = ["a:1,a2:1", "b:2"]\n')
    args = Namespace(island_index=0, num_islands=1, coordinator=None, preset=str(preset))
    check_island_index(args)
    assert args.coordinator == "a:1,a2:1;b:2"
    given = Namespace(island_index=0, num_islands=1, coordinator="c:3", preset=str(preset))
    check_island_index(given)
    assert given.coordinator == "c:3"  # the flag wins
    with pytest.raises(ConfigError, match="--coordinator is required"):
        check_island_index(Namespace(island_index=0, num_islands=1, coordinator=None, preset="ci"))
