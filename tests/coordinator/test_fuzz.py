"""Fuzzing every RPC of both services over real gRPC against the real server.

Three kinds of input: messages with random values in every field (built from the proto
descriptors, so a new field is fuzzed too), raw random bytes as the request of every method, and
valid pushes mutated at every level (PushHeader fields, the lease, the msgpack codec header, the
compressed body re-packed around random bytes, the chunks, the stream's framing).

Every call must end in a deliberate gRPC status (never UNKNOWN or INTERNAL, which mean an
unhandled exception, nor UNAVAILABLE or DEADLINE_EXCEEDED, which mean a dead or hung server) or
succeed; afterwards the server still runs and the global version, open rounds, θ_g, θ_b and the
outer momentum are exactly as before. Hypothesis runs derandomized with a bounded example count.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import msgpack
import zstandard
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protos import archipelago_pb2 as pb
from protos.framing import split_chunks
from protos.quant import SCHEMES
from tests.coordinator.conftest import ADMIN_CREDENTIAL, TOKENS, CoordinatorHarness

Code = grpc.StatusCode
DELIBERATE = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED,
              Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED, Code.DATA_LOSS,
              Code.OUT_OF_RANGE, Code.UNIMPLEMENTED}
CALL_TIMEOUT_S = 10.0


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: type
    kind: str  # unary | server_stream | client_stream

    @property
    def path(self) -> str:
        return f"/archipelago.v1.{self.service}/{self.name}"


RPCS = [Rpc("Coordinator", "Register", pb.RegisterRequest, "unary"),
        Rpc("Coordinator", "Heartbeat", pb.HeartbeatRequest, "unary"),
        Rpc("Coordinator", "PullParams", pb.PullRequest, "server_stream"),
        Rpc("Coordinator", "PushPseudoGrad", pb.PushPart, "client_stream"),
        Rpc("Coordinator", "Subscribe", pb.SubscribeRequest, "server_stream"),
        Rpc("Coordinator", "GetStatus", pb.StatusRequest, "unary"),
        Rpc("Admin", "Status", pb.AdminRequest, "unary"),
        Rpc("Admin", "Drain", pb.DrainRequest, "unary"),
        Rpc("Admin", "Rollback", pb.RollbackRequest, "unary"),
        Rpc("Admin", "Checkpoint", pb.AdminRequest, "unary"),
        Rpc("Admin", "Shutdown", pb.AdminRequest, "unary")]


def test_the_fuzzed_rpcs_are_every_rpc():
    services = pb.DESCRIPTOR.services_by_name
    assert {(s, m) for s in services for m in services[s].methods_by_name} == {(r.service, r.name) for r in RPCS}


# ---- calling and judging -------------------------------------------------------------------------


def invoke(channel: grpc.Channel, rpc: Rpc, request: Any, serialize: Callable = lambda m: m.SerializeToString()
           ) -> Code:
    """Make one call of ``rpc``; its status code (OK when it succeeded). ``request`` is one message
    (a list of them for the client-streaming push)."""
    args = dict(request_serializer=serialize, response_deserializer=lambda b: b)
    try:
        if rpc.kind == "unary":
            channel.unary_unary(rpc.path, **args)(request, timeout=CALL_TIMEOUT_S)
        elif rpc.kind == "server_stream":
            for _ in channel.unary_stream(rpc.path, **args)(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.stream_unary(rpc.path, **args)(iter(request), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() in DELIBERATE, f"{rpc.path}: {exc.code().name}: {exc.details()}"
        assert exc.details(), f"{rpc.path}: {exc.code().name} without a message"
        return exc.code()
    return Code.OK


def unchanged(c: CoordinatorHarness, before) -> None:
    """The server is alive and the run's state is what it was."""
    assert c.error is None and c._thread is not None and c._thread.is_alive()
    after = c.status()
    assert (after.version, after.rounds, after.theta_g, after.theta_b, after.momentum) == (
        before.version, before.rounds, before.theta_g, before.theta_b, before.momentum)


# ---- random values in every field ----------------------------------------------------------------

_INT_RANGES = {FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
               FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1)}


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, 0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63) if lo <= v <= hi})
    return st.sampled_from(edges) | st.integers(lo, hi)


TEXT = (st.text(max_size=40) | st.sampled_from(["", *TOKENS, *TOKENS.values(), "x" * 5000, "\x00", "ü" * 200]))
BYTES = st.binary(max_size=200) | st.sampled_from([b"", b"\x00" * 5000])


def field_value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type in _INT_RANGES:
        return ints(*_INT_RANGES[f.type])
    if f.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if f.type == FieldDescriptor.TYPE_BYTES:
        return BYTES
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    assert f.type == FieldDescriptor.TYPE_MESSAGE, f.full_name
    return messages(f.message_type, depth + 1)


