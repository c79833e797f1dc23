"""Goodput under faults: the data-parallel model of a failure trace, and the accounting of lost and
doubly applied updates and of where the island-seconds went."""

from __future__ import annotations

import pytest

from sim.goodput import accounting, dp_goodput


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
    acc = accounting(run)
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
    acc = accounting(run)
    assert acc["useful_compute_s"] == pytest.approx(8.0) and acc["updates_lost"] == 0
    parts = acc["goodput_breakdown"]
    assert parts["killed_work_s"] == 3.0 and parts["restart_s"] == 5.0
    assert parts["other_s"] == pytest.approx(17.0 - 8.0 - 3.0 - 5.0)


def test_a_kill_costs_only_the_work_since_the_local_checkpoint_its_replacement_resumed_from():
    def push(pid, round_, synced_at, compute_s=4.0):
        return {"event": "push", "island": "island-0", "pid": pid, "round": round_, "fragment": 0,
                "compute_s": compute_s, "synced_at": synced_at, "t": synced_at + 0.1}

    acks = [{"event": "start", "island": "island-0", "pid": 1, "t": 100.0}, push(1, 0, 104.0),
            {"event": "checkpoint", "island": "island-0", "pid": 1, "t": 106.2, "step": 15, "captured_at": 106.0},
            # killed at 107.0, resumed from the checkpoint of 106.0: 1 s of work lost, not 3
            {"event": "start", "island": "island-0", "pid": 2, "t": 112.0,
             "resumed_from": {"step": 15, "captured_at": 106.0}},
            push(2, 1, 114.0)]
    run = {"acks": {"island-0": acks}, "applied": {("island-0", 0, 0), ("island-0", 1, 0)},
           "versions": [(1, {"keys": [["island-0", 0, 0]]}), (2, {"keys": [["island-0", 1, 0]]})],
           "stopped": {}, "t_start": 100.0, "finished": {"island-0": 115.0},
           "faults": [{"kind": "kill_island", "target": ["island-0"], "injected_at_s": 7.0,
                       "detail": {"killed_at": 107.0}}]}
    parts = accounting(run)["goodput_breakdown"]
    assert parts["killed_work_s"] == 1.0 and parts["restart_s"] == 5.0
