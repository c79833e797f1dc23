"""A leader and a standby coordinator on one shared state directory and a real etcd, with etcd (or the
leader's path to it) taken away, and a clean stop (docs/design.md, "Standby coordinators and etcd").
Lease TTL 2 s where timing is measured; real processes, started and killed by PID, every wait bounded.

1. The leader's link to etcd is cut (tests/coordinator/etcd_run.py: CutProxy, a proxy the leader
   alone uses; bytes stop, nothing is closed) while two islands still reach it: it refuses pushes
   within one TTL of its last renewal, the standby is elected within 2 × TTL of the cut, and the two
   never accept pushes at the same time (from both logs); the old leader stands again as a standby;
   the run finishes with nothing lost or applied twice and the islands count the failover.
2. etcd is killed for 90 s (longer than an island's former 60 s patience) and started again on its
   data: the islands stay up, a coordinator is elected within 2 × TTL of etcd being ready, the run
   finishes, nothing is lost or applied twice (sim/goodput.py's accounting, as the chaos runs).
3. SIGTERM to the leader: the standby is elected within 1 s, the old leader exits 0, its event
   streams end with UNAVAILABLE and a push in flight is refused cleanly (or acknowledged).
4. `archipelago coordinator status` against a leader whose etcd is down answers, marked as the
   coordinator's own view.

The elapsed times are printed (pytest -s) for the record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from archipelago import procs
from coordinator.config import CoordinatorConfig
from protos import archipelago_pb2 as pb
from protos import archipelago_pb2_grpc as pb_grpc
from sim.chaos_cluster import log_times
from sim.run import ProcessGroup
from tests.coordinator.conftest import ADMIN_CREDENTIAL
from tests.coordinator.etcd_run import CutProxy, EtcdRun, EtcdServer
from tests.coordinator.processes import admin_status, harness_for, start_coordinator

pytestmark = [pytest.mark.etcd,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="no etcd binary on PATH (apt-get install -y etcd-server)")]

TTL_S = 2
RUN_TIMEOUT_S = 420.0
ISLANDS = EtcdRun.ISLANDS


class PushProbe:
    """Sends a header-only push from an island the run does not know to one coordinator every 50 ms:
    a coordinator that takes pushes answers NOT_FOUND (it checked the lease), one that has stopped
    taking them answers UNAVAILABLE before looking. Records (sent, answered, code) per probe."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.answers: list[tuple[float, float, grpc.StatusCode]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PushProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        part = pb.PushPart(header=pb.PushHeader(lease=pb.Lease(island_id="probe", lease_id="x", epoch=1)))
        while not self._stop.wait(0.05):
            sent = time.time()
            try:
                self.stub.PushPseudoGrad(iter([part]), timeout=2.0)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            self.answers.append((sent, time.time(), code))

    def first_refused(self) -> float | None:
        return next((got for _, got, code in self.answers if code == grpc.StatusCode.UNAVAILABLE), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.channel.close()


def renewal_before_loss(log_path) -> float:
    """The wall time the leader sent its last renewal etcd answered, as its lost-leadership line says."""
    text = log_path.read_text(errors="replace")
    found = re.search(r"lost leadership \(epoch \d+\): could not renew .*?\(unix (\d+\.\d+)", text)
    assert found, text[-3000:]
    return float(found.group(1))


@pytest.mark.slow
def test_a_leader_cut_off_from_etcd_stops_within_its_ttl_and_the_standby_takes_over(data_cache, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    proxy = CutProxy(etcd.endpoint)  # the leader's path to etcd, and only the leader's
    run = EtcdRun(tmp_path, data_cache, TTL_S, 6, 20)
    probe = None
    watch = ("a", "b", *ISLANDS)
    try:
        run.start_coordinator("a", proxy.address)
        run.serving("a")
        run.start_coordinator("b", etcd.endpoint)
        run.start_islands(["a", "b"])
        run.wait(lambda: (run.status("a") or {}).get("version", 0) >= 2, "a did not commit twice", watch, RUN_TIMEOUT_S)
        probe = PushProbe(run.ports["a"]).start()
        time.sleep(0.5)
        cut_at = time.time()
        proxy.cut.set()
        run.wait(probe.first_refused, "a did not refuse pushes", watch, 4 * TTL_S + 10)
        run.wait(lambda: log_times(run.log("b"), "elected leader"), "b was not elected", watch, 4 * TTL_S + 10)
        time.sleep(0.5)
        probe.stop()
        proxy.heal()  # a reaches etcd again: it stands as a standby, b keeps leading
        run.wait(lambda: "standing for election again" in run.log("a").read_text(), "a did not stand again", watch, 30)
        ended = run.islands_done(watch, RUN_TIMEOUT_S)
        assert run.group.procs["a"].poll() is None and run.status("a") is None, "a serves again, or exited"
        final = run.status("b")
        result = run.count(etcd.endpoint, ended)
    finally:
        if probe is not None:
            probe.stop()
        run.kill_all()
        proxy.close()
        etcd.close()
    renewed = renewal_before_loss(run.log("a"))
    lapse = renewed + TTL_S  # the lease is surely a's until here, by its own clock
    stopped = log_times(run.log("a"), "not accepting pushes or commits from now on")[0]
    elected = log_times(run.log("b"), "elected leader")[0]
    accepted_a, accepted_b = log_times(run.log("a"), "push accepted"), log_times(run.log("b"), "push accepted")
    took = [sent for sent, _, code in probe.answers if code == grpc.StatusCode.NOT_FOUND]
    refused_at = probe.first_refused()
    print(f"\ncut at +0; last renewal at {renewed - cut_at:+.2f}s; a refused its first probe push at "
          f"+{refused_at - cut_at:.2f}s ({refused_at - renewed:.2f}s after its last renewal; TTL {TTL_S}s), logged "
          f"'not accepting' at +{stopped - cut_at:.2f}s; b elected at +{elected - cut_at:.2f}s; a's last accepted "
          f"push at {max(accepted_a) - cut_at:+.2f}s, b's first at +{min(accepted_b) - cut_at:.2f}s; acknowledged "
          f"{result['updates_acknowledged']}, lost {result['updates_lost']}, applied twice "
          f"{result['updates_applied_twice']}")
    assert renewed <= cut_at  # the renewal the deadline counts from was answered before the cut
    # a refuses pushes within one TTL of its last renewal: no probe sent after that was taken, and the
    # first refusal came within the TTL (plus the probe's own period and round trip)
    assert took and max(took) < lapse and refused_at - renewed <= TTL_S + 0.5
    assert stopped - renewed <= TTL_S + 0.5  # its log says so, by the watcher (every 50 ms)
    assert elected - cut_at <= 2 * TTL_S, f"b was elected {elected - cut_at:.2f}s after the cut"
    # never two coordinators taking pushes at once: a's acceptances end before its lease could lapse,
    # b's election (and so all its acceptances) come after
    assert max(accepted_a) < lapse <= elected <= min(accepted_b)
    assert final["version"] == 6 and result["updates_lost"] == 0 and result["updates_applied_twice"] == 0
    reports = run.reports()
    assert all(r["reconnects"] >= 1 and r["coordinator_switches"] >= 1 for r in reports.values()), reports
    assert "CancelledError" not in run.log("a").read_text()


@pytest.mark.slow
def test_etcd_down_for_90s_the_islands_wait_and_a_standby_is_elected_when_it_is_back(data_cache, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    run = EtcdRun(tmp_path, data_cache, TTL_S, 6, 20)
    watch = ("a", "b", *ISLANDS)
    outage_s = 90.0
    try:
        run.start_coordinator("a", etcd.endpoint)
        run.serving("a")
        run.start_coordinator("b", etcd.endpoint)
        run.start_islands(["a", "b"])
        run.wait(lambda: run.version() >= 2, "no coordinator committed twice", watch, RUN_TIMEOUT_S)
        etcd.kill()  # SIGKILL
        killed_at = time.time()
        # the islands stay up however long etcd is away; the coordinators stand (and do not exit)
        run.wait(lambda: time.time() - killed_at >= outage_s, "", watch, outage_s + 30)
        down_before, ready_at = etcd.start()
        elected = run.wait(lambda: [t for name in ("a", "b") for t in log_times(run.log(name), "elected leader")
                                    if t > killed_at], "no coordinator was elected", watch, 4 * TTL_S + 30)
        ended = run.islands_done(watch, RUN_TIMEOUT_S)
        leader = next(name for name in ("a", "b") if run.status(name) is not None)
        final = run.status(leader)
        result = run.count(etcd.endpoint, ended)
    finally:
        run.kill_all()
        etcd.close()
    first = min(elected)
    winner = next(name for name in ("a", "b") if first in log_times(run.log(name), "elected leader"))
    complaints = {name: len(re.findall("election attempt failed|still cannot reach etcd", run.log(name).read_text()))
                  for name in ("a", "b")}
    reports = run.reports()
    loud = {i: len(log_times(run.log(i), "NO COORDINATOR for")) for i in ISLANDS}
    print(f"\netcd down {down_before - killed_at:.1f}s; ready between +{down_before - killed_at:.2f}s and "
          f"+{ready_at - killed_at:.2f}s; {winner} elected {first - ready_at:.2f}s after etcd answered "
          f"({first - down_before:.2f}s after the last probe that failed); election complaints logged "
          f"{complaints}; islands waited {[r['coordinator_wait_s'] for r in reports.values()]}s, reconnects "
          f"{[r['reconnects'] for r in reports.values()]}, loud lines {loud}; acknowledged "
          f"{result['updates_acknowledged']}, lost {result['updates_lost']}, applied twice "
          f"{result['updates_applied_twice']}")
    assert first - down_before <= 2 * TTL_S, f"elected {first - down_before:.2f}s after etcd came back"
    assert final["version"] == 6 and result["updates_lost"] == 0 and result["updates_applied_twice"] == 0
    assert result["updates_acknowledged"] == len(ISLANDS) * 6
    assert all(n >= 1 for n in loud.values()), loud  # a minute without a coordinator was said out loud
    assert all(r["reconnects"] >= 1 and r["coordinator_wait_s"] > 60 for r in reports.values()), reports
    assert all(n <= 20 for n in complaints.values()), complaints  # not one line per attempt


def test_sigterm_hands_over_to_the_standby_within_a_second_and_exits_0(run_files, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    state_dir = tmp_path / "shared"
    ports = {"a": procs.free_port(), "b": procs.free_port()}
    overrides = ("coordinator.min_islands=3", f"coordinator.etcd_lease_ttl_s={TTL_S}",
                 f"coordinator.etcd_prefix=/test/{os.urandom(8).hex()}")
    group = ProcessGroup(tmp_path)
    a = harness_for(run_files, CoordinatorConfig(chunk_bytes=65536, max_message_bytes=262144), ports["a"])
    stream_error: list[grpc.StatusCode] = []
    try:
        start_coordinator(group, "a", run_files, state_dir, ports["a"], *overrides, etcd=etcd.endpoint)
        start_coordinator(group, "b", run_files, state_dir, ports["b"], *overrides, etcd=etcd.endpoint, wait=False)
        deadline = time.monotonic() + 60
        while "standing for election" not in (tmp_path / "b.log").read_text():
            assert time.monotonic() < deadline and group.procs["b"].poll() is None, group.tail("b")
            time.sleep(0.1)
        leases = {i: a.register(i) for i in ("island-0", "island-1", "island-2")}
        assert a.push(leases["island-0"], 0, 0, 0, a.pseudo_grad(0, seed=0)).accepted

        def subscribe() -> None:
            try:
                for _ in a.stub().Subscribe(pb.SubscribeRequest(lease=leases["island-1"])):
                    pass
            except grpc.RpcError as exc:
                stream_error.append(exc.code())

        threading.Thread(target=subscribe, daemon=True).start()
        parts = a.push_parts(leases["island-2"], 0, 0, 0, a.pseudo_grad(0, seed=2))
        release = threading.Event()

        def slow_body():  # a push in flight: its header is in, its body comes after the signal
            yield parts[0]
            release.wait(10)
            yield from parts[1:]

        in_flight: list = []
        pusher = threading.Thread(target=lambda: in_flight.append(_outcome(a.stub(), slow_body())), daemon=True)
        pusher.start()
        time.sleep(0.5)
        term_at = time.time()
        os.kill(group.procs["a"].pid, signal.SIGTERM)
        release.set()
        code = group.procs["a"].wait(timeout=2 * TTL_S + 20)
        elected = log_times(tmp_path / "b.log", "elected leader")
        while not elected and time.monotonic() < deadline + 30:
            time.sleep(0.05)
            elected = log_times(tmp_path / "b.log", "elected leader")
        pusher.join(timeout=10)
        status = _wait_status(ports["b"], group, "b")
    finally:
        for proc in group.procs.values():
            procs.kill_paused_group(proc)
        for channel in a._channels:
            channel.close()
        etcd.close()
    took = elected[0] - term_at
    log = (tmp_path / "a.log").read_text()
    print(f"\nSIGTERM at +0: a exited {code}; b elected at +{took:.2f}s; the push in flight: {in_flight}; "
          f"a's event stream ended with {stream_error}; b holds {status['pending_pushes']} pending pushes")
    assert code == 0, log[-3000:]
    assert took <= 1.0, f"the standby was elected {took:.2f}s after SIGTERM"
    assert "leader lease revoked" in log and "Traceback" not in log, log[-3000:]
    assert stream_error == [grpc.StatusCode.UNAVAILABLE]
    assert in_flight and in_flight[0] in ("accepted", grpc.StatusCode.UNAVAILABLE)
    assert status["pending_pushes"] == (2 if in_flight[0] == "accepted" else 1)


def _outcome(stub, parts) -> object:
    try:
        return "accepted" if stub.PushPseudoGrad(parts, timeout=30).accepted else "not accepted"
    except grpc.RpcError as exc:
        return exc.code()


def _wait_status(port: int, group: ProcessGroup, name: str) -> dict:
    def status():
        try:
            return admin_status(port, timeout=2.0)
        except grpc.RpcError:
            return None

    return procs.wait_serving(status, group.procs[name], name, 60, tail=lambda: group.tail(name, 30))


def test_status_of_a_leader_whose_etcd_is_down_is_its_own_view(run_files, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    port = procs.free_port()
    group = ProcessGroup(tmp_path)
    ttl = 30  # the leader leads on for up to this long without etcd (room for two CLI starts on a busy host)
    env = {**os.environ, "ARCHIPELAGO_ADMIN_CREDENTIAL": ADMIN_CREDENTIAL}
    cli = [sys.executable, "-m", "archipelago.cli", "coordinator", "status", "--address", f"127.0.0.1:{port}"]
    try:
        start_coordinator(group, "a", run_files, tmp_path / "state", port, f"coordinator.etcd_lease_ttl_s={ttl}",
                          f"coordinator.etcd_prefix=/test/{os.urandom(8).hex()}", etcd=etcd.endpoint)
        assert admin_status(port)["view"] == "store"
        etcd.kill()
        killed_at = time.monotonic()
        started = time.monotonic()
        as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env, timeout=ttl)
        took = time.monotonic() - started
        plain = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=ttl)
        still_leading = time.monotonic() - killed_at < ttl and group.procs["a"].poll() is None
    finally:
        for proc in group.procs.values():
            procs.kill_paused_group(proc)
        etcd.close()
    assert as_json.returncode == 0, as_json.stderr
    detail = json.loads(as_json.stdout)
    print(f"\nstatus answered in {took:.2f}s with etcd down: view {detail['view']!r}: {detail.get('view_reason')}")
    assert still_leading
    assert detail["view"] == "local" and "etcd" in detail["view_reason"] and detail["version"] == 0
    assert detail["checkpoints"] == [0] and detail["leader"]["epoch"] >= 1
    assert plain.returncode == 0 and "view: local" in plain.stdout, plain.stdout + plain.stderr
