"""The chaos run of `archipelago chaos --preset ci`: its fault schedule, the data-parallel model, the
accounting of lost and doubly applied updates, the link faults, and a short run end to end."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from sim import chaos_ci
from sim.faults import FaultsSection, dp_goodput, schedule
from sim.wan import LinkProxy


def test_the_schedule_is_seeded_and_holds_every_kind_once():
    a = schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)
    assert [(f.kind, f.at_s, f.target) for f in a] == [
        (f.kind, f.at_s, f.target) for f in schedule(FaultsSection(), seed=7, islands=3, expected_s=100.0)]
    assert sorted(f.kind for f in a) == sorted(["kill_island", "partition", "kill_coordinator", "slow", "corrupt"])
    assert [f.at_s for f in a] == sorted(f.at_s for f in a) and all(0 < f.at_s < 100 for f in a)
    assert {f.target for f in a if f.kind != "kill_coordinator"} <= {"island-0", "island-1", "island-2"}
    other = schedule(FaultsSection(), seed=8, islands=3, expected_s=100.0)
    assert [f.at_s for f in other] != [f.at_s for f in a]


def fault(kind: str, at: float, duration: float = 0.0) -> dict:
    return {"kind": kind, "injected_at_s": at, "duration_s": duration}


def test_dp_model_by_hand():
    # 100 s of wall time, checkpoints every 10 s of progress, restarts cost 5 s.
    trace = [fault("kill_island", 25.0), fault("partition", 50.0, 4.0), fault("slow", 80.0, 10.0)]
    dp = dp_goodput(trace, wall_s=100.0, restart_s=5.0, checkpoint_every_s=10.0)
    # 0-25: progress 25, checkpointed 20; the kill loses 5 and stalls 5 (to t=30).
    # 30-50: progress 40, checkpointed 40; the partition loses 0 and stalls 4 + 5 (to t=59).
    # 59-80: progress 61; 80-90 at 1/5: progress 63; 90-100: progress 73.
    assert dp["goodput"] == pytest.approx(0.73)
    assert dp["rollback_s"] == pytest.approx(5.0) and dp["stall_s"] == pytest.approx(14.0)
    assert dp["straggler_s"] == pytest.approx(8.0)
    assert dp_goodput([], 100.0, 5.0, 10.0)["goodput"] == 1.0
    not_injected = [{"kind": "kill_island", "injected_at_s": None, "duration_s": 0.0}]
    assert dp_goodput(not_injected, 100.0, 5.0, 10.0)["goodput"] == 1.0


def test_accounting_counts_lost_and_twice_applied_updates():
    push = {"event": "push", "fragment": 0, "compute_s": 2.0, "synced_at": 110.0}
    run = {"acks": {"island-0": [{**push, "island": "island-0", "round": 0},
                                 {**push, "island": "island-0", "round": 1}],
                    "island-1": [{**push, "island": "island-1", "round": 0}]},
           "applied": {("island-0", 0, 0), ("island-1", 0, 0)},
           "versions": [(1, {"keys": [["island-0", 0, 0], ["island-1", 0, 0]]}),
                        (2, {"keys": [["island-1", 0, 0]]})],
           "stopped": {"island-1": [(109.0, 109.5)]},
           "t_start": 100.0, "finished": {"island-0": 110.0, "island-1": 110.0}}
    acc = chaos_ci.accounting(run)
    assert acc["updates_lost"] == 1 and acc["lost_keys"] == [("island-0", 1, 0)]
    assert acc["updates_applied_twice"] == 1
    assert acc["useful_compute_s"] == pytest.approx(2.0 + 1.5)  # island-1 was stopped 0.5 s of its 2 s
    assert acc["goodput"] == pytest.approx(3.5 / 20.0)
    assert acc["goodput_breakdown"] == {"killed_work_s": 0.0, "restart_s": 0.0, "stopped_s": 0.5,
                                        "not_applied_s": 2.0, "other_s": 14.0}


def test_the_breakdown_charges_a_kill_its_work_in_flight_and_its_restart():
    def push(pid, round_, synced_at):
        return {"event": "push", "island": "island-0", "pid": pid, "round": round_, "fragment": 0,
                "compute_s": 4.0, "synced_at": synced_at, "t": synced_at + 0.1}

    acks = [{"event": "start", "island": "island-0", "pid": 1, "t": 100.0}, push(1, 0, 104.0),
            # killed at 107.0: 3 s of training since the push at 104.0 are lost; back at 112.0
            {"event": "start", "island": "island-0", "pid": 2, "t": 112.0}, push(2, 1, 116.0)]
    run = {"acks": {"island-0": acks}, "applied": {("island-0", 0, 0), ("island-0", 1, 0)},
           "versions": [(1, {"keys": [["island-0", 0, 0]]}), (2, {"keys": [["island-0", 1, 0]]})],
           "stopped": {}, "t_start": 100.0, "finished": {"island-0": 117.0},
           "faults": [{"kind": "kill_island", "target": "island-0", "injected_at_s": 7.0,
                       "detail": {"killed_at": 107.0}}]}
    acc = chaos_ci.accounting(run)
    assert acc["useful_compute_s"] == pytest.approx(8.0) and acc["updates_lost"] == 0
    parts = acc["goodput_breakdown"]
    assert parts["killed_work_s"] == 3.0 and parts["restart_s"] == 5.0
    assert parts["other_s"] == pytest.approx(17.0 - 8.0 - 3.0 - 5.0)


class Echo:
    """A TCP echo server on loopback, on its own loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        async def echo(reader, writer):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def start():
            self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_the_link_flips_a_byte_going_up_and_a_partition_cuts_it():
    import socket

    echo = Echo()
    proxy = LinkProxy(f"127.0.0.1:{echo.port}").start()
    try:
        host, port = proxy.address.rsplit(":", 1)
        data = bytes(range(256)) * 32  # 8 KiB
        proxy.corrupt_next(min_bytes=4096)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(data)
            got = b""
            while len(got) < len(data):
                got += sock.recv(1 << 16)
        assert proxy.stats.corrupted == 1
        assert sum(a != b for a, b in zip(got, data, strict=True)) == 1
        proxy.partition(True)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(b"x")
                assert sock.recv(10) == b""  # closed: nothing gets through
            except ConnectionResetError:
                pass  # reset: nothing gets through either
        proxy.partition(False)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"back")
            assert sock.recv(10) == b"back"
        assert proxy.stats.cut_connections >= 1
    finally:
        proxy.stop()
        echo.stop()


