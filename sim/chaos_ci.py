"""`archipelago chaos --preset ci`: the multi-region run under a seeded fault schedule, against the
same run without faults and a model of synchronous data parallel under the same failure trace.

Topology: islands reach the coordinator through link proxies (sim/wan.py), one per coordinator
address. With `etcd` on PATH (or `faults.failover = "etcd"`) a local etcd server elects the leader
among two coordinators sharing one state directory, and islands get both addresses; without it a
single coordinator is killed and restarted on its sqlite state. Faults (sim/faults.py) start once
every island has started training. Afterwards the runner waits until the coordinator holds no
pending push (an island's last push is marked as such, so once the others finished a late one
closes its round alone) and reads:

- from each island's push log (`diloco.ack_log`): every push the coordinator acknowledged, with
  the seconds of inner compute that produced it;
- from the coordinator's state store (sqlite, or etcd): the push keys of every committed version.

    updates_lost            acknowledged pushes that no committed version applied
    updates_applied_twice   push keys listed by more than one committed version
    goodput                 compute seconds of applied pushes (less any time the island was
                            SIGSTOPped inside them) / island-seconds from the first island's start
                            to each island's exit
    goodput_breakdown       where the other island-seconds went (`breakdown`): work a kill destroyed,
                            restarts, SIGSTOPped time, pushes not applied, and the rest
    dp_goodput_same_trace   sim/faults.py `dp_goodput`, with this run's step time, round length and
                            measured island restart time
    loss_gap_vs_fault_free  eval loss of θ_g after the chaos run − after the fault-free run
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from archipelago import config as cfglib
from archipelago.config import ConfigError
from archipelago.runinfo import run_metadata
from coordinator.store import StateStore, sqlite_store
from island.data import open_dataset
from island.job import write_initial_model
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from sim.faults import FaultsSection, Injector, dp_goodput, overlap, schedule
from sim.run import ProcessGroup, SimConfig, evaluate_global
from sim.wan import LinkProxy

START_TIMEOUT_S = 180.0


@dataclass
class ChaosCiConfig(SimConfig):
    """A sim job plus the `[faults]` table."""

    faults: FaultsSection = field(default_factory=FaultsSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.faults.failover not in ("auto", "etcd", "restart"):
            raise ConfigError(f"faults.failover must be auto, etcd or restart, got {self.faults.failover!r}")
        if self.faults.failover == "etcd" and shutil.which("etcd") is None:
            raise ConfigError("faults.failover = etcd needs an etcd binary on PATH (apt-get install etcd-server)")
        if self.sim.islands < 3:
            raise ConfigError(f"the chaos run needs sim.islands >= 3 (got {self.sim.islands})")


def handles(preset: str) -> bool:
    """Is `preset` one of these runs (configs/chaos-PRESET.toml exists, or it has a [faults] table)?
    The island presets (a [chaos] table: a rank killed inside an island) belong to sim/chaos.py."""
    if not preset.endswith(".toml") and (cfglib.configs_dir() / f"chaos-{preset}.toml").is_file():
        return True
    try:
        return "faults" in cfglib.load_preset(preset)
    except ConfigError:
        return False


def load_config(preset: str, overrides: list[str]) -> ChaosCiConfig:
    """`ci` means configs/chaos-ci.toml where it exists (the ci run, set up for faults)."""
    if not preset.endswith(".toml") and (cfglib.configs_dir() / f"chaos-{preset}.toml").is_file():
        preset = f"chaos-{preset}"
    return cfglib.load(ChaosCiConfig, preset, overrides)


def free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Cluster:
    """Coordinator(s), islands behind link proxies, optionally etcd: started, faulted, stopped."""

    def __init__(self, cfg: ChaosCiConfig, out: Path, preset_file: Path, use_etcd: bool) -> None:
        self.cfg, self.out, self.preset_file, self.use_etcd = cfg, out, preset_file, use_etcd
        self.host = cfg.sim.host
        self.group = ProcessGroup(out)
        self.coord_dir = out / "coordinator"
        self.credential = secrets.token_hex(16)
        self.tokens = {f"island-{i}": secrets.token_hex(16) for i in range(cfg.sim.islands)}
        self.current: dict[str, str] = {}  # island -> name of its live process in the group
        self.down: set[str] = set()  # islands killed and not restarted yet
        self.proxies: dict[str, list[LinkProxy]] = {}
        self.coordinators: list[tuple[str, int]] = []  # (process name, port), in address order
        self.coordinator_starts = 0
        self.done = threading.Event()
        self.finished: dict[str, float] = {}
        self.etcd: subprocess.Popen | None = None
        self.etcd_endpoint = ""
        self.prefix = f"/archipelago/chaos-{secrets.token_hex(4)}"

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.coord_dir.exists():
            shutil.rmtree(self.coord_dir)
        self.coord_dir.mkdir(parents=True)
        write_initial_model(self.cfg, self.coord_dir / "init")
        (self.coord_dir / "islands.json").write_text(json.dumps(self.tokens))
        os.chmod(self.coord_dir / "islands.json", 0o600)
        if self.use_etcd:
            self._start_etcd()
        ports = [free_port(self.host) for _ in range(2 if self.use_etcd else 1)]
        for i, port in enumerate(ports):
            name = f"coordinator-{'ab'[i]}" if self.use_etcd else "coordinator"
            self.coordinators.append((name, port))
            self._start_coordinator(name, port)
            if i == 0:
                self._wait_serving(port, name)
        for i, island in enumerate(self.tokens):
            self.proxies[island] = [LinkProxy(f"{self.host}:{port}", listen_host=self.host, wan=self.cfg.sim.link(i),
                                              seed=self.cfg.train.seed + i).start() for _, port in self.coordinators]
            self._start_island(island, island)

    def _start_etcd(self) -> None:
        data = self.out / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        client, peer = free_port(self.host), free_port(self.host)
        self.etcd_endpoint = f"{self.host}:{client}"
        log = open(data / "etcd.log", "w")
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "chaos", "--data-dir", str(data / "data"),
             "--listen-client-urls", f"http://{self.etcd_endpoint}", "--advertise-client-urls",
             f"http://{self.etcd_endpoint}", "--listen-peer-urls", f"http://{self.host}:{peer}",
             "--initial-advertise-peer-urls", f"http://{self.host}:{peer}",
             "--initial-cluster", f"chaos=http://{self.host}:{peer}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _start_coordinator(self, name: str, port: int) -> None:
        argv = ["coordinator", "serve", "--preset", str(self.preset_file), "--init", str(self.coord_dir / "init"),
                "--state-dir", str(self.coord_dir), "--host", self.host, "--port", str(port),
                "--set", f"coordinator.islands_file={json.dumps(str(self.coord_dir / 'islands.json'))}",
                "--set", f"coordinator.etcd_prefix={json.dumps(self.prefix)}",
                "--set", f"coordinator.etcd_lease_ttl_s={self.cfg.faults.etcd_lease_ttl_s}"]
        if self.use_etcd:
            argv += ["--etcd", self.etcd_endpoint]
        self.group.start(name, argv, env={"ARCHIPELAGO_ADMIN_CREDENTIAL": self.credential})
        self.coordinator_starts += 1

    def _start_island(self, island: str, name: str) -> None:
        i = list(self.tokens).index(island)
        self.current[island] = name
        self.down.discard(island)
        addresses = ",".join(p.address for p in self.proxies[island])
        self.group.start(name, [
            "island", "run", "--preset", str(self.preset_file), "--coordinator", addresses,
            "--island-id", island, "--island-index", str(i), "--num-islands", str(len(self.tokens)),
            "--report", str(self.out / f"{island}.json"),
            "--set", f"diloco.ack_log={json.dumps(str(self.out / 'acks-{island_id}.jsonl'))}"],
            env={"ARCHIPELAGO_ISLAND_TOKEN": self.tokens[island]})

    def _wait_serving(self, port: int, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while self.status(port) is None:
            proc = self.group.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.group.tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not serve within {timeout_s}s")
            time.sleep(0.1)

    def status(self, port: int | None = None) -> dict[str, Any] | None:
        port = port if port is not None else self.leader_port()
        try:
            with grpc.insecure_channel(f"{self.host}:{port}") as channel:
                reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=self.credential), timeout=3)
            return json.loads(reply.json)
        except grpc.RpcError:
            return None

    def leader_port(self) -> int:
        return int((self.coord_dir / "address").read_text().strip().rsplit(":", 1)[1])

    def leader_index(self) -> int:
        return [p for _, p in self.coordinators].index(self.leader_port())

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Block until every island logged its start; the wall time of the first start."""
        deadline = time.monotonic() + timeout_s
        while True:
            starts = [s for island in self.tokens for s in self.acks(island) if s["event"] == "start"]
            if len({s["island"] for s in starts}) == len(self.tokens):
                return min(s["t"] for s in starts)
            self._check_islands()
            if time.monotonic() > deadline:
                raise TimeoutError(f"islands did not all start within {timeout_s}s")
            time.sleep(0.2)

    def _check_islands(self) -> None:
        for island, name in self.current.items():
            if island in self.down:
                continue
            code = self.group.procs[name].poll()
            if code not in (None, 0):
                raise RuntimeError(f"{name} exited with {code}:\n{self.group.tail(name, 30)}")

    def wait_islands(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.finished) < len(self.tokens):
            for island, name in self.current.items():
                if island not in self.finished and island not in self.down and self.group.procs[name].poll() == 0:
                    self.finished[island] = time.time()
            self._check_islands()
            if time.monotonic() > deadline:
                raise TimeoutError(f"islands {sorted(set(self.tokens) - set(self.finished))} did not finish "
                                   f"within {timeout_s}s")
            time.sleep(0.2)

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Wait until the coordinator holds no pending push (the deadline closes the last rounds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status is not None and status["pending_pushes"] == 0:
                return status
            if time.monotonic() > deadline:
                return status or {}
            time.sleep(0.5)

    def acks(self, island: str) -> list[dict[str, Any]]:
        path = self.out / f"acks-{island}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def store(self) -> tuple[StateStore, Any]:
        """A read-only view of the run's state store, and what to close after."""
        if not self.use_etcd:
            store = sqlite_store(self.coord_dir)
            return store, store
        from coordinator.etcd import EtcdSession, etcd_store

        session = EtcdSession(self.etcd_endpoint, self.prefix)
        return etcd_store(session, -1), session

    def stop(self) -> None:
        self.done.set()
        try:
            with grpc.insecure_channel(f"{self.host}:{self.leader_port()}") as channel:
                pb_grpc.AdminStub(channel).Shutdown(pb.AdminRequest(credential=self.credential), timeout=10)
        except (grpc.RpcError, OSError, ValueError):
            pass
        for proc in self.group.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)  # a paused one must be able to die
                except ProcessLookupError:
                    pass
        self.group.kill_all()
        for links in self.proxies.values():
            for proxy in links:
                proxy.stop()

    def stop_etcd(self) -> None:
        if self.etcd is not None and self.etcd.poll() is None:
            os.killpg(self.etcd.pid, signal.SIGKILL)
            self.etcd.wait(timeout=10)

    # ---- what the injector calls ----------------------------------------------------------------

    def links(self, island: str) -> list[LinkProxy]:
        return self.proxies[island]

    def island_pid(self, island: str) -> int:
        return self.group.procs[self.current[island]].pid

    def kill_island(self, island: str) -> None:
        self.down.add(island)
        self.group.kill(self.current[island])

    def restart_island(self, island: str) -> None:
        n = sum(1 for name in self.group.procs if name.startswith(f"{island}-restart"))
        self._start_island(island, f"{island}-restart{n + 1}")

    def kill_coordinator(self) -> str:
        port = self.leader_port()
        name = next(n for n, p in self.coordinators if p == port)
        self.version_at_kill = (self.status(port) or {}).get("version", -1)
        self.group.kill(name)
        if self.use_etcd:
            return "failover"
        (self.coord_dir / "address").unlink(missing_ok=True)
        return "restart"

    def restart_coordinator(self) -> None:
        name, port = self.coordinators[0]
        restarted = f"{name}-restart{self.coordinator_starts}"
        self.coordinators[0] = (restarted, port)
        self._start_coordinator(restarted, port)


