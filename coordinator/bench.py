"""`archipelago bench coordinator --islands 64 --json FILE`: one real coordinator under many islands.

The coordinator is the real service (`archipelago coordinator serve`, its own process, plaintext on
loopback). The islands are lightweight: asyncio gRPC clients in this process, one channel each,
that register, then every round push a real-size encoded pseudo-gradient (``--scheme`` of a tensor
set of ``--params`` elements; default the tiny preset's model) and pull the outer delta the round
produced. Nothing is trained: what is measured is the coordinator's side of a round.

    round latency     first push sent → every island has pulled the new version's delta
    ingest latency    first push sent → the last push's acknowledgement (every push durable)
    commit latency    first push sent → the COMMITTED event of the round's version
    ingest_wire_MBps  islands × push bytes on the wire / ingest latency (first push byte → last ack)
    merge_MBps        islands × params × 4 bytes / the time the coordinator's merge itself took
                      (it records `merge_s` with each version; read back over Admin.Status)
    aggregation MB/s  islands × params × 4 bytes (the fp32 pseudo-gradients merged) / commit latency
    memcpy MB/s       `Tensor.copy_` of one fp32 tensor set of the same size, in this run, for scale
    spill_MBps        fsynced write rate of a scratch file on the disk (`--disk-dir`), and
                      state_dir_spill_MBps the same in the coordinator's state directory (`--workdir`:
                      on tmpfs, the disk is not what the other figures measure)

Rounds per second count the measured rounds (after ``--warmup``) over their total round latency.
The measured rounds start once the coordinator's codec kernels for the scheme are compiled (it
compiles them on a background thread when it first sees the scheme; `codec_kernels` in the JSON).
`rss_MB` is the coordinator process's resident memory after each round (from /proc), and
`rss_growth_last_100` its growth over the last 100 rounds (over all of them if fewer) as the
least-squares line through them says it, relative to their mean: the allocator hands memory back
and takes it again in steps of a few percent, so the last round over the first
(`rss_growth_last_100_endpoints`, also written) is one noisy draw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import torch

from archipelago import config as cfglib
from archipelago.checkpoint import write_checkpoint
from archipelago.console import console, progress
from archipelago.procs import kill_group, wait_for_file
from archipelago.runinfo import run_metadata, write_json
from coordinator.config import CoordinatorConfig
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.codec import Payload, encode, payload_nbytes
from protos.fragments import split_fragments
from protos.framing import split_chunks
from protos.quant import CodecError, get_scheme

TINY_PARAMS = 2_361_280  # elements DiLoCo syncs for configs/tiny.toml's model (a test keeps this true)
TENSOR_NUMEL = 1 << 18  # the synthetic model's tensors: this many elements each, the last one shorter
START_TIMEOUT_S = 120.0
HISTORY_EVERY = 25  # rounds between reads of the coordinators' history (their status lists the newest 50)


@dataclass
class BenchConfig:
    islands: int = 64
    rounds: int = 5  # measured rounds
    warmup: int = 1  # rounds run first and not measured (connections, allocator, first checkpoint)
    params: int = TINY_PARAMS
    scheme: str = "int8-block"
    distinct_payloads: int = 4  # islands push these in turn: the coordinator decodes each push all the same
    checkpoint_every: int = 0  # the coordinator's checkpoint_every (0: measure rounds, not the disk)
    seed: int = 0
    timeout_s: float = 600.0
    spill_bytes: int = 64 << 20  # written (and fsynced) once to the disk and once to the state directory
    disk_dir: str = "."  # where spill_MBps is measured: a folder on the disk a coordinator would use
    shards: int = 1  # coordinator shards (processes), one fragment each: islands push every fragment to its shard

    def __post_init__(self) -> None:
        if (self.islands < 1 or self.rounds < 1 or self.warmup < 0 or self.params < 1 or self.distinct_payloads < 1
                or self.spill_bytes < 1 or self.shards < 1):
            raise cfglib.ConfigError("--islands, --rounds, --params, --distinct-payloads, --spill-bytes and --shards "
                                     "must be >= 1 and --warmup >= 0")
        if self.shards > -(-self.params // TENSOR_NUMEL):
            raise cfglib.ConfigError(f"--shards {self.shards}: the {self.params:,} params make only "
                                     f"{-(-self.params // TENSOR_NUMEL)} tensors of {TENSOR_NUMEL:,}, one fragment "
                                     "needs at least one")
        try:
            get_scheme(self.scheme)
        except CodecError as exc:
            raise cfglib.ConfigError(f"--scheme: {exc}") from None


def model_sized(params: int, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """``params`` fp32 elements of N(0, scale²) as tensors of `TENSOR_NUMEL` elements (the last shorter),
    one per "layer", so that fragments split them evenly (protos/fragments.py)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [TENSOR_NUMEL] * (params // TENSOR_NUMEL) + ([params % TENSOR_NUMEL] if params % TENSOR_NUMEL else [])
    return {f"layers.{i}.weight": torch.randn(n, generator=gen) * scale for i, n in enumerate(sizes)}


def memcpy_mbps(tensors: dict[str, torch.Tensor], repeats: int = 5) -> float:
    targets = {n: torch.empty_like(t) for n, t in tensors.items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for n, t in tensors.items():
            targets[n].copy_(t)
        times.append(time.perf_counter() - start)
    return sum(t.numel() for t in tensors.values()) * 4 / 1e6 / statistics.median(times)


def fsync_write_mbps(directory: Path, nbytes: int, block: int = 8 << 20) -> float:
    """MB/s of writing `nbytes` to a new file in `directory` and fsyncing it, as a spill does."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(min(block, nbytes))
    path = directory / f".spill-bench-{os.getpid()}"
    try:
        start = time.perf_counter()
        with open(path, "wb") as fh:
            written = 0
            while written < nbytes:
                written += fh.write(data[:nbytes - written])
            fh.flush()
            os.fsync(fh.fileno())
        return nbytes / 1e6 / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---- the coordinator process -----------------------------------------------------------------------


class CoordinatorProcess:
    """`archipelago coordinator serve` in its own session, stopped by Admin.Shutdown or killed by pid."""

    def __init__(self, cfg: CoordinatorConfig, init: Path, workdir: Path, credential: str,
                 name: str = "coordinator") -> None:
        preset = workdir / f"{name}.toml"
        preset.write_text(cfglib.dump_toml({"coordinator": asdict(cfg)}))
        self.log_path = workdir / f"{name}.log"
        self.address_file = Path(cfg.state_dir) / "address"
        self.credential = credential
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "archipelago.cli", "coordinator", "serve", "--preset", str(preset),
                 "--init", str(init)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "ARCHIPELAGO_ADMIN_CREDENTIAL": credential})

    def wait_address(self, timeout_s: float) -> str:
        return wait_for_file(self.address_file, self.proc, timeout_s, name="the coordinator", tail=self.tail)

    def status(self, address: str) -> dict[str, Any]:
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=self.credential), timeout=30)
        return json.loads(reply.json)

    def merges(self, address: str) -> dict[int, dict[str, Any]]:
        """The history entry of every committed version the coordinator still lists."""
        return {e["version"]: e for e in self.status(address)["history"] if e.get("kind") == "committed"}

    def wait_kernels(self, address: str, scheme: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the coordinator's kernels of ``scheme`` are compiled (or known not to be); their states."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = {k: v for k, v in self.status(address)["codec_kernels"].items() if k.startswith(f"{scheme}/")}
            if all(v["state"] in ("ready", "failed", "never") for v in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(0.2)

    def rss_mb(self) -> float:
        """Resident memory of the coordinator process now, MB (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
        return float("nan")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, address: str | None) -> None:
        if address is not None and self.proc.poll() is None:
            try:
                with grpc.insecure_channel(address) as channel:
                    pb_grpc.AdminStub(channel).Shutdown(pb.AdminRequest(credential=self.credential), timeout=10)
                self.proc.wait(timeout=30)
            except (grpc.RpcError, subprocess.TimeoutExpired):
                pass
        kill_group(self.proc)


# ---- the islands -----------------------------------------------------------------------------------


class FakeIsland:
    """Registers with every shard, pushes a prepared payload of each fragment to its shard every
    round, pulls each round's deltas; trains nothing."""

    def __init__(self, island_id: str, token: str, addresses: list[str], options: list[tuple[str, int]]) -> None:
        self.island_id, self.token = island_id, token
        self.channels = [grpc.aio.insecure_channel(a, options=options) for a in addresses]
        self.stubs = [pb_grpc.CoordinatorStub(c) for c in self.channels]
        self.leases: list[pb.Lease] = []
        self.bytes_pulled = 0

    async def register(self, config_hash: str) -> list[int]:
        """Register with every shard; each shard's version."""
        replies = [await stub.Register(pb.RegisterRequest(island_id=self.island_id, token=self.token,
                                                          config_hash=config_hash), timeout=60) for stub in self.stubs]
        self.leases = [pb.Lease(island_id=self.island_id, lease_id=r.lease_id, epoch=r.epoch) for r in replies]
        return [r.version for r in replies]

    async def push(self, fragment: int, payload: Payload, chunks: list[pb.PushPart], round_: int, version: int,
                   tokens: int, timeout_s: float) -> pb.PushReply:
        """Fragment ``fragment`` to its shard (shard f owns fragment f here)."""
        header = pb.PushHeader(lease=self.leases[fragment], fragment=fragment, round=round_, base_version=version,
                               tokens=tokens, loss_mean=float("nan"), eval_loss=float("nan"),
                               scheme=payload.header["scheme"], codec_header=payload.header_bytes(),
                               body_len=len(payload.body), body_sha256=payload.header["body_sha256"],
                               num_chunks=len(chunks))

        async def parts():
            yield pb.PushPart(header=header)
            for part in chunks:
                yield part

        return await self.stubs[fragment].PushPseudoGrad(parts(), timeout=timeout_s)

    async def committed(self, shard: int, events: asyncio.Queue) -> None:
        """Put (shard, version) of every COMMITTED event of ``shard`` on ``events`` (until cancelled)."""
        async for event in self.stubs[shard].Subscribe(pb.SubscribeRequest(lease=self.leases[shard])):
            if event.kind == pb.Event.COMMITTED:
                events.put_nowait((shard, event.version))

    async def pull(self, since: int, timeout_s: float) -> None:
        for stub, lease in zip(self.stubs, self.leases, strict=True):
            async for part in stub.PullParams(pb.PullRequest(lease=lease, since_version=since), timeout=timeout_s):
                self.bytes_pulled += part.ByteSize()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def drive(bench: BenchConfig, cfg: CoordinatorConfig, addresses: list[str], tokens: dict[str, str],
                config_hash: str, payloads: list[list[Payload]],
                coordinators: list[CoordinatorProcess]) -> dict[str, Any]:
    """Register every island, run warmup + measured rounds, and time them. ``payloads[k][f]``:
    distinct payload k of fragment f."""
    options = [("grpc.max_send_message_length", cfg.max_message_bytes),
               ("grpc.max_receive_message_length", cfg.max_message_bytes)]
    islands = [FakeIsland(i, t, addresses, options) for i, t in tokens.items()]
    chunks = [[[pb.PushPart(chunk=pb.Chunk(index=c.index, data=c.data, crc32=c.crc32))
                for c in split_chunks(p.body, cfg.chunk_bytes)] for p in by_fragment] for by_fragment in payloads]
    shards = len(addresses)
    rounds: list[dict[str, Any]] = []
    kernels: dict[str, Any] = {}
    events: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    listeners: list[asyncio.Task] = []
    try:
        versions = await asyncio.gather(*(i.register(config_hash) for i in islands))
        version = max(v for vs in versions for v in vs)  # every shard starts fresh: the same version
        listeners = [asyncio.create_task(islands[0].committed(s, events)) for s in range(shards)]
        total = bench.warmup + bench.rounds
        histories: list[dict[int, dict[str, Any]]] = [{} for _ in coordinators]
        with progress() as bar:
            task = bar.add_task(f"{bench.islands} islands", total=total, info="")
            for r in range(total):
                if r == bench.warmup:
                    for coordinator, address in zip(coordinators, addresses, strict=True):
                        kernels = await asyncio.to_thread(coordinator.wait_kernels, address, bench.scheme,
                                                          bench.timeout_s)
                start = time.perf_counter()
                await asyncio.gather(*(
                    island.push(f, payloads[k % len(payloads)][f], chunks[k % len(chunks)][f], r, version, 1024,
                                bench.timeout_s) for k, island in enumerate(islands) for f in range(shards)))
                acked = time.perf_counter()
                done: set[int] = set()
                while len(done) < shards:
                    shard, committed_version = await asyncio.wait_for(events.get(), bench.timeout_s)
                    if committed_version > version + 1:
                        raise RuntimeError(f"round {r}: shard {shard} committed version {committed_version}, "
                                           f"not {version + 1}")
                    if committed_version == version + 1:
                        done.add(shard)
                committed = time.perf_counter()
                await asyncio.gather(*(island.pull(version, bench.timeout_s) for island in islands))
                pulled = time.perf_counter()
                version += 1
                rounds.append({"round": r, "warmup": r < bench.warmup, "ingest_s": acked - start,
                               "commit_s": committed - start, "round_s": pulled - start,
                               "rss_MB": sum(c.rss_mb() for c in coordinators)})
                bar.update(task, completed=r + 1, info=f"{pulled - start:.2f}s")
                if (r + 1) % HISTORY_EVERY == 0 or r + 1 == total:  # status lists the newest 50 versions
                    for merged, coordinator, address in zip(histories, coordinators, addresses, strict=True):
                        merged.update(await asyncio.to_thread(coordinator.merges, address))
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await asyncio.gather(*(i.close() for i in islands))
    return {"rounds": rounds, "bytes_pulled_per_island": islands[0].bytes_pulled, "final_version": version,
            "codec_kernels": kernels, "histories": histories}


def rss_trend(rss: list[float]) -> float:
    """Growth across ``rss`` by its least-squares line, relative to its mean (0 for one value)."""
    if len(rss) < 2:
        return 0.0
    fit = statistics.linear_regression(range(len(rss)), rss)
    return fit.slope * (len(rss) - 1) / statistics.fmean(rss)


# ---- the benchmark -----------------------------------------------------------------------------------


def run(bench: BenchConfig, workdir: Path) -> dict[str, Any]:
    theta = model_sized(bench.params, bench.seed, scale=0.02)
    names = list(theta)
    config_hash = cfglib.config_hash({"bench": "coordinator", "tensors": [[n, list(t.shape)] for n, t in theta.items()]})
    init = write_checkpoint(workdir / "init", {"model.safetensors": theta}, {
        "kind": "init", "config_hash": config_hash, "model": None, "fragments": bench.shards, "tensor_names": names,
        "seed": bench.seed})
    fragments = split_fragments(names, bench.shards)
    grads = [model_sized(bench.params, bench.seed + 1 + k, scale=1e-3) for k in range(bench.distinct_payloads)]
    payloads = [[encode({n: g[n] for n in fragment}, bench.scheme) for fragment in fragments] for g in grads]
    push_bytes = sum(payload_nbytes(p) for p in payloads[0])
    memcpy = memcpy_mbps(grads[0])
    tokens = {f"island-{i:03d}": secrets.token_hex(8) for i in range(bench.islands)}
    (workdir / "islands.json").write_text(json.dumps(tokens))
    cfg = CoordinatorConfig(host="127.0.0.1", port=0, state_dir=str(workdir / "coordinator"),
                            islands_file=str(workdir / "islands.json"), lease_ttl_s=max(60.0, bench.timeout_s),
                            min_islands=bench.islands, checkpoint_every=bench.checkpoint_every,
                            broadcast_scheme=bench.scheme, num_shards=bench.shards)
    credential = secrets.token_hex(16)
    shard_cfgs = [cfg] if bench.shards == 1 else [
        replace(cfg, shard_index=i, state_dir=str(workdir / "coordinator" / f"shard-{i}")) for i in range(bench.shards)]
    coordinators = [CoordinatorProcess(c, init, workdir, credential, "coordinator" if bench.shards == 1 else
                                       f"coordinator-shard-{c.shard_index}") for c in shard_cfgs]
    addresses: list[str | None] = [None] * len(coordinators)
    try:
        for i, coordinator in enumerate(coordinators):
            addresses[i] = coordinator.wait_address(START_TIMEOUT_S)
        driven = asyncio.run(drive(bench, cfg, addresses, tokens, config_hash, payloads, coordinators))
    finally:
        for coordinator, address in zip(coordinators, addresses, strict=True):
            coordinator.stop(address)
    spill_state = fsync_write_mbps(workdir / "coordinator", bench.spill_bytes)
    # The state (spilled pushes, deltas: gigabytes at this size, on tmpfs memory) served the run;
    # the logs and configs beside it stay.
    shutil.rmtree(workdir / "coordinator", ignore_errors=True)
    spill_disk = fsync_write_mbps(Path(bench.disk_dir), bench.spill_bytes)

    measured = [r for r in driven["rounds"] if not r["warmup"]]
    round_s = [r["round_s"] for r in measured]
    commit_s = [r["commit_s"] for r in measured]
    ingest_s = [r["ingest_s"] for r in measured]
    fp32_mb = bench.params * 4 / 1e6
    aggregation = bench.islands * fp32_mb / statistics.median(commit_s)
    first_measured = driven["final_version"] - len(measured) + 1
    entries = [[e for v, e in sorted(h.items()) if v >= first_measured] for h in driven["histories"]]
    if any(len(e) != len(measured) for e in entries):
        raise RuntimeError(f"the coordinators' histories list {[len(e) for e in entries]} of the {len(measured)} "
                           "measured versions")
    # The shards merge at the same time, each its own fragment: a round's merge takes the longest of theirs.
    merge_s = [max(e[r]["merge_s"] for e in entries) for r in range(len(measured))]
    merge = bench.islands * fp32_mb / statistics.median(merge_s)
    ingest = bench.islands * push_bytes / 1e6 / statistics.median(ingest_s)
    rss = [r["rss_MB"] for r in driven["rounds"]]
    last = rss[-100:] if len(rss) > 100 else rss
    return {
        "islands": bench.islands, "params": bench.params, "scheme": bench.scheme, "measured_rounds": len(measured),
        "shards": bench.shards, "push_bytes": push_bytes, "fp32_bytes": bench.params * 4,
        "delta_bytes_pulled_per_round": driven["bytes_pulled_per_island"] / len(driven["rounds"]),
        "rounds_per_s": len(round_s) / sum(round_s),
        "round_latency_s": {"p50": percentile(round_s, 50), "p99": percentile(round_s, 99), "all": round_s},
        "ingest_latency_s": {"p50": percentile(ingest_s, 50), "p99": percentile(ingest_s, 99), "all": ingest_s},
        "commit_latency_s": {"p50": percentile(commit_s, 50), "p99": percentile(commit_s, 99), "all": commit_s},
        "aggregation_MBps": aggregation,
        "ingest_wire_MBps": ingest,
        "merge_MBps": merge,
        "merge_s": {"p50": percentile(merge_s, 50), "all": merge_s},
        "merged_before_close": [sum(e[r].get("merged_early", 0) for e in entries) for r in range(len(measured))],
        "rss_MB": rss,
        "rss_growth_last_100": rss_trend(last),
        "rss_growth_last_100_endpoints": last[-1] / last[0] - 1,
        "codec_kernels": driven["codec_kernels"],
        "memcpy_MBps": memcpy,
        "aggregation_vs_memcpy": aggregation / memcpy,
        "merge_vs_memcpy": merge / memcpy,
        "spill_MBps": spill_disk,
        "state_dir_spill_MBps": spill_state,
        "disk_dir": str(Path(bench.disk_dir).resolve()),
        "final_version": driven["final_version"],
        "rounds": driven["rounds"],
        "threads": torch.get_num_threads(),
        "coordinator_config": asdict(cfg),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago bench coordinator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    p.add_argument("--islands", type=int, default=d.islands)
    p.add_argument("--rounds", type=int, default=d.rounds, help="measured rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="rounds before the measured ones")
    p.add_argument("--params", type=int, default=d.params,
                   help=f"elements of the pushed tensor set (default {d.params:,}: the tiny preset's model)")
    p.add_argument("--scheme", default=d.scheme, help="codec of the pushes and of the broadcast deltas")
    p.add_argument("--distinct-payloads", type=int, default=d.distinct_payloads)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="the coordinator's checkpoint_every (default 0: no checkpoints while measuring)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s, help="seconds per RPC")
    p.add_argument("--workdir", help="the coordinator's state (removed at the end) and its log and config (kept) "
                   "go here (default: a temporary folder); on tmpfs (/dev/shm/...) the disk is not what the "
                   "ingest and merge figures measure")
    p.add_argument("--disk-dir", default=d.disk_dir,
                   help="a folder on the disk, where spill_MBps (fsynced writes) is measured (default: .)")
    p.add_argument("--spill-bytes", type=int, default=d.spill_bytes, help="bytes written for each spill figure")
    p.add_argument("--shards", type=int, default=d.shards,
                   help="coordinator shards (processes); the pushed tensors are split into this many fragments, "
                        "one per shard, and every island pushes each to its shard")
    p.add_argument("--json", dest="json_path", required=True, help="write the results here")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    bench = BenchConfig(**{k: v for k, v in vars(args).items() if k not in ("json_path", "workdir")})
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(bench, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
            result = run(bench, Path(tmp))
    result.update(run_metadata(bench.seed, {"bench": asdict(bench), "coordinator": result.pop("coordinator_config")}))
    write_json(Path(args.json_path), result)
    from rich.table import Table

    shards = f", {bench.shards} shards" if bench.shards > 1 else ""
    table = Table(title=f"coordinator{shards}: {bench.islands} islands × {bench.params:,} params ({bench.scheme}, "
                        f"{result['push_bytes'] / 1e6:.2f} MB a push), {result['measured_rounds']} rounds")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rss = result["rss_MB"]
    rows = [("rounds / s", f"{result['rounds_per_s']:.3f}"),
            ("round latency p50 / p99 (s)", f"{result['round_latency_s']['p50']:.3f} / "
                                            f"{result['round_latency_s']['p99']:.3f}"),
            ("ingest latency p50 / p99 (s)", f"{result['ingest_latency_s']['p50']:.3f} / "
                                             f"{result['ingest_latency_s']['p99']:.3f}"),
            ("commit latency p50 / p99 (s)", f"{result['commit_latency_s']['p50']:.3f} / "
                                             f"{result['commit_latency_s']['p99']:.3f}"),
            ("ingest_wire_MBps (first push byte → last ack)", f"{result['ingest_wire_MBps']:.0f}"),
            ("merge_MBps (fp32, merge time only)", f"{result['merge_MBps']:.0f}"),
            ("aggregation MB/s (fp32, over the commit latency)", f"{result['aggregation_MBps']:.0f}"),
            ("memcpy MB/s (same size)", f"{result['memcpy_MBps']:.0f}"),
            ("merge / memcpy", f"{result['merge_vs_memcpy']:.4f}"),
            ("aggregation / memcpy", f"{result['aggregation_vs_memcpy']:.4f}"),
            ("spill_MBps (disk, fsynced)", f"{result['spill_MBps']:.0f}"),
            ("state dir spill MB/s (fsynced)", f"{result['state_dir_spill_MBps']:.0f}"),
            ("coordinator RSS first / last round (MB)", f"{rss[0]:.0f} / {rss[-1]:.0f}"),
            ("RSS growth over the last 100 rounds (fit / endpoints)",
             f"{result['rss_growth_last_100']:+.2%} / {result['rss_growth_last_100_endpoints']:+.2%}")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"written to {args.json_path}")
    return 0
