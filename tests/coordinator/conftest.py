"""A real coordinator (`coordinator.serve.serve`) on loopback, and a client harness around it.

The run's files (a tiny initial model, the islands file) are written once per session; every
test that asks for `coordinator` gets a fresh server with its own state directory, running in a
background thread on its own asyncio event loop, and shut down through Admin.Shutdown.

The harness builds pushes the way the island does (protos/framing.py: a PushHeader, then the body's chunks)
and lets a test tamper with any part of them. `status()` reads what a refused call must leave
unchanged: the global version, the open rounds, per-island push counts, and the sha256 of θ_g,
θ_b and the outer momentum as the server holds them now (via Admin.Checkpoint, which writes the
in-memory state at the current version).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import torch
import zstandard

from archipelago.checkpoint import read_manifest
from coordinator.config import CoordinatorConfig
from coordinator.serve import grpc_options, serve
from coordinator.server import load_init
from island.job import IslandJobConfig, load_job, write_initial_model
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.codec import Payload, encode
from protos.fragments import split_fragments
from protos.framing import split_chunks
from protos.transport import open_channel
from tests.conftest import SMALL_MODEL

SMALL = SMALL_MODEL  # the model only: batch and warmup are the ci preset's
ADMIN_CREDENTIAL = "admin-secret"
TOKENS = {"island-0": "tok0", "island-1": "tok1", "island-2": "tok2"}
RPC_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunFiles:
    """What every coordinator of the session starts from."""

    job: IslandJobConfig
    init: Path
    islands_file: Path
    config_hash: str
    fragments: list[list[str]]  # tensor names per fragment, as both ends split them
    shapes: dict[str, tuple[int, ...]]


@pytest.fixture(scope="session")
def run_files(tmp_path_factory: pytest.TempPathFactory) -> RunFiles:
    root = tmp_path_factory.mktemp("coordinator-run")
    job = load_job("ci", SMALL + [f"data.cache_dir={root / 'data'}"])
    init = write_initial_model(job, root / "init")
    islands_file = root / "islands.json"
    islands_file.write_text(json.dumps(TOKENS))
    theta, manifest = load_init(init)
    return RunFiles(job, init, islands_file, manifest["config_hash"],
                    split_fragments(list(theta), int(manifest["fragments"])),
                    {n: tuple(t.shape) for n, t in theta.items()})


class Snapshot(NamedTuple):
    """What a refused call must not change."""

    version: int
    theta_g: str  # sha256 of the θ_g file of a checkpoint of the live state
    theta_b: str
    momentum: str
    rounds: tuple[int, ...]
    pushes: dict[str, int]  # accepted pushes per island


def repack(payload: Payload, edit: Callable[[bytearray], None]) -> Payload:
    """The payload with its raw (decompressed) body edited in place by ``edit``, recompressed,
    and the header's body_len/body_sha256 made to match: a well-formed payload carrying
    whatever values ``edit`` wrote (`encode` itself refuses non-finite tensors)."""
    raw = bytearray(zstandard.ZstdDecompressor().decompress(payload.body))
    edit(raw)
    body = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(raw))
    header = dict(payload.header, body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    return Payload(header, body)


def part_offset(payload: Payload, tensor: str, key: str) -> int:
    """Byte offset in the raw body of part ``key`` of ``tensor``."""
    for t in payload.header["tensors"]:
        if t["name"] == tensor:
            return next(p["offset"] for p in t["parts"] if p["key"] == key)
    raise KeyError(tensor)


@dataclass
class CoordinatorHarness:
    cfg: CoordinatorConfig
    files: RunFiles
    address: str = ""
    tls: dict[str, str] = field(default_factory=dict)  # open_channel's ca/cert/key for the harness's channels
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _channels: list[grpc.Channel] = field(default_factory=list)
    _default: grpc.Channel | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def job(self) -> IslandJobConfig:
        return self.files.job

    @property
    def init(self) -> Path:
        return self.files.init

    @property
    def state_dir(self) -> Path:
        return Path(self.cfg.state_dir)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="coordinator", daemon=True)
        self._thread.start()
        address_file = self.state_dir / "address"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not address_file.is_file() or not address_file.read_text():
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"coordinator did not start: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator wrote no address within {START_TIMEOUT_S}s")
            time.sleep(0.02)
        self.address = address_file.read_text().strip()

    def _serve(self) -> None:
        try:
            asyncio.run(serve(self.cfg, self.init))
        except BaseException as exc:  # surfaced by start() and stop()
            self.error = exc

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            try:
                self.admin().Shutdown(pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=10)
            except grpc.RpcError:
                pass  # already going away
            self._thread.join(timeout=15)
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        assert self._thread is None or not self._thread.is_alive(), "coordinator did not shut down in 15 s"
        assert self.error is None, f"coordinator failed: {self.error!r}"

    # ---- channels -------------------------------------------------------------------------------

    def channel(self, options: list[tuple[str, int]] | None = None,
                tls: dict[str, str] | None = None) -> grpc.Channel:
        """A new channel; by default with the server's own message limits (as islands use) and the
        harness's TLS files (``tls``: other ``ca``/``cert``/``key`` paths, {} for plaintext)."""
        channel = open_channel(self.address, grpc_options(self.cfg) if options is None else options,
                               **(self.tls if tls is None else tls))
        self._channels.append(channel)
        return channel

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.CoordinatorStub:
        if channel is None:
            if self._default is None:
                self._default = self.channel()
            channel = self._default
        return pb_grpc.CoordinatorStub(channel)

    def admin(self, channel: grpc.Channel | None = None) -> pb_grpc.AdminStub:
        if channel is None:
            if self._default is None:
                self._default = self.channel()
            channel = self._default
        return pb_grpc.AdminStub(channel)

    # ---- islands --------------------------------------------------------------------------------

    def register_reply(self, island_id: str, token: str | None = None,
                       config_hash: str | None = None) -> pb.RegisterReply:
        return self.stub().Register(pb.RegisterRequest(
            island_id=island_id, token=TOKENS.get(island_id, "") if token is None else token,
            config_hash=self.files.config_hash if config_hash is None else config_hash), timeout=RPC_TIMEOUT_S)

    def register(self, island_id: str, token: str | None = None, config_hash: str | None = None) -> pb.Lease:
        reply = self.register_reply(island_id, token, config_hash)
        return pb.Lease(island_id=island_id, lease_id=reply.lease_id, epoch=reply.epoch)

    def fragment_names(self, fragment: int = 0) -> list[str]:
        return self.files.fragments[fragment]

    def pseudo_grad(self, fragment: int = 0, seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
        """A small random pseudo-gradient for every tensor of ``fragment`` (fp32, right shapes)."""
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.randn(self.files.shapes[n], generator=gen) * scale for n in self.fragment_names(fragment)}

    def payload(self, fragment: int = 0, tensors: dict[str, torch.Tensor] | None = None,
                scheme: str = "int8-block", seed: int = 0) -> Payload:
        return encode(self.pseudo_grad(fragment, seed) if tensors is None else tensors, scheme)

    def push_parts(self, lease: pb.Lease, fragment: int = 0, round: int = 0, base_version: int = 0,
                   tensors: dict[str, torch.Tensor] | None = None, scheme: str = "int8-block",
                   tokens: int = 1024, *, payload: Payload | None = None, drop_chunks: Iterable[int] = (),
                   flip: tuple[int, int] | None = None, fix_crc: bool = False,
                   header: pb.PushHeader | None = None, **overrides: Any) -> list[pb.PushPart]:
        """The messages of one push, framed as an island frames them, optionally tampered with.

        ``payload`` replaces the encoded ``tensors``; ``overrides`` set PushHeader fields (for
        example ``num_chunks=...`` or ``codec_header=...``); ``header`` replaces the whole header;
        ``drop_chunks`` leaves out chunks by index; ``flip=(chunk, byte)`` inverts one byte of a
        chunk's data and keeps the crc32 of the original data (``fix_crc``: the crc32 of the
        corrupt data, so only the body's sha256 can catch it).
        """
        if payload is None:
            payload = self.payload(fragment, tensors, scheme)
        chunks = split_chunks(payload.body, self.cfg.chunk_bytes)
        if header is None:
            fields: dict[str, Any] = dict(
                lease=lease, fragment=fragment, round=round, base_version=base_version, tokens=tokens,
                loss_mean=3.0, eval_loss=float("nan"), scheme=payload.header["scheme"],
                codec_header=payload.header_bytes(), body_len=len(payload.body),
                body_sha256=payload.header["body_sha256"], num_chunks=len(chunks), compute_s=1.0)
            fields.update(overrides)
            header = pb.PushHeader(**fields)
        parts = [pb.PushPart(header=header)]
        dropped = set(drop_chunks)
        for c in chunks:
            if c.index in dropped:
                continue
            data, crc = c.data, c.crc32
            if flip is not None and flip[0] == c.index:
                corrupt = bytearray(data)
                corrupt[flip[1]] ^= 0xFF
                data = bytes(corrupt)
                crc = zlib.crc32(data) if fix_crc else crc
            parts.append(pb.PushPart(chunk=pb.Chunk(index=c.index, data=data, crc32=crc)))
        return parts

    def send(self, parts: Iterable[pb.PushPart], channel: grpc.Channel | None = None,
             settle: bool = True) -> pb.PushReply:
        """Stream ``parts`` as one PushPseudoGrad call. The coordinator acknowledges a push once it
        is durable and closes the round it completed afterwards; with ``settle`` this waits for
        that close and returns the reply with ``version`` set to the version after it, which is
        what the tests assert."""
        messages: Iterator[pb.PushPart] = iter(list(parts))
        reply = self.stub(channel).PushPseudoGrad(messages, timeout=RPC_TIMEOUT_S)
        if settle:
            reply.version = self.settle()
        return reply

    def settle(self) -> int:
        """Wait until no round is closing (bounded); the version then."""
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while True:
            st = self.admin_status()
            if not json.loads(st.json)["closing_fragments"]:
                return st.version
            if time.monotonic() > deadline:
                raise TimeoutError(f"a round was still closing after {RPC_TIMEOUT_S}s")
            time.sleep(0.01)

    def push(self, lease: pb.Lease, fragment: int = 0, round: int = 0, base_version: int = 0,
             tensors: dict[str, torch.Tensor] | None = None, scheme: str = "int8-block", tokens: int = 1024,
             **tamper: Any) -> pb.PushReply:
        return self.send(self.push_parts(lease, fragment, round, base_version, tensors, scheme, tokens, **tamper))

    def commit_round(self, lease: pb.Lease, fragment: int = 0, seed: int = 0) -> int:
        """Push the open round of ``fragment`` from the only registered island; the new version."""
        before = self.status()
        reply = self.push(lease, fragment, before.rounds[fragment], before.version,
                          self.pseudo_grad(fragment, seed))
        assert reply.accepted and reply.version == before.version + 1, reply
        return reply.version

    # ---- state ----------------------------------------------------------------------------------

    def admin_status(self) -> pb.StatusReply:
        return self.admin().Status(pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=RPC_TIMEOUT_S)

    def status(self) -> Snapshot:
        """The live state: version, rounds, pushes (Admin.Status) and the digests of θ_g, θ_b and
        the outer momentum (Admin.Checkpoint writes what the server holds in memory now)."""
        reply = self.admin().Checkpoint(pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=RPC_TIMEOUT_S)
        digests = read_manifest(reply.message)["files"]
        st = self.admin_status()
        assert st.version == reply.version
        return Snapshot(st.version, digests["theta_g.safetensors"], digests["theta_b.safetensors"],
                        digests["outer_momentum.safetensors"],
                        tuple(f.round for f in sorted(st.fragments, key=lambda f: f.fragment)),
                        {i.island_id: i.pushes for i in st.islands})


