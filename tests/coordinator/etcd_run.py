"""Real processes for the etcd fault tests (tests/coordinator/test_etcd_outage.py): an etcd server
that can be killed and started again on its data and ports, a TCP proxy of the tests' own whose
link can be cut without closing anything, and a run of coordinator and island processes sharing
one state directory, with what their logs say and sim/goodput.py's accounting of their pushes.

Every process is started in its own session and killed by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from archipelago import config as cfglib
from archipelago import procs
from coordinator.etcd import EtcdSession, etcd_store
from island.job import write_initial_model
from sim.goodput import accounting
from sim.run import ProcessGroup, SimConfig
from tests.coordinator.conftest import ADMIN_CREDENTIAL, SMALL, TOKENS
from tests.coordinator.processes import admin_status, wait_for

START_TIMEOUT_S = 30.0


class EtcdServer:
    """One etcd member on fixed loopback ports and a data directory, so it can be killed (SIGKILL)
    and started again on the same state."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client, self.peer = procs.free_port(), procs.free_port()
        self.endpoint = f"127.0.0.1:{self.client}"
        self.proc: subprocess.Popen | None = None
        self._probe: EtcdSession | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> tuple[float, float]:
        """Start etcd and wait until it answers a read. Returns (the start time of the last probe
        that failed, the end time of the first that answered), wall clock: etcd became ready in between."""
        log = open(self.dir / "etcd.log", "a")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-cluster", f"test=http://127.0.0.1:{self.peer}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self._probe is None:  # a short reconnect backoff: it notices etcd within ~0.1 s
            self._probe = EtcdSession(self.endpoint, "/probe", ttl_s=0.4)
        failed_at = time.time()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.tail()}")
            started = time.time()
            try:
                self._probe.run(self._probe.client.get(b"/probe"), timeout=1.0)
                return failed_at, time.time()
            except Exception:
                failed_at = started
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"etcd did not answer within {timeout_s}s:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            procs.kill_group(self.proc)

    def close(self) -> None:
        self.kill()
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def tail(self) -> str:
        return (self.dir / "etcd.log").read_text(errors="replace")[-2000:]


