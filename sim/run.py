"""A multi-region run on one machine: one coordinator and N island processes over loopback gRPC,
each island's link through a byte-counting proxy, then the data-parallel baseline on the same
model, data and tokens, and a report comparing the two.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch

from archipelago import config as cfglib
from archipelago.checkpoint import read_checkpoint, write_checkpoint
from archipelago.config import ConfigError
from archipelago.procs import kill_group, wait_for_file
from coordinator.config import CoordinatorConfig
from island.data import open_dataset
from island.job import IslandJobConfig, write_initial_model
from island.model import ModelConfig, Transformer
from island.train import ParallelConfig, Trainer, model_tensors
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from protos.broadcast import digest
from sim.law import predicted_gap
from sim.monitor import RunMonitor
from sim.wan import LinkProxy, LinkStats, WanSpec


@dataclass
class SimSection:
    islands: int = 3
    baseline: str = "ddp"  # ddp | none
    timeout_s: float = 1800.0
    host: str = "127.0.0.1"
    wan: str = ""  # every island's emulated link, e.g. "100mbit,50ms"; empty: loopback, unshaped
    wan_per_island: list[str] = field(default_factory=list)  # overrides `wan` island by island
    # Both runs start from a checkpoint trained locally for this many steps (one process, the
    # job's batch, warmup then constant lr) instead of the random init, as DiLoCo is evaluated
    # from a pre-trained model (arXiv:2311.08105); its tokens are reported apart, in neither run.
    warmstart_steps: int = 0

    def link(self, island: int) -> WanSpec | None:
        text = self.wan_per_island[island] if island < len(self.wan_per_island) else self.wan
        return WanSpec.parse(text) if text else None


@dataclass
class SimConfig(IslandJobConfig):
    """An island job plus the `[coordinator]` and `[sim]` tables: the whole simulated run."""

    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    sim: SimSection = field(default_factory=SimSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sim.islands < 1:
            raise ConfigError(f"sim.islands must be >= 1, got {self.sim.islands}")
        if self.sim.baseline not in ("ddp", "none"):
            raise ConfigError(f"sim.baseline must be ddp or none, got '{self.sim.baseline}'")
        for i in range(self.sim.islands):
            self.sim.link(i)  # a malformed link spec fails here, naming it


class ProcessGroup:
    """Child processes started by the simulation, each in its own session, killed by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "archipelago.cli", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        kill_group(self.procs[name], sig)

    def kill_all(self) -> None:
        for name in self.procs:
            self.kill(name)