@st.composite
def messages(draw, descriptor: Descriptor, depth: int = 0) -> Any:
    """A message of ``descriptor``'s type with a random subset of its fields set to random values
    (one member of each oneof at most)."""
    msg = message_factory.GetMessageClass(descriptor)()
    oneofs_done: set[str] = set()
    for f in descriptor.fields:
        if f.containing_oneof is not None:
            if f.containing_oneof.name in oneofs_done:
                continue
            oneofs_done.add(f.containing_oneof.name)
            f = draw(st.sampled_from(list(f.containing_oneof.fields)))
        if depth > 2 or not draw(st.booleans()):
            continue
        value = draw(field_value(f, depth))
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(value)
        else:
            setattr(msg, f.name, value)
    return msg


def request_for(rpc: Rpc) -> st.SearchStrategy[Any]:
    one = messages(rpc.request.DESCRIPTOR)
    if rpc.service == "Admin" and rpc.name != "Shutdown":
        # the real credential too, so the calls get past authentication
        one = st.tuples(one, st.booleans()).map(lambda t: _with_credential(*t))
    return st.lists(one, max_size=5) if rpc.kind == "client_stream" else one


def _with_credential(msg: Any, real: bool) -> Any:
    if real:
        msg.credential = ADMIN_CREDENTIAL
    return msg


def test_random_field_values_in_every_rpc(coordinator):
    c = coordinator
    c.register("island-0")  # a live member (which a fuzzed Drain with the real credential may drain)
    before = c.status()
    channel = c.channel()
    seen: dict[str, set[str]] = {}

    @fuzz_settings(examples=250)
    @given(st.data())
    def run(data):
        rpc = data.draw(st.sampled_from(RPCS))
        request = data.draw(request_for(rpc))
        if rpc.name in ("Shutdown", "Rollback"):  # authorized, both change the run on purpose
            assume(request.credential != ADMIN_CREDENTIAL)
        code = invoke(channel, rpc, request)
        seen.setdefault(rpc.path, set()).add(code.name)

    run()
    unchanged(c, before)
    assert len(seen) == len(RPCS), sorted(seen)


