"""The local island launcher's supervision of replica groups, with ranks that fail at once."""

from __future__ import annotations

import os
import time

import pytest

from island.launch import GroupSupervisor
from island.replica import ReplicaGroupsConfig


def supervise(tmp_path, **cfg) -> GroupSupervisor:
    # `archipelago frobnicate` exits with status 2 in a moment (no torch import): a rank that dies
    return GroupSupervisor(ReplicaGroupsConfig(num_replica_groups=2, **cfg), ranks_per_group=2,
                           rank_argv=lambda g: ["frobnicate"], log_dir=tmp_path, host="127.0.0.1")


def wait_for(what, done, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def pids_alive(events) -> list[int]:
    alive = []
    for pid in (p for e in events for p in e["pids"]):
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_a_failed_group_is_restarted_until_the_restart_budget_is_spent(tmp_path):
    sup = supervise(tmp_path, restart_delay_s=0.1, max_restarts=3).start()
    try:
        wait_for("the restart budget to run out", lambda: sup.error is not None)
        with pytest.raises(RuntimeError, match="failed again after 3 restarts"):
            sup.check()
        failed = [e for e in sup.events if e["kind"] == "failed"]
        restarted = [e for e in sup.events if e["kind"] == "started" and e["incarnation"] > 0]
        assert len(restarted) == 3 and len(failed) >= 4
        assert all(any(code not in (None, 0) for code in e["exit_codes"]) for e in failed)
        assert "unknown command 'frobnicate'" in (tmp_path / "group0-rank1.log").read_text()
    finally:
        sup.stop()
    assert pids_alive(sup.events) == []


def test_without_auto_restart_a_failed_group_waits_to_be_asked(tmp_path):
    sup = supervise(tmp_path, auto_restart=False).start()
    try:
        wait_for("both groups to be down", lambda: all(g["state"] == "down" for g in sup.status().values()))
        time.sleep(0.5)
        assert sup.restarts == 0 and sup.status()["1"]["incarnation"] == 0
        assert sup.request_restart(1) == "group 1 will be restarted"
        wait_for("group 1's second incarnation", lambda: sup.status()["1"]["incarnation"] == 1)
        assert sup.status()["0"]["incarnation"] == 0
        assert "nothing to restart" in sup.request_restart(5)
    finally:
        sup.stop()
    assert pids_alive(sup.events) == []