def run_islands(cfg: SimConfig, out: Path, preset_file: Path, island_command: tuple[str, ...] = ("island", "run"),
                init_model: Any = None, monitor: RunMonitor | None = None) -> dict[str, Any]:
    """Start the coordinator (or its shards, `coordinator.num_shards`) and the islands, wait for
    them, return what they measured.

    `island_command` is the subcommand each island process runs (post-training runs its own);
    `init_model`, when given, is θ_0 instead of the seeded init; `monitor`, when given, shows the run
    live and gives every process a metrics port (sim/monitor.py, sim/scrape.py). A sharded
    coordinator is one process per shard, each on its own port with its own state directory
    `coordinator/shard-I`; each island reaches every shard through its own link proxy and gets their
    addresses joined by ';'.
    """
    n, shards = cfg.sim.islands, cfg.coordinator.num_shards
    cfg.coordinator.check_fragments(cfg.diloco.fragments)
    coord_dir = out / "coordinator"
    if coord_dir.exists():
        shutil.rmtree(coord_dir)
    coord_dir.mkdir(parents=True)
    write_initial_model(cfg, coord_dir / "init", model=init_model)
    tokens = {f"island-{i}": secrets.token_hex(16) for i in range(n)}
    (coord_dir / "islands.json").write_text(json.dumps(tokens))
    os.chmod(coord_dir / "islands.json", 0o600)
    credential = secrets.token_hex(16)
    group = ProcessGroup(out)
    proxies: list[list[LinkProxy]] = []  # per island, one per shard
    names = ["coordinator"] if shards == 1 else [f"coordinator-shard-{i}" for i in range(shards)]
    dirs = [coord_dir] if shards == 1 else [coord_dir / f"shard-{i}" for i in range(shards)]
    if monitor is not None:
        monitor.ports.assign([*(("coordinator", name) for name in names), *(("island", i) for i in tokens)])
    start = time.perf_counter()
    try:
        coords = []
        for i, (name, state_dir) in enumerate(zip(names, dirs, strict=True)):
            coords.append(group.start(name, [
                "coordinator", "serve", "--preset", str(preset_file), "--init", str(coord_dir / "init"),
                "--state-dir", str(state_dir), "--host", cfg.sim.host, "--port", "0",
                "--set", f"coordinator.islands_file={json.dumps(str(coord_dir / 'islands.json'))}",
                # no round closes before every simulated island has joined
                "--set", f"coordinator.min_islands={n}", *(["--shard-index", str(i)] if shards > 1 else []),
                *coordinator_telemetry(monitor, name)],
                env={"ARCHIPELAGO_ADMIN_CREDENTIAL": credential}))
        addresses = [wait_for_file(d / "address", c, 120) for d, c in zip(dirs, coords, strict=True)]
        if monitor is not None:
            monitor.islands_phase("islands", out, list(tokens),
                                  status=lambda: live_status([admin_status(a, credential) for a in addresses]))
        for i, (island_id, token) in enumerate(tokens.items()):
            links = [LinkProxy(a, listen_host=cfg.sim.host, wan=cfg.sim.link(i), seed=cfg.train.seed + i).start()
                     for a in addresses]
            proxies.append(links)
            group.start(island_id, [
                *island_command, "--preset", str(preset_file), "--coordinator", ";".join(p.address for p in links),
                "--island-id", island_id, "--island-index", str(i), "--num-islands", str(n),
                "--report", str(out / f"{island_id}.json"), *island_telemetry(monitor, out, island_id, cfg.sim.host)],
                env={"ARCHIPELAGO_ISLAND_TOKEN": token})
        deadline = time.monotonic() + cfg.sim.timeout_s
        pending = set(tokens)
        while pending:
            for name in list(pending):
                code = group.procs[name].poll()
                if code is None:
                    continue
                if code != 0:
                    raise RuntimeError(f"{name} exited with {code}:\n{group.tail(name)}")
                pending.discard(name)
            for name, coord in zip(names, coords, strict=True):
                if coord.poll() is not None:
                    raise RuntimeError(f"{name} exited with {coord.returncode}:\n{group.tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"islands {sorted(pending)} did not finish within {cfg.sim.timeout_s}s")
            time.sleep(0.2)
        wall = time.perf_counter() - start
        statuses = []
        if monitor is not None:
            monitor.linger()
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                status = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=credential), timeout=30)
                pb_grpc.AdminStub(channel).Shutdown(pb.AdminRequest(credential=credential), timeout=30)
            statuses.append(json.loads(status.json))
        for coord in coords:
            coord.wait(timeout=60)
        if monitor is not None:
            monitor.end_phase(live_status(statuses))
    finally:
        group.kill_all()
        for links in proxies:
            for proxy in links:
                proxy.stop()
    islands = [json.loads((out / f"{i}.json").read_text()) for i in tokens]
    return {"islands": islands, "links": [merged_stats([p.stats for p in links]) for links in proxies],
            "wall_s": wall, "status": statuses[0] if shards == 1 else {"shards": statuses},
            "coordinator_dir": coord_dir}


def merged_stats(stats: list[LinkStats]) -> LinkStats:
    """One island's traffic over its links to every shard, as one link's (the same object for one)."""
    if len(stats) == 1:
        return stats[0]
    out = LinkStats()
    for s in stats:
        out.bytes_up += s.bytes_up
        out.bytes_down += s.bytes_down
        out.corrupted += s.corrupted
        out.cut_connections += s.cut_connections
        for bucket, n in s.timeline.items():
            out.timeline[bucket] = out.timeline.get(bucket, 0) + n
    return out


