"""The processes and links the faults of `archipelago chaos --preset ci` act on: coordinator(s),
islands behind link proxies, optionally etcd; and one run of them, with or without faults.

Islands reach the coordinator through link proxies (sim/wan.py), one per coordinator address. With
`etcd` on PATH (or `faults.failover = "etcd"`) a local etcd server elects the leader among two
coordinators sharing one state directory, each reaching etcd through a link proxy of its own (so
its link alone can be cut), and islands get both addresses; etcd can be killed and started again on
its data and ports. Without etcd a single coordinator is killed and restarted on its sqlite state. Faults (sim/run_faults.py) start once
every island has started training. Afterwards the run waits until the coordinator holds no pending
push (an island's last push is marked as such, so once the others finished a late one closes its
round alone) and reads every island's push log and the push keys of every committed version from
the coordinator's state store (sqlite, or etcd), for sim/goodput.py's accounting.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from archipelago.procs import free_port, kill_group, kill_paused_group, wait_serving
from coordinator.store import StateStore, sqlite_store
from island.job import write_initial_model
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from sim.fault_schedule import Schedule, draw
from sim.monitor import RunMonitor
from sim.run import ProcessGroup, coordinator_telemetry, evaluate_global, island_telemetry
from sim.run_faults import Fault, RunChaosConfig, RunFaultInjector, durations
from sim.wan import LinkProxy

START_TIMEOUT_S = 180.0
DRAIN_BOUND_S = 90.0  # a coordinator given SIGTERM exits within this (its rounds drain for one lease TTL)
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_times(path: Path, text: str) -> list[float]:
    """Wall times of the lines of a process log (`%(asctime)s ...` lines) that contain `text`."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in lines if text in line and (m := LOG_TIME.match(line))]


