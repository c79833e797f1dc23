"""The divergence guard and rollback, through the real gRPC API of an in-process coordinator.

- a round whose outer step overflows to Inf is refused: nothing committed, islands told SKIPPED;
- an update-norm spike and a loss spike are refused the same way;
- N refused rounds in a row roll back to the newest older checkpoint, bit for bit, on a new timeline;
- an operator's rollback (Admin.Rollback and `archipelago coordinator rollback --to V`) restores
  version and parameters of V bit for bit; an unknown V is NOT_FOUND naming it, a wrong credential
  UNAUTHENTICATED, and neither changes anything.
"""

from __future__ import annotations

import json
import queue
import threading

import grpc
import pytest
import torch

from coordinator.cli import main as coordinator_cli
from protos import archipelago_pb2 as pb
from tests.coordinator.conftest import ADMIN_CREDENTIAL, CoordinatorHarness

EVENT_WAIT_S = 10.0


class Events:
    """A subscriber collecting the coordinator's events on a background thread."""

    def __init__(self, c: CoordinatorHarness, lease: pb.Lease) -> None:
        self.queue: queue.Queue[pb.Event] = queue.Queue()
        self.stream = c.stub(c.channel()).Subscribe(pb.SubscribeRequest(lease=lease))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                self.queue.put(event)
        except grpc.RpcError:
            pass

    def next(self, kind: int) -> pb.Event:
        while True:
            event = self.queue.get(timeout=EVENT_WAIT_S)
            if event.kind == kind:
                return event

    def close(self) -> None:
        self.stream.cancel()


def guard_decisions(c: CoordinatorHarness) -> list[dict]:
    return json.loads(c.admin_status().json)["guard"]["decisions"]


def test_a_round_whose_outer_step_overflows_is_not_committed(coordinator):
    c = coordinator
    lease = c.register("island-0")
    events = Events(c, lease)
    try:
        before = c.status()
        # Finite on the wire (3e38 < fp32 max), so validation takes it; the Nesterov step
        # (1 + μ) · g = 5.7e38 overflows to Inf: only the guard can stop it.
        huge = {n: torch.full(c.files.shapes[n], 3e38) for n in c.fragment_names(0)}
        reply = c.push(lease, 0, 0, 0, huge, scheme="fp32")
        assert reply.accepted and reply.version == 0
        skipped = events.next(pb.Event.SKIPPED)
        assert (skipped.fragment, skipped.round, skipped.version) == (0, 0, 0)
        assert "non-finite" in skipped.message
        after = c.status()
        assert (after.version, after.theta_g, after.theta_b, after.momentum) == (
            before.version, before.theta_g, before.theta_b, before.momentum)
        assert after.rounds == (1,)  # the round moved on
        [decision] = guard_decisions(c)
        assert decision["kind"] == "refused" and decision["round"] == 0 and "non-finite" in decision["reason"]
        # the refused push counts as received: a retry is not taken again
        with pytest.raises(grpc.RpcError) as err:
            c.push(lease, 0, 0, 0, huge, scheme="fp32")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert c.commit_round(lease) == 1  # and the run goes on
    finally:
        events.close()


def test_norm_and_loss_spikes_are_refused(coordinator_factory):
    c = coordinator_factory(guard_min_history=3, guard_norm_factor=10.0, guard_loss_factor=1.5,
                            guard_max_refusals=0)
    lease = c.register("island-0")
    for seed in range(3):
        c.commit_round(lease, seed=seed)
    before = c.status()
    spike = {n: t * 1e4 for n, t in c.pseudo_grad(0, seed=9).items()}
    c.push(lease, 0, before.rounds[0], before.version, spike)
    high_loss = c.push_parts(lease, 0, before.rounds[0] + 1, before.version, c.pseudo_grad(0, seed=10),
                             loss_mean=30.0)
    c.send(high_loss)
    after = c.status()
    assert (after.version, after.theta_g, after.theta_b) == (before.version, before.theta_g, before.theta_b)
    reasons = [d["reason"] for d in guard_decisions(c)]
    assert len(reasons) == 2 and reasons[0].startswith("update-norm spike") and reasons[1].startswith("loss spike")
    assert c.commit_round(lease, seed=11) == before.version + 1  # ordinary rounds still commit