def run_cluster(cfg: ChaosCiConfig, out: Path, preset_file: Path, use_etcd: bool,
                expected_s: float | None) -> dict[str, Any]:
    """One run: with a fault schedule when `expected_s` is given, else fault-free."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("acks-*.jsonl"):
        old.unlink()
    cluster = Cluster(cfg, out, preset_file, use_etcd)
    injector = None
    faults = schedule(cfg.faults, cfg.train.seed, cfg.sim.islands, expected_s) if expected_s else []
    try:
        cluster.start()
        t_start = cluster.wait_started()
        t0 = time.monotonic() - (time.time() - t_start)
        if faults:
            injector = Injector(faults, cluster, t0, cfg.faults).start()
        cluster.wait_islands(cfg.sim.timeout_s)
        cluster.done.set()
        if injector is not None:
            injector.join(60)
        final = cluster.drain(max(60.0, 2 * cfg.coordinator.round_deadline_s))
        store, closer = cluster.store()
        try:
            applied = {k[:3] for k in store.applied_keys()}
            versions = store.versions()
            events = store.events()
        finally:
            closer.close()
        links = [p.stats for ps in cluster.proxies.values() for p in ps]
        logs = {name: (out / f"{name}.log").read_text(errors="replace") for name in cluster.group.procs}
    finally:
        cluster.stop()
        cluster.stop_etcd()
    acks = {island: cluster.acks(island) for island in cluster.tokens}
    eval_loss, version, _ = evaluate_global(cfg, cluster.coord_dir)
    return {"t_start": t_start, "finished": cluster.finished, "acks": acks, "applied": applied,
            "versions": versions, "events": events, "final_status": final, "eval_loss": eval_loss,
            "final_version": version, "faults": injector.report() if injector else [],
            "stopped": injector.stopped if injector else {}, "injector_errors": injector.errors if injector else [],
            "links": links, "logs": logs, "cluster": cluster}


def accounting(run: dict[str, Any]) -> dict[str, Any]:
    """Lost and doubly applied updates, and goodput, from push logs against committed state."""
    pushes = [a for acks in run["acks"].values() for a in acks if a["event"] == "push"]
    acked = {(a["island"], a["round"], a["fragment"]) for a in pushes}
    listed = [tuple(k) for _, row in run["versions"] for k in row["keys"]]
    twice = len(listed) - len(set(listed))
    useful = 0.0
    for a in pushes:
        if (a["island"], a["round"], a["fragment"]) not in run["applied"]:
            continue
        window = (a["synced_at"] - a["compute_s"], a["synced_at"])
        stopped = overlap(window, run["stopped"].get(a["island"], []))
        useful += max(0.0, a["compute_s"] - stopped)
    available = sum(end - run["t_start"] for end in run["finished"].values())
    return {"updates_acknowledged": len(acked), "updates_lost": len(acked - run["applied"]),
            "lost_keys": sorted(acked - run["applied"]), "updates_applied_twice": twice,
            "useful_compute_s": useful, "available_s": available,
            "goodput": useful / available if available else 0.0,
            "wall_s": max(run["finished"].values()) - run["t_start"],
            "goodput_breakdown": breakdown(run, useful, available)}


def breakdown(run: dict[str, Any], useful: float, available: float) -> dict[str, float]:
    """Where the island-seconds that did not reach the global model went (seconds):

        killed_work_s   a killed process's training since its last acknowledged push (or its start)
        restart_s       from a kill to the replacement's start (registered, θ_b pulled)
        stopped_s       SIGSTOPped time of the slowed island
        not_applied_s   compute of pushes that were acknowledged but not applied, or dropped as stale
        other_s         the rest: process start and exit, syncs that blocked, evaluation
    """
    killed_work = restart = 0.0
    for f in run.get("faults", []):
        if f["kind"] != "kill_island" or f["injected_at_s"] is None:
            continue
        killed_at, acks = f["detail"]["killed_at"], run["acks"].get(f["target"], [])
        before = [a for a in acks if a["t"] <= killed_at]
        if before:
            pid = before[-1]["pid"]
            marks = [a["synced_at"] if a["event"] == "push" else a["t"] for a in before
                     if a["pid"] == pid and a["event"] in ("push", "start")]
            killed_work += max(0.0, killed_at - max(marks)) if marks else 0.0
        replacement = _start_after(acks, killed_at)
        restart += replacement["t"] - killed_at if replacement else 0.0
    stopped = sum(b - a for intervals in run.get("stopped", {}).values() for a, b in intervals)
    not_applied = sum(a["compute_s"] for acks in run["acks"].values() for a in acks
                      if (a["event"] == "push" and (a["island"], a["round"], a["fragment"]) not in run["applied"])
                      or a["event"] == "dropped")
    parts = {"killed_work_s": killed_work, "restart_s": restart, "stopped_s": stopped, "not_applied_s": not_applied}
    parts["other_s"] = available - useful - sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


def recovery(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Decide, fault by fault, whether the run recovered from it (with the evidence)."""
    out = []
    cluster: Cluster = run["cluster"]
    for f in run["faults"]:
        f = dict(f)
        target_acks = run["acks"].get(f["target"], [])
        pushed_after = _pushed_after(target_acks)

        if f["injected_at_s"] is None:
            f["recovered"] = False
        elif f["kind"] == "kill_island":
            start = _start_after(target_acks, f["detail"]["killed_at"])
            f["detail"]["replacement_started_s"] = round(start["t"] - f["detail"]["killed_at"], 2) if start else None
            f["recovered"] = start is not None and pushed_after(start["t"], start["pid"]) \
                and f["target"] in run["finished"]
        elif f["kind"] == "kill_coordinator":
            f["detail"]["version_at_kill"] = getattr(cluster, "version_at_kill", None)
            later = [v for v, row in run["versions"] if row["info"]["time"] > f["detail"]["killed_at"]]
            f["detail"]["versions_after"] = len(later)
            f["recovered"] = bool(later) and min(later) > (f["detail"]["version_at_kill"] or 0)
        elif f["kind"] == "partition":
            f["recovered"] = pushed_after(f["detail"]["to"]) or f["target"] in run["finished"]
        elif f["kind"] == "slow":
            f["recovered"] = f["target"] in run["finished"]
        elif f["kind"] == "corrupt":
            corrupted = sum(p.stats.corrupted for p in cluster.proxies[f["target"]])
            refused = sum(len(re.findall(r"push refused: DATA_LOSS", text)) for name, text in run["logs"].items()
                          if name.startswith("coordinator"))
            f["detail"].update(corrupted_segments=corrupted, data_loss_refusals=refused)
            if not corrupted:
                f["injected_at_s"] = None  # armed, but no push crossed the link afterwards
            f["recovered"] = corrupted > 0 and refused > 0 and pushed_after(f["detail"]["armed_at"])
        out.append(f)
    return out


