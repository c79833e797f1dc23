"""A hostile or broken island against a real coordinator over gRPC: it cannot skew the model with
the numbers its push header claims, cannot exhaust the coordinator's memory with open streams, and
gets a clear status for a pull ahead of the server; the status JSON stays strict JSON."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import grpc
import pytest

from archipelago import config as cfglib
from archipelago.checkpoint import write_checkpoint
from coordinator.admission import Busy
from coordinator.bench import CoordinatorProcess, model_sized
from coordinator.config import CoordinatorConfig
from coordinator.ingest import PushStreams
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.codec import encode
from protos.framing import split_chunks
from tests.coordinator.conftest import CoordinatorHarness


def refused(call, code: grpc.StatusCode, *words: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()
    return err.value


@pytest.mark.parametrize(("field", "value", "words"), [
    ("tokens", 2**64 - 1, ("tokens=18446744073709551615", "2**53")),
    ("tokens", 10_000_001, ("tokens=10000001", "coordinator.max_tokens_per_push")),
    ("loss_mean", math.inf, ("loss_mean=inf",)),
    ("eval_loss", -math.inf, ("eval_loss=-inf",)),
    ("loss_mean", 1e300, ("loss_mean=1e+300",)),
    ("compute_s", -1e300, ("compute_s=-1e+300",)),
    ("compute_s", math.nan, ("compute_s=nan",)),
])
def test_a_header_number_out_of_bounds_is_refused_naming_it(coordinator_factory, field, value, words):
    c = coordinator_factory(max_tokens_per_push=10_000_000 if "max_tokens" in words[-1] else 0)
    lease = c.register("island-0")
    before = c.status()
    refused(lambda: c.push(lease, **{field: value}), grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert c.status() == before  # version, θ_g, θ_b, momentum, rounds and push counts


def test_a_nan_loss_means_not_measured_and_the_status_stays_strict_json(coordinator):
    c = coordinator
    lease = c.register("island-0")
    assert c.push(lease, loss_mean=math.nan, eval_loss=math.nan).version == 1

    def no_constants(name: str) -> None:
        raise AssertionError(f"the status JSON holds a bare {name}")

    detail = json.loads(c.admin_status().json, parse_constant=no_constants)
    committed = [e for e in detail["history"] if e["kind"] == "committed"]
    assert committed[-1]["loss_mean"] is None and committed[-1]["eval_loss"] is None


def committed_step(c: CoordinatorHarness, claimed: int) -> tuple[str, dict]:
    """Two islands in one round: island-0 pushes a zero pseudo-gradient claiming ``claimed`` tokens,
    island-1 a real one with 1024. θ_g after the commit, and the commit's history entry."""
    zero = {n: t * 0 for n, t in c.pseudo_grad(0, seed=1).items()}
    a, b = c.register("island-0"), c.register("island-1")
    assert c.push(a, tensors=zero, tokens=claimed, scheme="fp32").accepted
    assert c.push(b, tensors=c.pseudo_grad(0, seed=1), tokens=1024, scheme="fp32").version == 1
    entry = [e for e in json.loads(c.admin_status().json)["history"] if e["kind"] == "committed"][-1]
    return c.status().theta_g, entry


def test_an_island_that_overclaims_tokens_weighs_at_most_the_cap(coordinator_factory):
    kw = {"outer_momentum": 0.0, "outer_lr": 1.0}
    hostile, info = committed_step(coordinator_factory(**kw), 2**53)
    # The cap (token_cap_factor 2 × the round's lower median, 1024) counts the liar as 2048 tokens:
    # exactly the step of an island that honestly reported 2048, i.e. a share of 2/(2+1) of the mean.
    capped, _ = committed_step(coordinator_factory(**kw), 2048)
    equal, _ = committed_step(coordinator_factory(**kw), 1024)
    assert info["tokens_capped"] == {"island-0": 2048}
    assert hostile == capped != equal
    # Without the cap the liar's zero pseudo-gradient takes all the weight: the step is (nearly) nothing.
    c = coordinator_factory(token_cap_factor=0.0, **kw)
    before = c.status().theta_g
    uncapped, info = committed_step(c, 2**53)
    assert "tokens_capped" not in info and info["step_norm"] < 1e-9 and uncapped != before


def test_a_pull_ahead_of_the_coordinator_is_refused_with_reload(coordinator):
    c = coordinator
    lease = c.register("island-0")
    for since in (5, 2**64 - 1):
        err = refused(lambda since=since: list(c.stub().PullParams(pb.PullRequest(lease=lease, since_version=since),
                                                                   timeout=30)),
                      grpc.StatusCode.FAILED_PRECONDITION, f"since_version {since}", "version 0")
        assert ("archipelago-action", "reload") in tuple(err.trailing_metadata())
    assert [p.WhichOneof("part") for p in c.stub().PullParams(pb.PullRequest(lease=lease, since_version=0))] == []


# ---- open streams: memory stays bounded ------------------------------------------------------------