@pytest.fixture
def coordinator_factory(run_files: RunFiles, tmp_path: Path) -> Iterator[Callable[..., CoordinatorHarness]]:
    """Start a coordinator with ``CoordinatorConfig`` fields overridden by keyword (``client_tls``:
    the ca/cert/key files the harness's own channels use)."""
    started: list[CoordinatorHarness] = []
    base = CoordinatorConfig(
        host="127.0.0.1", port=0, islands_file=str(run_files.islands_file), admin_credential=ADMIN_CREDENTIAL,
        lease_ttl_s=30.0, staleness_limit=2, chunk_bytes=64 * 1024, max_message_bytes=256 * 1024,
        broadcast_scheme="int8-block", checkpoint_every=1, keep_checkpoints=2)

    def start(client_tls: dict[str, str] | None = None, **overrides: Any) -> CoordinatorHarness:
        state_dir = tmp_path / f"coordinator-{len(started)}"
        harness = CoordinatorHarness(replace(base, state_dir=str(state_dir), **overrides), run_files,
                                     tls=client_tls or {})
        started.append(harness)
        harness.start()
        return harness

    yield start
    for harness in started:
        harness.stop()


@pytest.fixture
def coordinator(coordinator_factory: Callable[..., CoordinatorHarness]) -> CoordinatorHarness:
    return coordinator_factory()


__all__ = ["ADMIN_CREDENTIAL", "TOKENS", "CoordinatorHarness", "Snapshot", "part_offset", "repack"]
