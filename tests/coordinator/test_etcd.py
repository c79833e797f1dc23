"""Standby coordinators on a real etcd server (started here on free loopback ports, in a temp dir).

1. Leader election and fencing at the store level: a second candidate cannot win while the leader
   keeps its lease; when the leader stalls, it wins within 2 × TTL, and the old leader's next state
   write fails (`Fenced`) and changes nothing.
2. Two `archipelago coordinator serve --etcd` processes sharing a state directory: the standby does
   not serve while the leader lives; when the leader is paused (SIGSTOP) the standby takes over
   within 2 × TTL with the leader's acknowledged push; the old leader, resumed (SIGCONT), cannot
   commit (its lease deadline has passed by its own clock, or its write is fenced): it closes its
   port and stands for election again, as a standby.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from archipelago import procs
from coordinator.config import CoordinatorConfig
from coordinator.etcd import EtcdSession, LeaderElection, etcd_store
from coordinator.store import Fenced
from sim.run import ProcessGroup
from tests.coordinator.processes import admin_status, harness_for, start_coordinator, wait_serving

pytestmark = [pytest.mark.etcd,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="no etcd binary on PATH (apt-get install -y etcd-server)")]

TTL_S = 3
START_TIMEOUT_S = 30.0


def start_etcd(data_dir) -> tuple[subprocess.Popen, str]:
    client, peer = procs.free_port(), procs.free_port()
    log = open(data_dir / "etcd.log", "w")
    proc = subprocess.Popen(
        ["etcd", "--name", "test", "--data-dir", str(data_dir / "data"),
         "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"test=http://127.0.0.1:{peer}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"127.0.0.1:{client}"

    def answers() -> bool:
        try:
            session = EtcdSession(endpoint, "/probe")
        except Exception:
            return False
        try:
            session.run(session.client.get(b"/probe"), timeout=2)
            return True
        except Exception:
            return False
        finally:
            session.close()

    try:
        procs.wait_serving(answers, proc, "etcd", START_TIMEOUT_S, poll_s=0.2,
                           tail=lambda: (data_dir / "etcd.log").read_text()[-2000:])
    except TimeoutError:
        procs.kill_group(proc, timeout_s=None)
        raise
    return proc, endpoint


@pytest.fixture(scope="module")
def etcd(tmp_path_factory) -> Iterator[str]:
    proc, endpoint = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield endpoint
    finally:
        procs.kill_group(proc)


def test_election_and_fenced_writes(etcd):
    prefix = f"/test/{uuid.uuid4().hex}"
    a, b = EtcdSession(etcd, prefix), EtcdSession(etcd, prefix)
    try:
        leader, standby = LeaderElection(a, TTL_S, "a:1"), LeaderElection(b, TTL_S, "b:2")
        assert leader.campaign() == 1
        old = etcd_store(a, leader.epoch)
        old.put("owner", "a")
        won: dict[str, int] = {}
        stop = threading.Event()
        thread = threading.Thread(target=lambda: won.setdefault("epoch", standby.campaign(stop)), daemon=True)
        thread.start()
        time.sleep(TTL_S * 1.5)
        assert not won, "a standby won while the leader kept its lease"
        assert leader.leader()["address"] == "a:1"

        leader._keepalive.cancel()  # the leader stalls: its lease is no longer renewed
        stalled = time.monotonic()
        thread.join(timeout=2 * TTL_S + 2)
        stop.set()
        assert won.get("epoch") == 2 and time.monotonic() - stalled <= 2 * TTL_S
        assert standby.leader()["address"] == "b:2"
        with pytest.raises(Fenced, match="epoch 1 is fenced"):
            old.put("owner", "a-again")
        with pytest.raises(Fenced):
            old.next_epoch("island-0")
        new = etcd_store(b, standby.epoch)
        assert new.get("owner") == "a" and new.epoch("island-0") == 0  # nothing of the fenced writes landed
        new.put("owner", "b")
        assert new.get("owner") == "b"
        standby.resign()
    finally:
        a.close()
        b.close()


def test_standby_takes_over_and_the_paused_leader_cannot_commit(etcd, run_files, tmp_path):
    state_dir = tmp_path / "shared"
    ports = {"a": procs.free_port(), "b": procs.free_port()}
    overrides = ("coordinator.min_islands=2", "coordinator.quorum=0.6", f"coordinator.etcd_lease_ttl_s={TTL_S}",
                 f"coordinator.etcd_prefix=/test/{uuid.uuid4().hex}")
    group = ProcessGroup(tmp_path)
    harness = {k: harness_for(run_files, CoordinatorConfig(chunk_bytes=65536, max_message_bytes=262144), p)
               for k, p in ports.items()}
    a, b = harness["a"], harness["b"]
    try:
        start_coordinator(group, "a", run_files, state_dir, ports["a"], *overrides, etcd=etcd)
        start_coordinator(group, "b", run_files, state_dir, ports["b"], *overrides, etcd=etcd, wait=False)
        time.sleep(2.0)
        with pytest.raises(grpc.RpcError):  # the standby does not serve while the leader lives
            admin_status(ports["b"], timeout=1.0)
        lease0, lease2 = a.register("island-0"), a.register("island-2")
        a.register("island-1")
        assert a.push(lease0, 0, 0, 0, a.pseudo_grad(0, seed=0)).accepted  # acknowledged by the leader

        os.killpg(group.procs["a"].pid, signal.SIGSTOP)
        paused = time.monotonic()
        status = wait_serving(group, "b", ports["b"], timeout_s=4 * TTL_S + 10)
        takeover = time.monotonic() - paused
        assert takeover <= 2 * TTL_S, f"the standby took {takeover:.1f}s to take over (TTL {TTL_S}s)"
        assert status["version"] == 0 and status["pending_pushes"] == 1  # the leader's acknowledged push

        b.register("island-0")
        b.register("island-2")  # every island the run knows is back: no grace to wait out
        new1 = b.register("island-1")
        assert b.push(new1, 0, 0, 0, b.pseudo_grad(0, seed=1)).version == 1  # committed by the new leader

        os.killpg(group.procs["a"].pid, signal.SIGCONT)
        with pytest.raises(grpc.RpcError) as err:  # with this push the old leader's round would close
            a.push(lease2, 0, 0, 0, a.pseudo_grad(0, seed=2))
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
        deadline = time.monotonic() + 2 * TTL_S + 10
        while "standing for election again" not in (tmp_path / "a.log").read_text():
            assert group.procs["a"].poll() is None, (tmp_path / "a.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-2000:]
            time.sleep(0.1)
        log = (tmp_path / "a.log").read_text()
        assert "is fenced" in log or "lost leadership" in log, log[-2000:]
        with pytest.raises(grpc.RpcError):  # a standby again: it does not serve
            admin_status(ports["a"], timeout=1.0)
        after = admin_status(ports["b"])
        assert after["version"] == 1 and [h["version"] for h in after["history"] if "version" in h] == [1]
    finally:
        for proc in group.procs.values():
            procs.kill_paused_group(proc)
        for h in harness.values():
            for channel in h._channels:
                channel.close()