PARAMS = 16 << 20  # the run's model: 16M fp32 parameters, so one push's body is 64 MiB
RSS_BOUND_MB = 64  # the server's growth while two pushes' bodies (~128 MiB) are in flight: not one body


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Stalled(threading.Thread):
    """One push stream of a full-size fp32 body: sends every chunk but the last, then waits until
    `release` (and is cancelled); or is refused, in `error`."""

    def __init__(self, channel: grpc.Channel, island: str, token: str, parts: list[pb.PushPart]) -> None:
        super().__init__(daemon=True)
        self.stub, self.island, self.token, self.parts = pb_grpc.CoordinatorStub(channel), island, token, parts
        self.sent, self.release = threading.Event(), threading.Event()
        self.error: grpc.RpcError | None = None
        self.call = None

    def messages(self, lease: pb.Lease):
        header = pb.PushPart()
        header.CopyFrom(self.parts[0])
        header.header.lease.CopyFrom(lease)
        yield header
        yield from self.parts[1:-1]
        self.sent.set()
        self.release.wait(120)

    def run(self) -> None:
        reply = self.stub.Register(pb.RegisterRequest(island_id=self.island, token=self.token,
                                                      config_hash=CONFIG_HASH), timeout=30)
        lease = pb.Lease(island_id=self.island, lease_id=reply.lease_id, epoch=reply.epoch)
        self.call = self.stub.PushPseudoGrad.future(self.messages(lease), timeout=180)
        try:
            self.call.result()
        except grpc.RpcError as exc:
            self.error = exc
        except grpc.FutureCancelledError:
            pass  # the test ended it
        self.sent.set()


CONFIG_HASH = cfglib.config_hash({"test": "streams"})


def test_streams_beyond_the_limits_are_refused_and_memory_stays_bounded(tmp_path):
    theta = model_sized(PARAMS, seed=0, scale=0.02)
    init = write_checkpoint(tmp_path / "init", {"model.safetensors": theta}, {
        "kind": "init", "config_hash": CONFIG_HASH, "model": None, "fragments": 1, "tensor_names": list(theta)})
    tokens = {f"island-{i}": f"token-{i}" for i in range(3)}
    (tmp_path / "islands.json").write_text(json.dumps(tokens))
    cfg = CoordinatorConfig(host="127.0.0.1", port=0, state_dir=str(tmp_path / "state"), min_islands=3,
                            islands_file=str(tmp_path / "islands.json"), max_push_streams=2,
                            max_push_streams_per_island=1)
    coordinator = CoordinatorProcess(cfg, init, tmp_path, "admin-credential")
    address = None
    payload = encode(model_sized(PARAMS, seed=1, scale=1e-3), "fp32", zstd=False)
    chunks = split_chunks(payload.body, cfg.chunk_bytes)
    parts = [pb.PushPart(header=pb.PushHeader(
        fragment=0, round=0, base_version=0, tokens=1024, loss_mean=3.0, eval_loss=math.nan, scheme="fp32",
        codec_header=payload.header_bytes(), body_len=len(payload.body), body_sha256=payload.header["body_sha256"],
        num_chunks=len(chunks)))] + [pb.PushPart(chunk=pb.Chunk(index=c.index, data=c.data, crc32=c.crc32))
                                     for c in chunks]
    streams: list[Stalled] = []
    channels: list[grpc.Channel] = []
    try:
        address = coordinator.wait_address(120)
        options = [("grpc.max_send_message_length", cfg.max_message_bytes)]

        def stream(island: str) -> Stalled:
            channels.append(grpc.insecure_channel(address, options=options))
            s = Stalled(channels[-1], island, tokens[island], parts)
            streams.append(s)
            s.start()
            assert s.sent.wait(120)
            return s

        warm = stream("island-0")  # a first stream, ended: what a stream's first use costs is not growth
        warm.call.cancel()
        warm.join(30)
        time.sleep(1.0)
        idle = rss_mb(coordinator.proc.pid)
        first, second = stream("island-0"), stream("island-1")  # two bodies in flight: the limit
        assert first.error is None and second.error is None
        grown = rss_mb(coordinator.proc.pid) - idle
        print(f"coordinator RSS {idle:.0f} MB idle, +{grown:.0f} MB with two streams in flight")
        again = stream("island-0")  # its push again, while the first stream still carries it
        beyond = stream("island-2")  # a third stream of any island
        for s, code, words in ((again, grpc.StatusCode.ABORTED, "another stream"),
                               (beyond, grpc.StatusCode.RESOURCE_EXHAUSTED, "coordinator.max_push_streams")):
            s.join(30)
            assert s.error is not None and s.error.code() == code and words in s.error.details(), s.error
            assert ("archipelago-action", "retry") in tuple(s.error.trailing_metadata())
        assert grown < RSS_BOUND_MB, f"RSS grew {grown:.0f} MB with {2 * len(payload.body) >> 20} MiB in flight"
        for s in (first, second):  # the stalled streams end: their partial bodies leave no file behind
            s.call.cancel()
        deadline = time.monotonic() + 30
        spill = tmp_path / "state" / "spill"
        while list(spill.rglob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(spill.rglob("*.tmp"))
    finally:
        for s in streams:
            s.release.set()
        for channel in channels:
            channel.close()
        coordinator.stop(None)


def test_stream_limits_count_per_island_and_in_all():
    streams = PushStreams(total=3, per_island=2)
    streams.open(("a", 0, 0))
    streams.open(("a", 0, 1))
    with pytest.raises(Busy, match="max_push_streams_per_island"):
        streams.open(("a", 0, 2))
    with pytest.raises(Busy, match="another stream"):
        streams.open(("a", 0, 1))
    streams.open(("b", 0, 0))
    with pytest.raises(Busy, match=r"coordinator.max_push_streams\)"):
        streams.open(("c", 0, 0))
    streams.close(("a", 0, 1))
    streams.open(("c", 0, 0))
    assert streams.of_island == {"a": 1, "b": 1, "c": 1}