def _start_after(acks: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The first process start an island logged after wall time `t` (a replacement), or None."""
    return next((a for a in acks if a["event"] == "start" and a["t"] > t), None)


def _pushed_after(acks: list[dict[str, Any]]):
    def pushed_after(t: float, pid: int | None = None) -> bool:
        """Did the island get a push acknowledged after wall time `t` (from process `pid`)?"""
        return any(a["event"] == "push" and a["t"] > t and (pid is None or a["pid"] == pid) for a in acks)

    return pushed_after


def simulate_chaos(cfg: ChaosCiConfig, out: Path, preset_label: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    open_dataset(cfg.data)
    preset_file = out / "chaos-config.toml"
    preset_file.write_text(cfglib.dump_toml(asdict(cfg)))
    use_etcd = cfg.faults.failover == "etcd" or (cfg.faults.failover == "auto" and shutil.which("etcd"))
    clean = run_cluster(cfg, out / "fault-free", preset_file, bool(use_etcd), None)
    clean_acc = accounting(clean)
    chaos = run_cluster(cfg, out / "chaos", preset_file, bool(use_etcd), clean_acc["wall_s"])
    acc = accounting(chaos)
    faults = recovery(chaos)
    injected = [f for f in faults if f["injected_at_s"] is not None]
    step_s = _step_seconds(clean, cfg)
    restarts = [f["detail"]["replacement_started_s"] for f in faults
                if f["kind"] == "kill_island" and f["detail"].get("replacement_started_s")]
    restart_s = statistics.median(restarts) if restarts else 0.0
    checkpoint_every_s = cfg.faults.dp_checkpoint_every_s or step_s * cfg.diloco.inner_steps
    dp = dp_goodput(faults, acc["wall_s"], restart_s, checkpoint_every_s)
    failovers = [f for f in faults if f["kind"] == "kill_coordinator" and f["recovered"]]
    return {
        "preset": preset_label, "islands": cfg.sim.islands, "inner_steps": cfg.diloco.inner_steps,
        "outer_rounds": cfg.diloco.rounds, "fragments": cfg.diloco.fragments, "overlap": cfg.diloco.overlap,
        "faults": faults, "failures_injected": len(injected),
        "recovered": sum(1 for f in injected if f["recovered"]),
        "failover_mode": "etcd standby takeover" if use_etcd else "kill and restart on the sqlite state",
        "coordinator_failovers": len(failovers),
        "goodput": acc["goodput"], "dp_goodput_same_trace": dp["goodput"], "dp_model": dp,
        "updates_lost": acc["updates_lost"], "lost_keys": acc["lost_keys"],
        "updates_applied_twice": acc["updates_applied_twice"], "updates_acknowledged": acc["updates_acknowledged"],
        "final_eval_loss": chaos["eval_loss"], "fault_free_eval_loss": clean["eval_loss"],
        "loss_gap_vs_fault_free": chaos["eval_loss"] - clean["eval_loss"],
        "final_version": chaos["final_version"], "fault_free_version": clean["final_version"],
        "fault_free_goodput": clean_acc["goodput"], "wall_s": acc["wall_s"], "fault_free_wall_s": clean_acc["wall_s"],
        "useful_compute_s": acc["useful_compute_s"], "available_island_s": acc["available_s"],
        "goodput_breakdown": acc["goodput_breakdown"], "fault_free_goodput_breakdown": clean_acc["goodput_breakdown"],
        "step_s": step_s, "guard_events": chaos["events"], "injector_errors": chaos["injector_errors"],
        "corrupted_segments": sum(s.corrupted for s in chaos["links"]),
        "connections_cut": sum(s.cut_connections for s in chaos["links"]),
        "wan_bytes": sum(s.total for s in chaos["links"]),
        **run_metadata(cfg.train.seed, cfg),
    }


def _step_seconds(run: dict[str, Any], cfg: ChaosCiConfig) -> float:
    """Measured seconds of one inner step in the fault-free run (compute only)."""
    pushes = [a for acks in run["acks"].values() for a in acks if a["event"] == "push" and a["compute_s"] > 0]
    steps = cfg.diloco.inner_steps // cfg.diloco.fragments
    return statistics.median(a["compute_s"] for a in pushes) / steps if pushes else 0.0


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    return {"updates_lost == 0": report["updates_lost"] == 0,
            "updates_applied_twice == 0": report["updates_applied_twice"] == 0,
            "every failure recovered": report["recovered"] == report["failures_injected"] > 0,
            "goodput >= 0.90": report["goodput"] >= 0.90,
            "goodput >= 2 x dp": report["goodput"] >= 2 * report["dp_goodput_same_trace"],
            "loss gap <= 0.05": report["loss_gap_vs_fault_free"] <= 0.05,
            "coordinator failovers >= 1": report["coordinator_failovers"] >= 1}


SUMMARY = ("islands", "failover_mode", "failures_injected", "recovered", "coordinator_failovers", "goodput",
           "dp_goodput_same_trace", "updates_lost", "updates_applied_twice", "final_eval_loss",
           "fault_free_eval_loss", "loss_gap_vs_fault_free", "final_version", "wall_s", "fault_free_wall_s")


def run(args: Any) -> int:
    """`archipelago chaos` for presets `handles` accepts; `args` as sim/chaos.py parses them."""
    from archipelago.console import console, summary_table
    from archipelago.runinfo import write_json

    cfg = load_config(args.preset, args.overrides)
    out = Path(args.report)
    console.print(f"[bold]archipelago chaos[/] · {args.preset}: {cfg.sim.islands} islands × {cfg.diloco.rounds} "
                  f"rounds × H={cfg.diloco.inner_steps}; a fault-free run, then the same under faults "
                  f"(seed {cfg.train.seed}); logs in {out}/")
    report = simulate_chaos(cfg, out, args.preset)
    report["targets"] = targets_met(report)
    write_json(out / "report.json", report)
    _plot(out, report)
    console.print(summary_table(f"archipelago chaos · {args.preset}", {k: report[k] for k in SUMMARY}))
    for f in report["faults"]:
        state = "[green]recovered[/]" if f["recovered"] else "[red]NOT recovered[/]"
        when = "not injected" if f["injected_at_s"] is None else f"at {f['injected_at_s']:.1f}s"
        console.print(f"  {f['kind']:<17} {f['target']:<12} {when:<14} {state}")
    for name, ok in report["targets"].items():
        console.print(f"  {'[green]ok[/]' if ok else '[red]missed[/]'}  {name}")
    console.print(f"report: {out / 'report.json'}")
    return 0


def _plot(out: Path, report: dict[str, Any]) -> None:
    """Committed versions over time, with and without faults."""
    from archipelago.plots import line_plot

    series = {}
    for label, folder in (("under faults", "chaos"), ("fault-free", "fault-free")):
        times = sorted(json.loads(line)["t"] for path in (out / folder).glob("acks-*.jsonl")
                       for line in path.read_text().splitlines() if json.loads(line)["event"] == "push")
        if times:
            series[label] = ([t - times[0] for t in times], list(range(1, len(times) + 1)))
    if series:
        line_plot(out / "pushes.png", series, xlabel="seconds", ylabel="acknowledged pushes",
                  title=f"{report['islands']} islands, {report['failures_injected']} faults")
