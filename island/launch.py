"""Starting an island made of replica groups: locally, or one piece at a time on a cluster.

Processes of one island:

    head     the island gateway (the DiLoCo client, island/gateway.py) and, unless
             `island.lighthouse` names one, the island's torchft Lighthouse
    ranks    `num_replica_groups × parallel.num_ranks` processes (`archipelago island replica`),
             each group with its own TCPStore; on a cluster one `torchrun` per group

`archipelago island run --replica-groups R --ranks-per-group K` is all of it on one machine: the
command is the head, starts a TCPStore per group and the ranks as child processes (torchrun's
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and supervises them like
torchelastic would: a group that loses a rank loses all of them (its survivors are killed by PID),
and is started again (fresh store) after `island.restart_delay_s`, then heals from a live group.
With `island.auto_restart = false` a failed group stays down until `POST /groups/G/restart` on
the gateway. Every child is killed by PID when the command ends, and every child exits on its own
when the command's process is gone (its stdin closes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from archipelago.config import ConfigError
from island.replica import ReplicaGroupsConfig, TorchftEndpoint

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2


# ---- the ranks of the island's groups, supervised ------------------------------------------------


@dataclass
class GroupProcs:
    group: int
    incarnation: int
    procs: list[subprocess.Popen]
    store: Any  # the group's TCPStore (this process is its server)
    state: str = "running"  # running | down | finished
    down_since: float = 0.0


@dataclass
class GroupSupervisor:
    """Starts the ranks of every group, restarts a group that loses one, kills all by PID."""

    cfg: ReplicaGroupsConfig
    ranks_per_group: int
    rank_argv: Any  # (group) -> argv of one rank, without the interpreter
    log_dir: Path
    host: str
    groups: dict[int, GroupProcs] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_event: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    restart_requested: set[int] = field(default_factory=set)

    def start(self) -> GroupSupervisor:
        for g in range(self.cfg.num_replica_groups):
            self._start_group(g, incarnation=0)
        threading.Thread(target=self._watch, name="group-supervisor", daemon=True).start()
        return self

    def _start_group(self, g: int, incarnation: int) -> None:
        from torch.distributed import TCPStore

        store = TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=self.cfg.timeout_s))
        procs = []
        for rank in range(self.ranks_per_group):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(self.ranks_per_group), "LOCAL_WORLD_SIZE": str(self.ranks_per_group),
                   "MASTER_ADDR": self.host, "MASTER_PORT": str(store.port),
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            logfile = open(self.log_dir / f"group{g}-rank{rank}.log", "a")
            logfile.write(f"---- incarnation {incarnation} ----\n")
            logfile.flush()
            # stdin stays open for the rank's life: its EOF tells the rank this process is gone.
            procs.append(subprocess.Popen([sys.executable, "-m", "archipelago.cli", *self.rank_argv(g)],
                                          stdin=subprocess.PIPE, stdout=logfile, stderr=subprocess.STDOUT,
                                          env=env))
            logfile.close()
        with self.lock:
            self.groups[g] = GroupProcs(g, incarnation, procs, store)
            self.events.append({"t": time.time(), "kind": "started", "group": g, "incarnation": incarnation,
                                "pids": [p.pid for p in procs]})
        log.info("replica group %d (incarnation %d): ranks %s", g, incarnation, [p.pid for p in procs])

    def _watch(self) -> None:
        while not self.stop_event.wait(POLL_S):
            for g in range(self.cfg.num_replica_groups):
                try:
                    self._check(g)
                except Exception as exc:  # surfaced by `check()` on the head's thread
                    self.error = f"supervising group {g}: {exc}"

    def _check(self, g: int) -> None:
        with self.lock:
            entry = self.groups[g]
        if entry.state == "running":
            codes = [p.poll() for p in entry.procs]
            if all(c == 0 for c in codes):
                entry.state = "finished"
            elif any(c not in (None, 0) for c in codes):
                self._kill(entry.procs)
                entry.state, entry.down_since = "down", time.monotonic()
                with self.lock:
                    self.events.append({"t": time.time(), "kind": "failed", "group": g,
                                        "incarnation": entry.incarnation, "exit_codes": codes,
                                        "pids": [p.pid for p in entry.procs]})
                log.warning("replica group %d lost a rank (exit codes %s); its ranks are stopped", g, codes)
        if entry.state == "down":
            asked = g in self.restart_requested
            timed = self.cfg.auto_restart and time.monotonic() - entry.down_since >= self.cfg.restart_delay_s
            if asked or timed:
                if self.restarts >= self.cfg.max_restarts:
                    self.error = f"replica group {g} failed again after {self.restarts} restarts"
                    return
                self.restarts += 1
                self.restart_requested.discard(g)
                self._start_group(g, entry.incarnation + 1)

    def request_restart(self, g: int) -> str:
        with self.lock:
            entry = self.groups.get(g)
            if entry is None or entry.state != "down":
                return f"group {g} is {entry.state if entry else 'unknown'}; nothing to restart"
            self.restart_requested.add(g)
        return f"group {g} will be restarted"

    def check(self) -> None:
        if self.error:
            raise RuntimeError(self.error)

    def wait_finished(self, timeout_s: float) -> bool:
        """Wait until every running group has finished; False if some are still running."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(e.state != "running" for e in self.groups.values()):
                    return True
            time.sleep(POLL_S)
        return False

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {str(g): {"state": e.state, "incarnation": e.incarnation, "pids": [p.pid for p in e.procs]}
                    for g, e in self.groups.items()}

    @staticmethod
    def _kill(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait(timeout=30)
            if p.stdin:
                p.stdin.close()

    def stop(self) -> None:
        self.stop_event.set()
        with self.lock:
            entries = list(self.groups.values())
        for e in entries:
            self._kill(e.procs)


# ---- the head: gateway (+ lighthouse) ------------------------------------------------------------


def start_lighthouse(cfg: ReplicaGroupsConfig, port: int = 0) -> tuple[Any, str]:
    """The island's torchft Lighthouse in this process; (server, its http://HOST:PORT)."""
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(bind=f"[::]:{port}", min_replicas=cfg.min_replica_groups,
                              join_timeout_ms=cfg.join_timeout_ms, quorum_tick_ms=100,
                              heartbeat_timeout_ms=cfg.heartbeat_timeout_ms)
    return server, f"http://{cfg.host}:{server.address().rsplit(':', 1)[1]}"


def gateway_trainer(job: Any, args: argparse.Namespace):
    """The one-process Trainer the gateway keeps θ_local in (and evaluates θ_b with)."""
    from island.train import ParallelConfig, Trainer

    one = replace(job, parallel=ParallelConfig(num_ranks=1, expert_parallel=False))
    return Trainer(one, island_id=args.island_index, num_islands=args.num_islands,
                   total_steps=job.total_inner_steps)


def run_head(args: argparse.Namespace, job: Any, supervisor_for=None) -> dict[str, Any]:
    """Run the island's head until the DiLoCo client is done; with `supervisor_for(gateway_url,
    lighthouse)` also start and supervise the ranks here. Returns the island's report."""
    from island.gateway import GatewayServer, GatewayState, GroupSteps
    from island.job import run_island

    cfg: ReplicaGroupsConfig = job.island
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum tick at info
    lighthouse, lighthouse_addr = (None, cfg.lighthouse) if cfg.lighthouse else start_lighthouse(
        cfg, getattr(args, "lighthouse_port", 0) or 0)
    state = GatewayState(num_groups=cfg.num_replica_groups, start_timeout_s=cfg.start_timeout_s)
    server = GatewayServer(state, cfg.host, getattr(args, "gateway_port", None) or cfg.gateway_port).start()
    # live status (chaos tooling and operators read it): --status, else next to the report
    status_path = (Path(args.status) if getattr(args, "status", None) else
                   Path(args.report).with_suffix(".status.json") if args.report else None)
    supervisor = None
    stop_status = threading.Event()
    log.info("island %s: gateway %s, lighthouse %s", args.island_id, server.url, lighthouse_addr)
    try:
        trainer = gateway_trainer(job, args)
        if supervisor_for is not None:
            supervisor = supervisor_for(server.url, lighthouse_addr)
            state.on_restart = supervisor.request_restart
        if status_path is not None:
            threading.Thread(target=_write_status, args=(status_path, server.url, lighthouse_addr, state,
                                                          supervisor, stop_status), daemon=True).start()

        steps = GroupSteps(state, health_check=supervisor.check if supervisor is not None else None)
        report = run_island(args, job, trainer, steps=steps,
                            extra=lambda t, s: island_fields(job, steps, state, supervisor))
        if supervisor is not None and not supervisor.wait_finished(cfg.timeout_s):
            log.warning("some replica groups did not finish within %gs; they are killed", cfg.timeout_s)
        return report
    finally:
        stop_status.set()
        if supervisor is not None:
            supervisor.stop()
        if status_path is not None:
            _write_status_once(status_path, server.url, lighthouse_addr, state, supervisor, final=True)
        server.stop()
        if lighthouse is not None:
            lighthouse.shutdown()


def island_fields(job: Any, steps: Any, state: Any, supervisor: GroupSupervisor | None) -> dict[str, Any]:
    """What an island of replica groups adds to its report."""
    snap = state.snapshot()
    heals = [e for e in snap["events"] if e.get("kind") == "healed"]
    group_events = supervisor.events if supervisor is not None else []
    return {
        "replica_groups": job.island.num_replica_groups, "ranks_per_group": job.parallel.num_ranks,
        "expert_parallel": bool(job.parallel.expert_parallel and job.parallel.num_ranks > 1
                                and job.model.num_experts > 0),
        "tokens": steps.tokens_trained,
        "intra_island_failures": sum(1 for e in group_events if e["kind"] == "failed"),
        "intra_island_restarts": sum(1 for e in group_events if e["kind"] == "started" and e["incarnation"] > 0),
        # a group (all its ranks at once) that loaded a live peer's state
        "intra_island_recoveries": len({(e["group"], e["step"]) for e in heals}),
        "recoveries_bit_identical": all(e["peer_sha256"] == e["own_sha256"] for e in heals),
        "heals": heals, "group_events": group_events, "push_log": steps.push_log,
        "sync_digests": snap["sync_digests"],
        "replicas_identical_at_syncs": all(s["identical"] for s in snap["sync_digests"]),
    }


def _write_status_once(path: Path, url: str, lighthouse: str, state: Any, supervisor: GroupSupervisor | None,
                       final: bool = False) -> None:
    snap = state.snapshot()
    body = {"gateway": url, "lighthouse": lighthouse, "final": final, **snap["progress"],
            "groups": supervisor.status() if supervisor is not None else {},
            "group_events": list(supervisor.events) if supervisor is not None else [],
            "events": snap["events"], "time": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def _write_status(path: Path, url: str, lighthouse: str, state: Any, supervisor: GroupSupervisor | None,
                  stop: threading.Event) -> None:
    while not stop.wait(0.5):
        _write_status_once(path, url, lighthouse, state, supervisor)


def run_local_island(args: argparse.Namespace, job: Any) -> dict[str, Any]:
    """`island run` of an island of replica groups: the head and every rank on this machine."""
    cfg: ReplicaGroupsConfig = job.island
    log_dir = Path(args.log_dir) if getattr(args, "log_dir", None) else (
        Path(args.report).parent / f"{args.island_id}-ranks" if args.report else Path("runs") / args.island_id)
    log_dir.mkdir(parents=True, exist_ok=True)

    def supervisor_for(gateway_url: str, lighthouse: str) -> GroupSupervisor:
        def rank_argv(g: int) -> list[str]:
            argv = ["island", "replica", "--preset", args.preset, "--gateway", gateway_url,
                    "--lighthouse", lighthouse, "--replica-group", str(g), "--island-id", args.island_id,
                    "--island-index", str(args.island_index), "--num-islands", str(args.num_islands),
                    "--hostname", cfg.host, "--watch-stdin"]
            for item in args.overrides:
                argv += ["--set", item]
            if args.fragments is not None:
                argv += ["--fragments", str(args.fragments)]
            return argv

        return GroupSupervisor(cfg, job.parallel.num_ranks, rank_argv, log_dir, cfg.host).start()

    return run_head(args, job, supervisor_for)


# ---- one rank --------------------------------------------------------------------------------------


def _exit_when_parent_dies() -> None:
    """Block on stdin (the launcher's pipe); EOF means the launcher is gone, so stop at once."""
    while os.read(0, 4096):
        pass
    os._exit(3)


def run_rank(args: argparse.Namespace, job: Any) -> None:
    """One rank of replica group `args.replica_group`, in torchrun's environment."""
    import torch
    import torch.distributed as dist

    from island.group_link import GatewayClient, GroupLink, run_replica
    from island.parallelize import backend_for
    from island.replica import ReplicaTrainer
    from island.train import pick_device

    if args.watch_stdin:
        threading.Thread(target=_exit_when_parent_dies, daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.island_id}/g{args.replica_group}"
                                                   f"r{os.environ.get('RANK', '0')} %(levelname)s %(message)s")
    for name in ("torchft", "torchft_commits", "torchft_quorums"):  # a line per step otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != job.parallel.num_ranks:
        raise ConfigError(f"this group has {world} ranks (WORLD_SIZE) but parallel.num_ranks is "
                          f"{job.parallel.num_ranks}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"${name} is not set: run the ranks of a group under torchrun (or `island run`)")
    lighthouse = args.lighthouse or job.island.lighthouse
    if not lighthouse:
        raise ConfigError("no lighthouse: pass --lighthouse or set island.lighthouse")
    device = pick_device(job.train.device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device.type), init_method="env://",
                                timeout=timedelta(seconds=job.island.timeout_s))
    endpoint = TorchftEndpoint(lighthouse=lighthouse, store_host=os.environ["MASTER_ADDR"],
                               store_port=int(os.environ["MASTER_PORT"]), hostname=args.hostname,
                               replica_id=f"{args.island_id}_group{args.replica_group}")
    trainer = ReplicaTrainer(job, job.island, args.replica_group, endpoint, island_id=args.island_index,
                             num_islands=args.num_islands, total_steps=job.total_inner_steps)
    link = GroupLink(trainer, GatewayClient(args.gateway, job.diloco.commit_timeout_s), job.diloco)
    try:
        link.start()
        run_replica(trainer, link, job.total_inner_steps)
    finally:
        trainer.manager.shutdown(wait=False)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- command-line pieces (wired in island/run_cli.py) -----------------------------------------------


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replica-groups", type=int, help="override island.num_replica_groups")
    p.add_argument("--ranks-per-group", type=int, help="override parallel.num_ranks")


def layout_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "replica_groups", None) is not None:
        out.append(f"island.num_replica_groups={args.replica_groups}")
    if getattr(args, "ranks_per_group", None) is not None:
        out.append(f"parallel.num_ranks={args.ranks_per_group}")
    return out


def add_head_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", help="keep a live status JSON here (gateway, groups, PIDs, pushes); "
                                    "default: REPORT.status.json beside --report")
    p.add_argument("--log-dir", help="folder for the ranks' logs (default: next to --report)")
    p.add_argument("--gateway-port", type=int, help="override island.gateway_port")
    p.add_argument("--lighthouse-port", type=int, default=0,
                   help="port of the Lighthouse this head starts (when island.lighthouse is empty)")


def add_replica_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", required=True, help="http://HOST:PORT of the island gateway")
    p.add_argument("--lighthouse", default="", help="http://HOST:PORT of the island's Lighthouse")
    p.add_argument("--replica-group", type=int, required=True, help="this group's index in the island")
    p.add_argument("--island-id", required=True)
    p.add_argument("--island-index", type=int, default=0)
    p.add_argument("--num-islands", type=int, default=1)
    p.add_argument("--hostname", default=socket.gethostname(),
                   help="the address peers reach this group at (state transfers, torchft)")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (local launches)")


__all__ = ["GroupSupervisor", "run_head", "run_local_island", "run_rank", "start_lighthouse",
           "add_layout_arguments", "add_head_arguments", "add_replica_arguments", "layout_overrides"]