def state_dirs(coord_dir: Path) -> list[Path]:
    """The state directories of a run's coordinator: itself, or its shards' (shard-0, shard-1, …)."""
    shards = sorted(coord_dir.glob("shard-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return shards or [coord_dir]


def newest_state(coord_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The coordinator's newest checkpoint files (every shard's joined: their fragments are
    disjoint) and its version (a sharded coordinator's composite version: the shards' sum)."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    version = 0
    for state_dir in state_dirs(coord_dir):
        newest = sorted((state_dir / "checkpoints").glob("v*"))[-1]
        shard_files, manifest = read_checkpoint(newest)
        for name, tensors in shard_files.items():
            files.setdefault(name, {}).update(tensors)
        version += int(manifest["version"])
    return files, version


def coordinator_telemetry(monitor: RunMonitor | None, name: str = "coordinator") -> list[str]:
    """The coordinator's `--set` flags for its metrics port (none without a monitor)."""
    if monitor is None:
        return []
    return ["--set", f"coordinator.metrics_port={monitor.ports.port('coordinator', name)}"]


def island_telemetry(monitor: RunMonitor | None, out: Path, island_id: str, host: str) -> list[str]:
    """An island's `--set` flags for its metrics port and progress file (none without a monitor)."""
    if monitor is None:
        return []
    progress = str(out / f"{island_id}.progress.json")
    (out / f"{island_id}.progress.json").unlink(missing_ok=True)
    return ["--set", f"diloco.metrics_port={monitor.ports.port('island', island_id)}",
            "--set", f"diloco.metrics_host={json.dumps(host)}", "--set", f"diloco.progress_file={json.dumps(progress)}"]


def live_status(statuses: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """What the live view reads of the coordinator, from every shard's status (one's, unsharded):
    the composite version, each fragment's committed version from its owner, every shard's
    history in time order."""
    if len(statuses) == 1 or any(s is None for s in statuses):
        return statuses[0] if len(statuses) == 1 else None
    merged = dict(statuses[0])
    merged["version"] = sum(s["version"] for s in statuses)
    merged["fragment_versions"] = [max(v) for v in zip(*(s["fragment_versions"] for s in statuses), strict=True)]
    merged["rounds"] = [max(r) for r in zip(*(s["rounds"] for s in statuses), strict=True)]
    merged["history"] = sorted((e for s in statuses for e in s["history"]), key=lambda e: e.get("time", 0))
    return merged


def admin_status(address: str, credential: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The coordinator's Admin.Status detail, or None while it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=credential), timeout=timeout_s)
        return json.loads(reply.json)
    except grpc.RpcError:
        return None


@torch.no_grad()
def evaluate_global(cfg: SimConfig, coord_dir: Path) -> tuple[float, int, str]:
    """Eval loss of θ_g from the coordinator's newest checkpoint (every shard's), its version, and
    θ_b's digest."""
    files, version = newest_state(coord_dir)
    trainer = Trainer(one_process(cfg))
    tensors = dict(trainer.model.named_parameters()) | dict(trainer.model.named_buffers())
    for name, value in files["theta_g.safetensors"].items():
        tensors[name].copy_(value)
    return trainer.evaluate(), version, digest(files["theta_b.safetensors"])


def fp32_sync_ratio(cfg: SimConfig, islands: list[dict[str, Any]]) -> float | None:
    """Seconds to send the fp32 model once over the slowest emulated link, over the measured
    compute seconds of one round of H inner steps (None on an unshaped link)."""
    links = [cfg.sim.link(i) for i in range(cfg.sim.islands)]
    if any(link is None for link in links):
        return None
    slowest = min(links, key=lambda link: link.rate_bps)
    send_s = synced_numel(cfg.model) * 4 * 8 / slowest.rate_bps + slowest.latency_s
    compute_per_round = sum(i["compute_s"] / i["rounds"] for i in islands) / len(islands)
    return send_s / compute_per_round


def wire_bits_per_param(cfg: SimConfig, island_bytes: list[int]) -> float:
    """An island's bytes in one direction over the run, in bits per synced parameter and round
    (the mean over islands)."""
    per_round = synced_numel(cfg.model) * cfg.diloco.rounds
    return sum(b * 8 / per_round for b in island_bytes) / len(island_bytes)


def synced_numel(model_cfg: ModelConfig) -> int:
    """Elements DiLoCo syncs: parameters (tied ones once) and persistent floating buffers."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    persistent = set(model.state_dict())
    return (sum(p.numel() for p in model.parameters()) +
            sum(b.numel() for n, b in model.named_buffers() if n in persistent and b.is_floating_point()))


def eval_point(point: dict[str, Any], tokens: int) -> dict[str, Any]:
    """One point of island 0's eval curve for the report: θ_b's loss after the round's merge and,
    when the island measured it, its own model's loss before the merge and the difference
    (`merge_gain` > 0: the average is better than the island alone)."""
    out = {"tokens": tokens, "loss": point["loss"], "version": point["version"]}
    if "local_loss" in point:
        out["local_loss"] = point["local_loss"]
        out["merge_gain"] = point["local_loss"] - point["loss"]
    return out


def one_process(cfg: SimConfig) -> SimConfig:
    """The job as one process trains it (the baseline, the warm start, evaluation), whatever the
    islands' replica groups and ranks."""
    return replace(cfg, parallel=ParallelConfig())


def warm_start(cfg: SimConfig, out: Path) -> tuple[Transformer, Path, dict[str, Any]]:
    """Train θ_0 locally for `sim.warmstart_steps` steps; (model, its checkpoint folder, facts)."""
    k = cfg.sim.warmstart_steps
    job = replace(one_process(cfg), optim=replace(cfg.optim, schedule="constant",
                                                  warmup_steps=min(cfg.optim.warmup_steps, k)))
    trainer = Trainer(job, total_steps=k)
    start = time.perf_counter()
    for _ in range(k):
        trainer.train_step()
    facts = {"steps": k, "tokens": k * trainer.tokens_per_step, "eval_loss": trainer.evaluate(),
             "wall_s": time.perf_counter() - start}
    path = write_checkpoint(out, {"model.safetensors": model_tensors(trainer.model)},
                            {"kind": "warmstart", **facts})
    return trainer.model, path, facts


PUSH_TOKENS_FACTOR = 4  # a push may claim this many times the tokens of an island's longest round


def bound_push_tokens(cfg: SimConfig) -> None:
    """Unless the preset bounds it, `coordinator.max_tokens_per_push` becomes `PUSH_TOKENS_FACTOR` ×
    the tokens one island trains on in its longest round (docs/design.md step 6)."""
    if not cfg.coordinator.max_tokens_per_push:
        longest = max(cfg.diloco.steps_in_round(r) for r in range(cfg.diloco.rounds))
        cfg.coordinator.max_tokens_per_push = PUSH_TOKENS_FACTOR * longest * cfg.train.batch_size * cfg.train.seq_len


def simulate(cfg: SimConfig, out: Path, preset_label: str, monitor: RunMonitor | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    open_dataset(cfg.data)  # prepare once, before any process needs it
    bound_push_tokens(cfg)
    preset_file = out / "sim-config.toml"
    preset_file.write_text(cfglib.dump_toml(asdict(cfg)))
    warm = warm_start(cfg, out / "warmstart") if cfg.sim.warmstart_steps else None
    result = run_islands(cfg, out, preset_file, init_model=warm[0] if warm else None, monitor=monitor)
    final_eval, final_version, coordinator_theta_b = evaluate_global(cfg, result["coordinator_dir"])
    island_digests = {i["theta_b_sha256"] for i in result["islands"]}
    n, h = cfg.sim.islands, cfg.diloco.inner_steps
    steps = cfg.total_inner_steps
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    report: dict[str, Any] = {
        "preset": preset_label,
        "islands": n, "inner_steps": h, "outer_rounds": cfg.diloco.rounds, "fragments": cfg.diloco.fragments,
        "round_steps": [cfg.diloco.steps_in_round(r) for r in range(cfg.diloco.rounds)],
        "tokens": sum(i["tokens"] for i in result["islands"]),
        "final_eval_loss": final_eval, "final_version": final_version,
        # a sharded coordinator: its composite version is the sum of the shards' (docs/design.md)
        "coordinator_shards": cfg.coordinator.num_shards,
        "codec": cfg.diloco.codec, "broadcast_codec": cfg.coordinator.broadcast_scheme,
        "wan_bytes": sum(link.total for link in result["links"]),
        "wan_bytes_per_island": [{"up": link.bytes_up, "down": link.bytes_down} for link in result["links"]],
        # on the wire (framing, heartbeats and pulls included), per synced parameter and outer round
        "bits_per_param_up": wire_bits_per_param(cfg, [link.bytes_up for link in result["links"]]),
        "bits_per_param_down": wire_bits_per_param(cfg, [link.bytes_down for link in result["links"]]),
        "peak_wan_bits_per_s": max(link.peak_bits_per_s() for link in result["links"]),
        "compute_utilization": sum(i["compute_s"] / max(1e-9, i["compute_s"] + i["blocked_s"])
                                   for i in result["islands"]) / n,
        "wall_s": result["wall_s"],
        # every island and the coordinator hold the same broadcast copy, bit for bit (None: not
        # checked, the islands left before their last merge with `diloco.wait_last_merge = false`)
        "theta_b_identical": (island_digests == {coordinator_theta_b} if cfg.diloco.wait_last_merge or
                              not cfg.diloco.overlap else None),
        "theta_b_sha256": coordinator_theta_b,
        "warmstart": warm[2] if warm else None,
        "wan": [cfg.sim.link(i).describe() if cfg.sim.link(i) else "loopback (unshaped)" for i in range(n)],
        "fp32_sync_to_compute_ratio": fp32_sync_ratio(cfg, result["islands"]),
        "bandwidth_timeline": [{"t_s": t / 10, "bits_per_s": b * 80} for link in result["links"][:1]
                               for t, b in sorted(link.timeline.items())],
        "diloco_eval_curve": [eval_point(p, cfg.diloco.steps_before(p["round"]) * n * tokens_per_step)
                              for p in result["islands"][0]["eval_curve"]],
    }
    # N counts every synced parameter (the tied embedding once): the conservative count, with the
    # fewest tokens per parameter and, the gap falling with N, the smallest predicted gap
    # (docs/design.md, "The sim report and the scaling law").
    params = synced_numel(cfg.model)
    report.update({"params": params, "tokens_per_param": report["tokens"] / params,
                   **predicted_gap(params, n).fields()})
    # What the last merge bought: island 0's own model before it against θ_b after it.
    if report["diloco_eval_curve"] and "merge_gain" in report["diloco_eval_curve"][-1]:
        report["merge_gain"] = report["diloco_eval_curve"][-1]["merge_gain"]
    if cfg.island.num_replica_groups > 1 or cfg.parallel.num_ranks > 1:  # islands of replica groups
        report.update({key: result["islands"][0][key] for key in ("replica_groups", "ranks_per_group",
                                                                   "expert_parallel")})
        report.update({key: sum(i[key] for i in result["islands"]) for key in (
            "intra_island_failures", "intra_island_recoveries")})
        report["replicas_identical_at_syncs"] = all(i["replicas_identical_at_syncs"] for i in result["islands"])
    if cfg.sim.baseline == "ddp":
        from sim.ddp import PROGRESS_FILE, run_ddp

        if monitor is not None:
            monitor.baseline_phase(out / "ddp" / PROGRESS_FILE, steps)
        # the baseline's curve at the rounds island 0 evaluates θ_b (its final loss is the same)
        ddp = run_ddp(one_process(cfg), n, steps, out / "ddp", eval_every=h * (cfg.diloco.eval_every_rounds or 1),
                      timeout_s=cfg.sim.timeout_s, init=warm[1] if warm else None)
        report.update({
            "baseline_eval_loss": ddp["final_eval_loss"],
            "loss_gap_rel": final_eval / ddp["final_eval_loss"] - 1,
            "baseline_wan_bytes": ddp["baseline_wan_bytes"],
            "comm_reduction": ddp["baseline_wan_bytes"] / report["wan_bytes"],
            "baseline_wall_s": ddp["wall_s"], "baseline_tokens": ddp["tokens"],
            "baseline_eval_curve": ddp["eval_curve"],
        })
    return report