class CutProxy:
    """A TCP proxy in front of `target` whose link can be cut as a dropped network path is: bytes
    stop flowing both ways and new connections are accepted and go nowhere, with nothing closed or
    reset (the peers only see silence). `heal` restores the path and closes what was held, so the
    peers reconnect."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(conn)
            if self.cut.is_set():  # nothing behind it: read and drop
                threading.Thread(target=self._pump, args=(conn, None), daemon=True).start()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._sockets.append(up)
            threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if dst is not None and not self.cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def heal(self) -> None:
        self.cut.clear()
        with self._lock:
            held, self._sockets = self._sockets, []
        for s in held:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.heal()
        self.listener.close()


class EtcdRun:
    """Two island processes and coordinators sharing one state directory on etcd (see the module
    docstring). Islands keep the default patience (no `reconnect_timeout_s`)."""

    ISLANDS = ("island-0", "island-1")

    def __init__(self, tmp_path: Path, data_cache: str, ttl_s: int, rounds: int, h: int, *extra: str) -> None:
        self.dir = tmp_path
        self.ttl_s = ttl_s
        self.prefix = f"/test/{uuid.uuid4().hex}"
        cfg = cfglib.load(SimConfig, "ci", SMALL + [
            f"data.cache_dir={data_cache}", f"diloco.inner_steps={h}", f"diloco.rounds={rounds}",
            "diloco.eval_every_rounds=0", f"diloco.ack_log={json.dumps(str(tmp_path / 'acks-{island_id}.jsonl'))}",
            "coordinator.min_islands=2", f"coordinator.etcd_lease_ttl_s={ttl_s}",
            f"coordinator.etcd_prefix={json.dumps(self.prefix)}", *extra])
        self.rounds = rounds
        self.preset = tmp_path / "run.toml"
        self.preset.write_text(cfglib.dump_toml(asdict(cfg)))
        self.init = write_initial_model(cfg, tmp_path / "init")
        self.islands_file = tmp_path / "islands.json"
        self.islands_file.write_text(json.dumps(TOKENS))
        self.state_dir = tmp_path / "state"
        self.group = ProcessGroup(tmp_path)
        self.ports: dict[str, int] = {}

    def start_coordinator(self, name: str, etcd: str) -> None:
        self.ports[name] = procs.free_port()
        self.group.start(name, [
            "coordinator", "serve", "--preset", str(self.preset), "--init", str(self.init), "--state-dir",
            str(self.state_dir), "--host", "127.0.0.1", "--port", str(self.ports[name]), "--etcd", etcd,
            "--set", f"coordinator.islands_file={json.dumps(str(self.islands_file))}"],
            env={"ARCHIPELAGO_ADMIN_CREDENTIAL": ADMIN_CREDENTIAL})

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            return admin_status(self.ports[name], timeout=2.0)
        except grpc.RpcError:
            return None

    def serving(self, name: str, timeout_s: float = 120.0) -> dict[str, Any]:
        return procs.wait_serving(lambda: self.status(name), self.group.procs[name], name, timeout_s,
                                  tail=lambda: self.group.tail(name, 30))

    def start_islands(self, coordinators: list[str]) -> None:
        addresses = ",".join(f"127.0.0.1:{self.ports[c]}" for c in coordinators)
        for i, island in enumerate(self.ISLANDS):
            self.group.start(island, [
                "island", "run", "--preset", str(self.preset), "--coordinator", addresses, "--island-id", island,
                "--island-index", str(i), "--num-islands", str(len(self.ISLANDS)), "--token", TOKENS[island],
                "--report", str(self.dir / f"{island}.json")])

    def wait(self, predicate, what: str, watch: tuple[str, ...], timeout_s: float) -> Any:
        """Poll `predicate` until it returns something true; fail early if a watched process exited
        (an island with any nonzero status, a coordinator with any)."""
        return wait_for(self.group, predicate, what, watch, timeout_s, may_end=self.ISLANDS)

    def version(self) -> int:
        """The version of whichever coordinator serves (-1: none)."""
        versions = [s["version"] for s in map(self.status, self.ports) if s is not None]
        return max(versions, default=-1)

    def islands_done(self, watch: tuple[str, ...], timeout_s: float) -> dict[str, float]:
        """Block until both islands exited 0 (bounded); their end times."""
        ended: dict[str, float] = {}

        def done() -> bool:
            for island in self.ISLANDS:
                if island not in ended and self.group.procs[island].poll() == 0:
                    ended[island] = time.time()
            return len(ended) == len(self.ISLANDS)

        self.wait(done, "the islands did not finish", watch, timeout_s)
        return ended

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def reports(self) -> dict[str, dict[str, Any]]:
        return {i: json.loads((self.dir / f"{i}.json").read_text()) for i in self.ISLANDS}

    def count(self, endpoint: str, ended: dict[str, float]) -> dict[str, Any]:
        """sim/goodput.py's accounting: the islands' ack logs against the versions committed in etcd."""
        session = EtcdSession(endpoint, self.prefix)
        try:
            store = etcd_store(session, -1)  # read only
            versions, applied = store.versions(), {k[:3] for k in store.applied_keys()}
        finally:
            session.close()
        acks = {}
        for island in self.ISLANDS:
            path = self.dir / f"acks-{island}.jsonl"
            acks[island] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        starts = [a["t"] for log in acks.values() for a in log if a["event"] == "start"]
        return accounting({"acks": acks, "versions": versions, "applied": applied, "stopped": {},
                           "t_start": min(starts), "finished": ended})

    def kill_all(self) -> None:
        for proc in self.group.procs.values():
            procs.kill_paused_group(proc)