SMALL = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=128",
         "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "optim.warmup_steps=3",
         "diloco.inner_steps=20", "diloco.rounds=8"]


@pytest.mark.chaos
@pytest.mark.slow
def test_a_short_chaos_run_loses_nothing_and_recovers(data_cache, tmp_path):
    """Every fault of the schedule on a small model: what must hold whatever the timing. (The goodput
    and loss targets are for the ci preset's longer run; here start-up time dominates.)"""
    cfg = chaos_ci.load_config("ci", SMALL + [f"data.cache_dir={data_cache}"])
    report = chaos_ci.simulate_chaos(cfg, tmp_path / "chaos", "test")
    json.dumps(report, default=str)  # the report serializes
    assert report["failures_injected"] >= 4, report["faults"]
    assert report["recovered"] == report["failures_injected"], report["faults"]
    assert report["updates_lost"] == 0 and report["updates_applied_twice"] == 0
    assert report["coordinator_failovers"] == 1
    assert report["updates_acknowledged"] > 0 and report["final_version"] > 0
    assert 0 < report["dp_goodput_same_trace"] < 1 and 0 < report["goodput"] <= 1
    for key in ("faults", "failures_injected", "recovered", "goodput", "dp_goodput_same_trace", "updates_lost",
                "updates_applied_twice", "coordinator_failovers", "final_eval_loss", "fault_free_eval_loss",
                "loss_gap_vs_fault_free", "seed", "config", "versions"):
        assert key in report