def test_raw_random_bytes_as_the_request_of_every_method(coordinator):
    c = coordinator
    before = c.status()
    channel = c.channel()
    codes: set[str] = set()

    @fuzz_settings(examples=150)
    @given(st.sampled_from(RPCS), st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    def run(rpc, blobs):
        request = blobs if rpc.kind == "client_stream" else blobs[0]
        if rpc.name == "Shutdown":
            parsed = pb.AdminRequest()
            try:
                parsed.ParseFromString(blobs[0])
            except Exception:  # unparsable: refused before any handler runs
                parsed = pb.AdminRequest()
            assume(parsed.credential != ADMIN_CREDENTIAL)
        codes.add(invoke(channel, rpc, request, serialize=lambda b: b).name)

    run()
    unchanged(c, before)
    assert "INVALID_ARGUMENT" in codes


# ---- mutated valid pushes ------------------------------------------------------------------------


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | ints(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@dataclass
class Push:
    """One push being mutated: its PushHeader, codec header, chunks and, last, the stream's parts."""

    header: pb.PushHeader
    codec: dict[str, Any]
    body: bytes
    chunks: list[pb.Chunk]
    chunk_bytes: int

    def rebody(self, body: bytes) -> None:
        """A new body, with the headers and chunks that describe it."""
        self.body = body
        self.codec = dict(self.codec, body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
        self.header.codec_header = msgpack.packb(self.codec, use_bin_type=True)
        self.header.body_len = len(body)
        self.header.body_sha256 = self.codec["body_sha256"]
        self.chunks = [pb.Chunk(index=k.index, data=k.data, crc32=k.crc32) for k in split_chunks(body, self.chunk_bytes)]
        self.header.num_chunks = len(self.chunks)


def mutate_header_field(draw, push: Push) -> None:
    fields = [f for f in pb.PushHeader.DESCRIPTOR.fields if f.name != "lease"]
    f = draw(st.sampled_from(fields))
    setattr(push.header, f.name, draw(field_value(f, 0)))


def mutate_lease(draw, push: Push) -> None:
    f = draw(st.sampled_from(list(pb.Lease.DESCRIPTOR.fields)))
    setattr(push.header.lease, f.name, draw(field_value(f, 0)))


def mutate_codec_bytes(draw, push: Push) -> None:
    raw = bytearray(push.header.codec_header)
    how = draw(st.sampled_from(["random", "truncate", "flip", "append"]))
    if how == "random":
        raw = bytearray(draw(BYTES))
    elif how == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == "flip" and raw:
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    else:
        raw += draw(st.binary(min_size=1, max_size=20))
    push.header.codec_header = bytes(raw)


def mutate_codec_header(draw, push: Push) -> None:
    """A well-formed msgpack header with one entry (top level, tensor or part) changed or removed."""
    codec = msgpack.unpackb(msgpack.packb(push.codec, use_bin_type=True), raw=False)
    target = codec
    tensors = codec["tensors"]
    level = draw(st.sampled_from(["top", "tensor", "part"]))
    if level != "top" and tensors:
        target = tensors[draw(st.integers(0, len(tensors) - 1))]
        if level == "part" and target["parts"]:
            target = target["parts"][draw(st.integers(0, len(target["parts"]) - 1))]
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.integers(0, 4)) == 0:
        del target[key]
    else:
        target[key] = draw(MSGPACK_VALUES | st.sampled_from(["float16", "int8", "uint32", *SCHEMES]))
    push.header.codec_header = msgpack.packb(codec, use_bin_type=True)


def mutate_body(draw, push: Push) -> None:
    """Random bytes written into the decompressed body, recompressed, every checksum made to match:
    garbage that reaches the dequantizer."""
    raw = bytearray(zstandard.ZstdDecompressor().decompress(push.body))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        patch = draw(st.binary(min_size=1, max_size=64))
        raw[at:at + len(patch)] = patch[:max(0, len(raw) - at)]
    if draw(st.booleans()):  # a different raw length than the header declares
        raw = raw[:draw(st.integers(0, len(raw)))]
    push.rebody(zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(raw)))


def mutate_chunks(draw, push: Push) -> None:
    chunks = push.chunks
    how = draw(st.sampled_from(["flip", "flip_fix_crc", "index", "crc", "drop", "duplicate", "swap", "empty"]))
    if not chunks:
        return
    i = draw(st.integers(0, len(chunks) - 1))
    k = chunks[i]
    if how in ("flip", "flip_fix_crc") and k.data:
        data = bytearray(k.data)
        data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
        chunks[i] = pb.Chunk(index=k.index, data=bytes(data), crc32=zlib.crc32(data) if how == "flip_fix_crc" else k.crc32)
    elif how == "index":
        k.index = draw(ints(0, 2**32 - 1))
    elif how == "crc":
        k.crc32 = draw(ints(0, 2**32 - 1))
    elif how == "drop":
        del chunks[i]
    elif how == "duplicate":
        chunks.insert(i, pb.Chunk(index=k.index, data=k.data, crc32=k.crc32))
    elif how == "swap":
        j = draw(st.integers(0, len(chunks) - 1))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    else:
        chunks[i] = pb.Chunk(index=k.index, data=b"", crc32=0)


MUTATIONS = [mutate_header_field, mutate_lease, mutate_codec_bytes, mutate_codec_header, mutate_body, mutate_chunks]


def frame(draw, push: Push) -> list[pb.PushPart]:
    """The stream's parts, sometimes with its framing broken (a second header, an empty part, a cut)."""
    parts = [pb.PushPart(header=push.header)] + [pb.PushPart(chunk=k) for k in push.chunks]
    if draw(st.integers(0, 3)) < 3:  # most pushes keep their framing, so the checks past it run
        return parts
    how = draw(st.sampled_from(["header again", "empty part", "cut", "nothing", "no header"]))
    if how == "header again":
        parts.insert(draw(st.integers(1, len(parts))), pb.PushPart(header=push.header))
    elif how == "empty part":
        parts.insert(draw(st.integers(0, len(parts))), pb.PushPart())
    elif how == "cut":
        parts = parts[:draw(st.integers(0, len(parts)))]
    elif how == "nothing":
        parts = []
    elif how == "no header":
        parts = parts[1:]
    return parts


def test_mutated_pushes(coordinator_factory):
    # Open registration and an unreachable quorum: every example registers a fresh island, and a
    # mutation that leaves the push valid is taken into the open round but can never commit it.
    c = coordinator_factory(islands_file="", min_islands=10**6)
    before = c.status()
    channel = c.channel()
    push_rpc = next(r for r in RPCS if r.name == "PushPseudoGrad")
    payloads = {s: c.payload(scheme=s) for s in SCHEMES}
    codes: dict[str, int] = {}
    counter = iter(range(10**9))

    @fuzz_settings(examples=300)
    @given(st.data())
    def run(data):
        draw = data.draw
        lease = c.register(f"fuzz-{next(counter)}")
        payload = payloads[draw(st.sampled_from(sorted(payloads)))]
        first = c.push_parts(lease, payload=payload)[0].header
        push = Push(pb.PushHeader(), dict(payload.header), payload.body, [], c.cfg.chunk_bytes)
        push.header.CopyFrom(first)
        push.rebody(payload.body)
        for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
            mutation(draw, push)
        code = invoke(channel, push_rpc, frame(draw, push))
        codes[code.name] = codes.get(code.name, 0) + 1

    run()
    unchanged(c, before)
    assert {"INVALID_ARGUMENT", "DATA_LOSS"} <= set(codes), codes


def test_every_rpc_refuses_an_empty_request(coordinator):
    """Every field at its default (no lease, no id, no credential), and a push with no parts."""
    c = coordinator
    before = c.status()
    channel = c.channel()
    for rpc in RPCS:
        request = [] if rpc.kind == "client_stream" else rpc.request()
        assert invoke(channel, rpc, request) != Code.OK, rpc.path
    unchanged(c, before)
