"""A coordinator sharded by fragment, shard by shard (docs/design.md, "Sharded coordinator").

1. The shard config keys are checked, each error naming its field.
2. Two real shard processes of a two-fragment run on loopback: each holds and serves only its own
   fragment; a push for the other shard's fragment is refused with NotMyFragment over real gRPC;
   Register says which shard answered; an island link that reaches another shard than it expects
   fails clearly; `coordinator status` across the shards merges them; a shard count above the
   fragment count stops a coordinator at startup.
"""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from archipelago import procs
from archipelago.config import ConfigError
from coordinator.cli import main as coordinator_cli
from coordinator.config import CoordinatorConfig
from coordinator.server import load_init
from island.connection import CoordinatorLink, ShardMismatch
from island.diloco_config import DiLoCoConfig
from island.job import load_job, write_initial_model
from protos import archipelago_pb2 as pb
from protos.broadcast import digest
from protos.fragments import split_fragments
from protos.framing import read_stream
from sim.run import ProcessGroup
from tests.coordinator.conftest import ADMIN_CREDENTIAL, SMALL, TOKENS, RunFiles
from tests.coordinator.processes import coordinator_argv, harness_for, start_coordinator


def test_shard_config_is_checked_field_by_field():
    assert CoordinatorConfig(shards=["a:1", "b:2,b2:2"]).num_shards == 2  # shards alone set the count
    cfg = CoordinatorConfig(num_shards=3, shard_index=2, etcd_prefix="/run")
    assert cfg.owned_fragments(7) == [2, 5] and cfg.owner(4) == 1
    assert cfg.shard_etcd_prefix == "/run/shard-2" and CoordinatorConfig(etcd_prefix="/run").shard_etcd_prefix == "/run"
    for bad, field in [({"num_shards": 0}, "coordinator.num_shards"),
                       ({"num_shards": 2, "shard_index": 2}, "coordinator.shard_index"),
                       ({"shard_index": -1}, "coordinator.shard_index"),
                       ({"shards": ["a:1", "b:2"], "num_shards": 3}, "coordinator.shards"),
                       ({"shards": ["a:1", ""]}, "coordinator.shards")]:
        with pytest.raises(ConfigError, match=field):
            CoordinatorConfig(**bad)
    with pytest.raises(ConfigError, match=r"coordinator.num_shards \(3\) is above the run's fragment count \(2\)"):
        CoordinatorConfig(num_shards=3).check_fragments(2)


@pytest.fixture(scope="module")
def two_fragments(tmp_path_factory) -> RunFiles:
    root = tmp_path_factory.mktemp("two-fragments")
    job = load_job("ci", SMALL + [f"data.cache_dir={root / 'data'}", "diloco.fragments=2"])
    init = write_initial_model(job, root / "init")
    islands_file = root / "islands.json"
    islands_file.write_text(json.dumps(TOKENS))
    theta, manifest = load_init(init)
    return RunFiles(job, init, islands_file, manifest["config_hash"], split_fragments(list(theta), 2),
                    {n: tuple(t.shape) for n, t in theta.items()})


def test_each_shard_serves_only_its_fragments(two_fragments, tmp_path, capsys):
    files = two_fragments
    ports = [procs.free_port(), procs.free_port()]
    group = ProcessGroup(tmp_path)
    cfg = CoordinatorConfig(chunk_bytes=65536, max_message_bytes=262144)
    shard = [harness_for(files, cfg, p) for p in ports]
    try:
        for i, port in enumerate(ports):
            start_coordinator(group, f"shard-{i}", files, tmp_path / f"shard-{i}", port, "coordinator.num_shards=2",
                              f"coordinator.shard_index={i}", "coordinator.min_islands=1", wait=False)
        for i, port in enumerate(ports):
            procs.wait_serving(lambda p=port: procs.tcp_accepts("127.0.0.1", p), group.procs[f"shard-{i}"],
                               f"shard-{i}", 120, tail=lambda i=i: group.tail(f"shard-{i}", 30))
        theta0, _ = load_init(files.init)
        reply = shard[1].register_reply("island-0")
        assert (reply.num_shards, reply.shard_index) == (2, 1)
        assert [fs.fragment for fs in reply.fragments] == [1]  # its own fragment only
        assert reply.theta_b_sha256 == digest({n: t.float() for n, t in theta0.items()})  # θ₀ of the whole model
        lease = pb.Lease(island_id="island-0", lease_id=reply.lease_id, epoch=reply.epoch)

        with pytest.raises(grpc.RpcError) as err:  # the other shard's fragment: refused before the body
            shard[1].push(lease, fragment=0, round=0, base_version=0)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == ("fragment 0 is not served by this coordinator: this is shard 1 of 2, "
                                       "fragment 0 belongs to shard 0")
        accepted = shard[1].push(lease, fragment=1, round=0, base_version=0, tensors=shard[1].pseudo_grad(1))
        assert accepted.accepted
        status = shard[1].admin_status()
        assert status.version == 1 and [f.fragment for f in status.fragments] == [1]
        assert json.loads(status.json)["fragments_owned"] == [1]
        parts = list(shard[1].stub().PullParams(pb.PullRequest(lease=lease, full=True), timeout=30))
        [(header, payload)] = read_stream(parts)
        assert header.full and header.version == 1
        assert sorted(t["name"] for t in payload.header["tensors"]) == sorted(files.fragments[1])
        assert shard[1].register_reply("island-1").theta_b_sha256 != reply.theta_b_sha256  # no longer θ₀

        addresses = ";".join(f"127.0.0.1:{p}" for p in ports)
        assert coordinator_cli(["status", "--address", addresses, "--credential", ADMIN_CREDENTIAL, "--json"]) == 0
        merged = json.loads(capsys.readouterr().out)
        combined = merged["combined"]
        assert combined["version"] == 1 and combined["shard_versions"] == [0, 1] and combined["rounds"] == [0, 1]
        assert combined["problems"] == [] and [s["shard_index"] for s in merged["shards"]] == [0, 1]
        assert {i["island_id"]: i["states"] for i in combined["islands"]}["island-0"] == [None, "live"]
        swapped = ";".join(f"127.0.0.1:{p}" for p in reversed(ports))
        assert coordinator_cli(["status", "--address", swapped, "--credential", ADMIN_CREDENTIAL]) == 1
        assert "says it is shard 1 of 2" in " ".join(capsys.readouterr().out.split())  # the console wraps

        island = DiLoCoConfig(fragments=2, reconnect_timeout_s=10)
        for address, expected, said in [(f"127.0.0.1:{ports[1]}", (0, 2), "expects shard 0 of 2"),
                                        (f"127.0.0.1:{ports[0]}", (0, 1), "expects an unsharded coordinator")]:
            link = CoordinatorLink(island, address, "island-2", TOKENS["island-2"], shard=expected)
            try:
                with pytest.raises(ShardMismatch, match=said):
                    link.register(files.config_hash)
            finally:
                link.close(5)
    finally:
        group.kill_all()
        for h in shard:
            for channel in h._channels:
                channel.close()


def test_more_shards_than_fragments_stop_the_coordinator_at_startup(two_fragments, tmp_path):
    argv = coordinator_argv(two_fragments, tmp_path / "state", procs.free_port(), "coordinator.num_shards=3")
    group = ProcessGroup(tmp_path)
    try:
        proc = group.start("coordinator", argv)
        assert proc.wait(timeout=120) == 2
    except subprocess.TimeoutExpired:
        pytest.fail("the coordinator did not stop")
    finally:
        group.kill_all()
    assert "coordinator.num_shards (3) is above the run's fragment count (2)" in group.tail("coordinator")

