"""Bad input at the coordinator's trust boundary, over real gRPC against the real server.

Every refusal must carry the exact gRPC status code, a details message that names the problem,
and leave the run untouched: the same global version and open rounds, the same accepted-push
counts, and bit-identical θ_g, θ_b and outer momentum (`CoordinatorHarness.status`).
"""

from __future__ import annotations

import math
import struct
import threading
import time
import zlib
from collections.abc import Callable

import grpc
import msgpack
import pytest
import torch

from protos import archipelago_pb2 as pb
from protos.codec import Payload
from protos.framing import split_chunks
from tests.coordinator.conftest import ADMIN_CREDENTIAL, CoordinatorHarness, part_offset, repack

Code = grpc.StatusCode


def refused(call: Callable[[], object], code: grpc.StatusCode, *needles: str) -> str:
    """Run ``call``; it must fail with ``code`` and details naming every one of ``needles``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    details = err.details() or ""
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {details}"
    for needle in needles:
        assert needle in details, f"{code.name} details {details!r} do not mention {needle!r}"
    return details


def second_tensor(c: CoordinatorHarness) -> str:
    """A tensor of fragment 0 that is not the first one (so a message naming it is not luck)."""
    return c.fragment_names(0)[2]


# ---- the one that must work ----------------------------------------------------------------------


def test_valid_push_from_the_only_island_commits_version_1(coordinator):
    c = coordinator
    lease = c.register("island-0")
    before = c.status()
    assert before.version == 0 and before.rounds == (0,)
    assert before.theta_g == before.theta_b  # θ_g = θ_b = θ_0

    reply = c.push(lease, round=0, base_version=0)

    assert reply.accepted and reply.round == 0 and reply.version == 1, reply
    after = c.status()
    assert after.version == 1 and after.rounds == (1,)
    assert after.pushes == {"island-0": 1}
    assert after.theta_g != before.theta_g and after.theta_b != before.theta_b
    assert after.momentum != before.momentum


# ---- registration and status -----------------------------------------------------------------------


def test_register_unknown_island_is_not_found(coordinator):
    c = coordinator
    before = c.status()
    refused(lambda: c.register("island-9", token="tok0"), Code.NOT_FOUND, "island-9", "unknown")
    assert c.status() == before
    assert [i.island_id for i in c.admin_status().islands] == []


def test_register_wrong_token_is_unauthenticated(coordinator):
    c = coordinator
    before = c.status()
    refused(lambda: c.register("island-1", token="tok0"), Code.UNAUTHENTICATED, "island-1", "token")
    assert c.status() == before
    assert [i.island_id for i in c.admin_status().islands] == []


def test_register_config_hash_mismatch_is_failed_precondition(coordinator):
    c = coordinator
    before = c.status()
    refused(lambda: c.register("island-0", config_hash="0123456789abcdef"), Code.FAILED_PRECONDITION,
            "config hash", "0123456789abcdef", "island-0")
    assert c.status() == before
    assert [i.island_id for i in c.admin_status().islands] == []


def test_admin_rpcs_with_a_wrong_credential_are_unauthenticated(coordinator):
    c = coordinator
    lease = c.register("island-0")
    before = c.status()
    admin = c.admin()
    wrong = "admin-secreT"
    calls = {
        "Status": lambda: admin.Status(pb.AdminRequest(credential=wrong), timeout=10),
        "Checkpoint": lambda: admin.Checkpoint(pb.AdminRequest(credential=wrong), timeout=10),
        "Drain": lambda: admin.Drain(pb.DrainRequest(credential=wrong, island_id="island-0"), timeout=10),
        "Rollback": lambda: admin.Rollback(pb.RollbackRequest(credential=wrong, to_version=0), timeout=10),
        "Shutdown": lambda: admin.Shutdown(pb.AdminRequest(credential=""), timeout=10),
    }
    for name, call in calls.items():
        details = refused(call, Code.UNAUTHENTICATED, "credential")
        assert ADMIN_CREDENTIAL not in details, f"{name} leaks the credential"
    # nothing happened: not drained, not shut down, same state
    assert c.status() == before
    assert c.stub().Heartbeat(pb.HeartbeatRequest(lease=lease), timeout=10).version == 0
    assert {i.island_id: i.state for i in c.admin_status().islands} == {"island-0": "live"}


def test_get_status_with_a_bad_token_is_unauthenticated(coordinator):
    c = coordinator
    c.register("island-0")
    before = c.status()
    stub = c.stub()
    for island, token in (("island-0", "tok1"), ("island-0", ""), ("island-9", "tok0"), ("", "")):
        refused(lambda i=island, t=token: stub.GetStatus(pb.StatusRequest(island_id=i, token=t), timeout=10),
                Code.UNAUTHENTICATED, "token")
    assert stub.GetStatus(pb.StatusRequest(island_id="island-1", token="tok1"), timeout=10).version == 0
    assert c.status() == before


# ---- payload contents ------------------------------------------------------------------------------


def test_push_with_a_wrong_shape_is_invalid_argument_naming_the_tensor(coordinator):
    c = coordinator
    lease = c.register("island-0")
    name = second_tensor(c)
    tensors = c.pseudo_grad()
    rows, cols = tensors[name].shape
    tensors[name] = torch.zeros(rows, cols + 1)  # one column too many
    before = c.status()
    refused(lambda: c.push(lease, tensors=tensors), Code.INVALID_ARGUMENT, name, "shape", str((rows, cols + 1)))
    assert c.status() == before


def test_push_with_a_wrong_dtype_is_invalid_argument_naming_the_tensor(coordinator):
    c = coordinator
    lease = c.register("island-0")
    name = second_tensor(c)
    payload = c.payload()
    header = dict(payload.header)
    header["tensors"] = [dict(t, dtype="float16") if t["name"] == name else t for t in header["tensors"]]
    before = c.status()
    refused(lambda: c.push(lease, payload=Payload(header, payload.body)), Code.INVALID_ARGUMENT,
            name, "float16", "dtype")
    assert c.status() == before


@pytest.mark.parametrize(("scheme", "part", "index", "value"), [
    ("int8-block", "scales", 0, math.nan),  # a NaN block scale: the whole block decodes to NaN
    ("fp32", "values", 7, math.inf),
    ("fp32", "values", 0, -math.inf),
    ("fp32", "values", 3, math.nan),
])
def test_push_with_nan_or_inf_is_invalid_argument_naming_the_tensor(coordinator, scheme, part, index, value):
    c = coordinator
    lease = c.register("island-0")
    name = second_tensor(c)
    good = c.payload(scheme=scheme)

    def poison(raw: bytearray) -> None:
        struct.pack_into("<f", raw, part_offset(good, name, part) + 4 * index, value)

    payload = repack(good, poison)  # well-formed: right sizes, right sha256, a non-finite value
    before = c.status()
    refused(lambda: c.push(lease, payload=payload, scheme=scheme), Code.INVALID_ARGUMENT, name, "NaN")
    assert c.status() == before


# ---- the stream ------------------------------------------------------------------------------------


def test_push_with_a_chunk_over_the_message_limit_is_resource_exhausted(coordinator):
    c = coordinator
    lease = c.register("island-0")
    limit = c.cfg.max_message_bytes
    header = c.push_parts(lease)[0]
    big = b"\x01" * (limit + 1)
    parts = [header, pb.PushPart(chunk=pb.Chunk(index=0, data=big, crc32=0))]
    before = c.status()
    # A channel without the client-side limit, so the message reaches the server.
    refused(lambda: c.send(parts, channel=c.channel(options=[])), Code.RESOURCE_EXHAUSTED,
            "larger than max", str(limit))
    assert c.status() == before


def test_truncated_push_is_data_loss(coordinator):
    c = coordinator
    lease = c.register("island-0")
    parts = c.push_parts(lease)
    n = len(parts) - 1
    assert n >= 3, "the payload should span several chunks"
    before = c.status()
    refused(lambda: c.send(parts[:-1]), Code.DATA_LOSS, "chunks", f"{n - 1} of {n}", "truncated")
    assert c.status() == before


@pytest.mark.parametrize(("fix_crc", "needle"), [(False, "crc32"), (True, "sha256")])
def test_push_with_a_flipped_byte_is_data_loss(coordinator, fix_crc, needle):
    c = coordinator
    lease = c.register("island-0")
    before = c.status()
    refused(lambda: c.push(lease, flip=(1, 1234), fix_crc=fix_crc), Code.DATA_LOSS, needle)
    assert c.status() == before


def test_push_starting_with_a_chunk_is_invalid_argument(coordinator):
    c = coordinator
    lease = c.register("island-0")
    parts = c.push_parts(lease)
    before = c.status()
    refused(lambda: c.send(parts[1:]), Code.INVALID_ARGUMENT, "PushHeader")
    refused(lambda: c.send([]), Code.INVALID_ARGUMENT, "PushHeader")
    assert c.status() == before


# ---- duplicates, staleness, fencing ------------------------------------------------------------------


def test_duplicate_push_while_the_round_is_open_is_already_exists(coordinator):
    c = coordinator
    leases = {i: c.register(i) for i in ("island-0", "island-1", "island-2")}
    first = c.push(leases["island-0"], round=0, base_version=0)
    assert first.accepted and first.version == 0  # 1 of 3 live islands: the round stays open
    before = c.status()
    assert before.pushes["island-0"] == 1
    refused(lambda: c.push(leases["island-0"], round=0, base_version=0, tensors=c.pseudo_grad(seed=1)),
            Code.ALREADY_EXISTS, "island-0", "round 0", "already")
    assert c.status() == before


def test_duplicate_push_after_the_round_committed_is_already_exists(coordinator):
    c = coordinator
    lease = c.register("island-0")  # the only live island: quorum 1 closes the round
    assert c.push(lease, round=0, base_version=0).version == 1
    before = c.status()
    assert before.version == 1 and before.rounds == (1,)
    for base in (0, 1):
        refused(lambda b=base: c.push(lease, round=0, base_version=b), Code.ALREADY_EXISTS,
                "island-0", "round 0", "already")
    after = c.status()
    assert after == before and after.version == 1  # advanced exactly once


def test_push_older_than_the_staleness_limit_is_failed_precondition(coordinator):
    c = coordinator
    lease = c.register("island-0")
    limit = c.cfg.staleness_limit
    for seed in range(limit + 1):
        c.commit_round(lease, seed=seed)
    before = c.status()
    assert before.version == limit + 1
    round_ = before.rounds[0]
    refused(lambda: c.push(lease, round=round_, base_version=0), Code.FAILED_PRECONDITION,
            "base version 0", "staleness", f"{limit + 1} versions old")
    assert c.status() == before
    # exactly at the limit is still accepted
    assert c.push(lease, round=round_, base_version=before.version - limit).version == before.version + 1


def test_push_with_a_fenced_lease_epoch_is_failed_precondition(coordinator):
    c = coordinator
    old = c.register("island-0")
    new = c.register("island-0")
    assert new.epoch == old.epoch + 1
    before = c.status()
    refused(lambda: c.push(old), Code.FAILED_PRECONDITION, "island-0", f"epoch {old.epoch}", "fenced")
    # the old lease id with the new epoch is not the island either
    forged = pb.Lease(island_id="island-0", lease_id=old.lease_id, epoch=new.epoch)
    refused(lambda: c.push(forged), Code.UNAUTHENTICATED, "island-0", "lease")
    assert c.status() == before
    assert c.push(new).version == 1


# ---- secrets, malformed headers and unbounded streams -------------------------------------------------


@pytest.mark.parametrize("where", ["admin", "register", "get_status", "lease"])
def test_non_ascii_secrets_are_unauthenticated(coordinator, where):
    c = coordinator
    lease = c.register("island-0")
    before = c.status()
    secret = "tök0"
    calls = {
        "admin": lambda: c.admin().Status(pb.AdminRequest(credential=secret), timeout=10),
        "register": lambda: c.register("island-0", token=secret),
        "get_status": lambda: c.stub().GetStatus(pb.StatusRequest(island_id="island-0", token=secret), timeout=10),
        "lease": lambda: c.push(pb.Lease(island_id="island-0", lease_id=secret, epoch=lease.epoch)),
    }
    refused(calls[where], Code.UNAUTHENTICATED)
    assert c.status() == before


def test_malformed_codec_header_is_invalid_argument(coordinator):
    c = coordinator
    lease = c.register("island-0")
    payload = c.payload()
    bad = msgpack.packb(dict(payload.header, body_sha256="not-hex"), use_bin_type=True)
    before = c.status()
    refused(lambda: c.push(lease, payload=payload, codec_header=bad), Code.INVALID_ARGUMENT, "body_sha256")
    assert c.status() == before


def test_data_past_body_len_is_refused_before_the_stream_ends(coordinator):
    c = coordinator
    lease = c.register("island-0")
    payload = c.payload()
    chunks = split_chunks(payload.body, c.cfg.chunk_bytes)
    header = c.push_parts(lease, payload=payload, num_chunks=100_000)[0]
    finished = threading.Event()

    def messages():
        yield header
        for index in range(100_000):
            if finished.is_set():
                return
            data = chunks[index].data if index < len(chunks) else b"\0" * c.cfg.chunk_bytes
            yield pb.PushPart(chunk=pb.Chunk(index=index, data=data, crc32=zlib.crc32(data)))
            if index == len(chunks) + 2:  # well past body_len: a bounded server has answered by now
                finished.wait(3.0)
                return

    before = c.status()
    start = time.monotonic()
    future = c.stub().PushPseudoGrad.future(messages(), timeout=30)
    future.add_done_callback(lambda _: finished.set())
    with pytest.raises(grpc.RpcError):
        future.result()
    assert time.monotonic() - start < 2.5, "the server waited for the stream to end before refusing"
    assert c.status() == before