class Cluster:
    """Coordinator(s), islands behind link proxies, optionally etcd: started, faulted, stopped."""

    def __init__(self, cfg: RunChaosConfig, out: Path, preset_file: Path, use_etcd: bool,
                 monitor: RunMonitor | None = None) -> None:
        self.cfg, self.out, self.preset_file, self.use_etcd = cfg, out, preset_file, use_etcd
        self.monitor = monitor  # the live view; metrics ports kept by process name across restarts
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
        self.spawned: dict[str, float] = {}  # island -> wall time its first process was started
        self.etcd: subprocess.Popen | None = None
        self.etcd_endpoint = ""
        self.etcd_ports: tuple[int, int] = (0, 0)  # client, peer: kept across restarts
        self.etcd_links: dict[int, LinkProxy] = {}  # coordinator port -> its own link to etcd
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
        if self.monitor is not None:  # every metrics port in the scrape config before anything starts
            self.monitor.ports.assign([("coordinator", "coordinator-a" if self.use_etcd else "coordinator"),
                                       *([("coordinator", "coordinator-b")] if self.use_etcd else []),
                                       *(("island", island) for island in self.tokens)])
        for i, port in enumerate(ports):
            name = f"coordinator-{'ab'[i]}" if self.use_etcd else "coordinator"
            self.coordinators.append((name, port))
            self._start_coordinator(name, port)
            if i == 0:
                self._wait_serving(port, name)
            else:  # the standby in the election before any island starts: the islands' start-up is
                # then theirs alone, as a replacement island's is
                self._wait_standing(name)
        for i, island in enumerate(self.tokens):
            self.proxies[island] = [LinkProxy(f"{self.host}:{port}", listen_host=self.host, wan=self.cfg.sim.link(i),
                                              seed=self.cfg.train.seed + i).start() for _, port in self.coordinators]
            self._start_island(island, island)

    def _start_etcd(self, fresh: bool = True) -> None:
        data = self.out / "etcd"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            self.etcd_ports = (free_port(self.host), free_port(self.host))
        client, peer = self.etcd_ports
        self.etcd_endpoint = f"{self.host}:{client}"
        log = open(data / "etcd.log", "a")
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
                "--set", f"coordinator.etcd_lease_ttl_s={self.cfg.faults.etcd_lease_ttl_s}",
                *coordinator_telemetry(self.monitor, name.split("-restart")[0])]
        if self.use_etcd:
            if port not in self.etcd_links:
                self.etcd_links[port] = LinkProxy(self.etcd_endpoint, listen_host=self.host).start()
            argv += ["--etcd", self.etcd_links[port].address]
        self.group.start(name, argv, env={"ARCHIPELAGO_ADMIN_CREDENTIAL": self.credential})
        self.coordinator_starts += 1

    def _start_island(self, island: str, name: str) -> None:
        i = list(self.tokens).index(island)
        addresses = ",".join(p.address for p in self.proxies[island])
        self.spawned.setdefault(island, time.time())
        self.group.start(name, [
            "island", "run", "--preset", str(self.preset_file), "--coordinator", addresses,
            "--island-id", island, "--island-index", str(i), "--num-islands", str(len(self.tokens)),
            "--report", str(self.out / f"{island}.json"),
            "--set", f"diloco.ack_log={json.dumps(str(self.out / 'acks-{island_id}.jsonl'))}",
            "--set", f"diloco.local_checkpoint_dir={json.dumps(str(self.out / 'local-checkpoints' / '{island_id}'))}",
            *island_telemetry(self.monitor, self.out, island, self.host)],
            env={"ARCHIPELAGO_ISLAND_TOKEN": self.tokens[island]})
        # only now, with the process known: the main thread's waits look it up by these names
        self.current[island] = name
        self.down.discard(island)

    def _wait_serving(self, port: int, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_serving(lambda: self.status(port), self.group.procs[name], name, timeout_s,
                     tail=lambda: self.group.tail(name))

    def _wait_standing(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the standby `name` has logged that it stands for election (it holds no port to ask)."""
        log = self.out / f"{name}.log"
        wait_serving(lambda: bool(log_times(log, "standing for election")) or None, self.group.procs[name], name,
                     timeout_s, tail=lambda: self.group.tail(name))

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
        if self.monitor is not None:
            self.monitor.linger()
        try:
            with grpc.insecure_channel(f"{self.host}:{self.leader_port()}") as channel:
                pb_grpc.AdminStub(channel).Shutdown(pb.AdminRequest(credential=self.credential), timeout=10)
        except (grpc.RpcError, OSError, ValueError):
            pass
        for proc in self.group.procs.values():
            kill_paused_group(proc)  # a paused one must be able to die
        for proxy in [p for links in self.proxies.values() for p in links] + list(self.etcd_links.values()):
            proxy.stop()

    def stop_etcd(self) -> None:
        if self.etcd is not None:
            kill_group(self.etcd)

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

    def coordinator(self, role: str = "leader") -> tuple[str, int]:
        """(process name, port) of the leading coordinator, or of one that runs and does not lead."""
        port = self.leader_port()
        if role == "leader":
            return next((n, p) for n, p in self.coordinators if p == port)
        standby = [(n, p) for n, p in self.coordinators if p != port and self.group.procs[n].poll() is None]
        if not standby:
            raise RuntimeError("no standby coordinator is running")
        return standby[0]

    def pid(self, name: str) -> int:
        return self.group.procs[name].pid

    def kill_coordinator(self, role: str = "leader", probe: bool = True) -> str:
        """SIGKILL the leader ("failover" with etcd, else "restart": start it again) or a standby;
        `probe`: ask the leader its version first (`version_at_kill`; not when the moment matters)."""
        name, port = self.coordinator(role)
        self.version_at_kill = (self.status(self.leader_port()) or {}).get("version", -1) if probe else None
        self.group.kill(name)
        if role == "standby":
            return "standby"
        if self.use_etcd:
            return "failover"
        (self.coord_dir / "address").unlink(missing_ok=True)
        return "restart"

    def wait_commit_writing(self, timeout_s: float) -> str | None:
        """Wait (bounded) until the leader is writing a commit: a delta file or a checkpoint folder under
        its temporary name appears in the state directory (the outer step is applied in memory, the store
        transaction not made yet). The path seen, or None."""
        folders = [self.coord_dir / "deltas", self.coord_dir / "checkpoints"]

        def temporary() -> set[str]:
            found = set()
            for folder in folders:
                try:
                    found.update(str(folder / n) for n in os.listdir(folder) if n.startswith(".") and ".tmp-" in n)
                except FileNotFoundError:
                    pass
            return found

        before = temporary()  # left behind by an earlier kill
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.done.is_set():
            new = temporary() - before
            if new:
                return sorted(new)[0]
            time.sleep(0.002)
        return None

    def restart_coordinator(self, name: str | None = None, port: int | None = None) -> None:
        """Start the coordinator `name` on `port` again (by default the first), on the shared state."""
        i = 0 if name is None else [p for _, p in self.coordinators].index(port)
        name, port = self.coordinators[i]
        restarted = f"{name.split('-restart')[0]}-restart{self.coordinator_starts}"
        self.coordinators[i] = (restarted, port)
        self._start_coordinator(restarted, port)

    def term_coordinator(self, role: str = "leader") -> dict[str, Any]:
        """SIGTERM the leader (or a standby) and wait (bounded) for it to exit; with etcd a standby takes
        over."""
        name, port = self.coordinator(role)
        self.version_at_kill = (self.status(self.leader_port()) or {}).get("version", -1)
        proc = self.group.procs[name]
        os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=DRAIN_BOUND_S)
        except subprocess.TimeoutExpired:
            code = kill_group(proc)
        if not self.use_etcd:
            (self.coord_dir / "address").unlink(missing_ok=True)
        mode = "standby" if role == "standby" else "handover" if self.use_etcd else "restart"
        return {"mode": mode, "name": name, "port": port, "exit_status": code}

    def kill_etcd(self) -> None:
        if self.etcd is not None:
            kill_group(self.etcd)

    def restart_etcd(self, timeout_s: float = START_TIMEOUT_S) -> tuple[float, float]:
        """Start etcd again on its data and ports; (the start of the last probe that found it down, the
        end of the first that found it answering), wall clock: it became ready in between."""
        from coordinator.etcd import EtcdSession

        self._start_etcd(fresh=False)
        probe = EtcdSession(self.etcd_endpoint, "/probe", ttl_s=0.4)  # reconnects within ~0.1 s
        try:
            down_before, deadline = time.time(), time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.etcd.poll() is None:
                started = time.time()
                try:
                    probe.run(probe.client.get(b"/probe"), timeout=1.0)
                    return down_before, time.time()
                except Exception:
                    down_before = started
                time.sleep(0.05)
            raise RuntimeError(f"etcd did not answer within {timeout_s}s of its restart")
        finally:
            probe.close()

    def wait_leader(self, after: float, timeout_s: float = 60.0) -> float | None:
        """The wall time a coordinator logged its election after `after`, waiting for it (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            times = [t for name, _ in self.coordinators for t in log_times(self.out / f"{name}.log", "elected leader")
                     if t > after]
            if times or time.monotonic() > deadline:
                return min(times) if times else None
            time.sleep(0.1)

    def leader_etcd_link(self) -> tuple[LinkProxy, str]:
        """The leading coordinator's own link to etcd, and its name."""
        port = self.leader_port()
        return self.etcd_links[port], next(n for n, p in self.coordinators if p == port)


def injected(faults: list[Fault]) -> list[str]:
    """The faults injected so far, as the live view prints them (a corruption is only armed: it hits
    the next large segment the island's link carries up, if one comes)."""
    return [f"{f.kind} on {', '.join(f.targets)} at {f.injected_at_s:.1f}s"
            + (" (armed for the next push)" if f.kind == "corrupt" else "")
            for f in faults if f.injected_at_s is not None]


def run_cluster(cfg: RunChaosConfig, out: Path, preset_file: Path, use_etcd: bool,
                expected_s: float | None, monitor: RunMonitor | None = None,
                schedule: Schedule | None = None) -> dict[str, Any]:
    """One run: under `schedule`, drawn against `expected_s`, when both are given, else fault-free."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("acks-*.jsonl"):
        old.unlink()
    cluster = Cluster(cfg, out, preset_file, use_etcd, monitor)
    injector = None
    faults = (draw(schedule, cfg.train.seed, cfg.sim.islands, expected_s, durations(cfg.faults, expected_s))
              if expected_s and schedule is not None else [])
    try:
        cluster.start()
        if monitor is not None:
            monitor.islands_phase("faults" if faults else "fault-free", out, list(cluster.tokens), cluster.status,
                                  lambda: injected(faults))
        t_start = cluster.wait_started()
        t0 = time.monotonic() - (time.time() - t_start)
        if faults:
            injector = RunFaultInjector(faults, cluster, t0, cfg.faults).start()
        cluster.wait_islands(cfg.sim.timeout_s)
        cluster.done.set()
        if injector is not None:
            injector.join(60)
        final = cluster.drain(max(60.0, 2 * cfg.coordinator.round_deadline_s))
        if monitor is not None:
            monitor.end_phase(final)
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
            "fault_objects": faults, "spawned": cluster.spawned,
            "links": links, "logs": logs, "cluster": cluster}