def test_repeated_refusals_roll_back_to_the_last_good_checkpoint(coordinator_factory):
    c = coordinator_factory(guard_max_refusals=2, keep_checkpoints=3)
    lease = c.register("island-0")
    c.commit_round(lease, seed=0)
    c.commit_round(lease, seed=1)
    good = c.status()  # version 2 (also the checkpoint the rollback must return to)
    assert good.version == 2
    c.commit_round(lease, seed=2)  # version 3: the islands then report garbage from here on
    events = Events(c, lease)
    try:
        huge = {n: torch.full(c.files.shapes[n], 3e38) for n in c.fragment_names(0)}
        rounds = c.status().rounds[0]
        c.push(lease, 0, rounds, 3, huge, scheme="fp32")
        c.push(lease, 0, rounds + 1, 3, huge, scheme="fp32")
        rollback = events.next(pb.Event.ROLLBACK)
        assert rollback.version == 2 and rollback.timeline == 1
    finally:
        events.close()
    after = c.status()
    assert (after.version, after.theta_g, after.theta_b, after.momentum) == (
        good.version, good.theta_g, good.theta_b, good.momentum)
    kinds = [d["kind"] for d in guard_decisions(c)]
    assert kinds == ["refused", "refused", "rollback"]
    register = c.register_reply("island-0")
    assert register.timeline == 1 and register.version == 2
    # a push computed on the abandoned timeline is refused with a reload order; state unchanged
    lease = pb.Lease(island_id="island-0", lease_id=register.lease_id, epoch=register.epoch)
    with pytest.raises(grpc.RpcError) as err:
        c.push(lease, 0, after.rounds[0], 2, timeline=0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "timeline" in err.value.details()
    assert ("archipelago-action", "reload") in tuple(err.value.trailing_metadata())
    assert c.status().version == 2
    # on the new timeline the run goes on from version 2
    reply = c.push(lease, 0, after.rounds[0], 2, c.pseudo_grad(0, seed=5), timeline=1)
    assert reply.accepted and c.status().version == 3


def test_operator_rollback_restores_version_and_parameters_bit_for_bit(coordinator_factory, capsys):
    c = coordinator_factory(keep_checkpoints=3, guard_norm_factor=0.0, guard_loss_factor=0.0)
    lease = c.register("island-0")
    c.commit_round(lease, seed=0)
    at_1 = c.status()
    c.commit_round(lease, seed=1)
    c.commit_round(lease, seed=2)
    latest = c.status()
    admin = c.admin()

    def refused(to: int, credential: str = ADMIN_CREDENTIAL) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            admin.Rollback(pb.RollbackRequest(credential=credential, to_version=to), timeout=30)
        return err.value

    err = refused(0)  # version 0's checkpoint was pruned (3 kept: 1, 2, 3)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 0" in err.details()
    err = refused(99)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 99" in err.details()
    assert refused(1, "tok0").code() == grpc.StatusCode.UNAUTHENTICATED
    assert c.status() == latest

    assert coordinator_cli(["rollback", "--address", c.address, "--credential", ADMIN_CREDENTIAL,
                            "--to", "1"]) == 0
    assert "rolled back to version 1" in capsys.readouterr().out
    after = c.status()
    assert (after.version, after.theta_g, after.theta_b, after.momentum) == (
        1, at_1.theta_g, at_1.theta_b, at_1.momentum)
    assert after.rounds[0] > latest.rounds[0]  # round numbers never go back: push keys stay unique
    status = json.loads(c.admin_status().json)
    assert status["timeline"] == 1 and status["guard"]["decisions"][-1]["by"] == "admin"
    assert coordinator_cli(["rollback", "--address", c.address, "--credential", ADMIN_CREDENTIAL,
                            "--to", "7"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_first_non_finite_finds_every_kind_and_spares_large_finite_values():
    from coordinator.guard import first_non_finite

    base = torch.ones(1000)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = base.clone()
        t[617] = bad
        assert first_non_finite({"a": base, "b": t}) == "b"
    both = base.clone()
    both[1], both[2] = float("inf"), -float("inf")
    assert first_non_finite({"x": both}) == "x"
    huge = torch.full((1000,), 3.0e38)  # float32 near its max: the float64 sum stays finite
    assert first_non_finite({"h": huge, "d": torch.full((4,), 1.0e308, dtype=torch.float64)}) is None
