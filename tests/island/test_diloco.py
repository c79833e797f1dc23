"""The outer loop's decisions in one process: the overlap merge, a round the guard skipped, a
re-registration that finds the coordinator on another timeline, and how push outcomes count.

`ScriptedLink` stands in for the network only (the gRPC link and the coordinator are tested over
real gRPC in tests/coordinator and tests/sim): it answers `register`, `push` and `fetch` from a θ_b
it holds, with payloads of the real codec, and lets the test publish coordinator events. The outer
loop, its receiver thread, the codec and the merge are the real ones. The inner trainer is a
two-tensor model whose every step adds one to each weight, so every expected value is exact.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from island.connection import PushOutcome, Registration
from island.diloco import DiLoCoClient, InnerSteps
from island.diloco_config import DiLoCoConfig
from island.train import StepStats
from protos import archipelago_pb2 as pb
from protos.codec import encode


@dataclass
class ModelShape:
    dim: int = 3


class CountingTrainer:
    """Each inner step adds 1 to every weight (no data, no optimizer): θ_local = θ_0 + steps."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.model.weight.fill_(0.5)
            self.model.bias.fill_(-1.0)
        self.job = SimpleNamespace(model=ModelShape())
        self.loader = SimpleNamespace(island_id=1)  # not island 0: no evaluations
        self.step = 0

    @torch.no_grad()
    def train_step(self) -> StepStats:
        for p in self.model.parameters():
            p.add_(1.0)
        self.step += 1
        return StepStats(self.step, loss=2.0, grad_norm=0.0, lr=0.0, tokens=8)


@dataclass
class ScriptedLink:
    """The coordinator's side of the link, as a script (see the module docstring)."""

    theta_b: dict[str, torch.Tensor]
    island_id: str = "island-1"
    events: queue.Queue = field(default_factory=queue.Queue)
    version: int = 0
    timeline: int = 0
    rounds: list[int] = field(default_factory=lambda: [0])
    deltas: dict[int, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    pushes: list[pb.PushHeader] = field(default_factory=list)
    outcome: str = "accepted"
    receiver: bool = True  # False: no receiver thread, the events stay for the test to read
    threads: list = field(default_factory=list)

    def register(self, config_hash: str) -> Registration:
        return Registration(1, self.version, self.timeline, list(self.rounds), "", 0)

    def start(self, on_heartbeat, on_rejoin) -> None:
        self.on_rejoin = on_rejoin

    def heartbeat(self) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(version=self.version, timeline=self.timeline, fragments=[
            pb.FragmentState(fragment=f, round=r, version=self.version) for f, r in enumerate(self.rounds)])

    def push(self, header: pb.PushHeader, payload) -> PushOutcome:
        self.pushes.append(header)
        return PushOutcome(self.outcome, "scripted", self.version if self.outcome == "accepted" else -1)

    def fetch(self, since: int, full: bool = False):
        if full or since < self.version - len(self.deltas):
            return [(pb.PayloadHeader(version=self.version, fragment=-1, full=True, timeline=self.timeline),
                     encode(self.theta_b, "fp32"))]
        return [(pb.PayloadHeader(version=v, fragment=f, full=False, timeline=self.timeline), encode(d, "fp32"))
                for v, (f, d) in sorted(self.deltas.items()) if v > since]

    def start_thread(self, target, name: str) -> None:
        if not self.receiver:
            return
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self, timeout_s: float) -> list[str]:
        self.events.put(pb.Event(kind=pb.Event.SHUTDOWN, message="test over"))  # wakes the receiver
        for thread in self.threads:
            thread.join(timeout_s)
        return [t.name for t in self.threads if t.is_alive()]

    # ---- what the coordinator does -------------------------------------------------------------

    def commit(self, delta: dict[str, torch.Tensor], fragment: int = 0) -> None:
        """A new version: θ_b += δ, announced to the island."""
        self.version += 1
        self.rounds[fragment] += 1
        for n, d in delta.items():
            self.theta_b[n] += d
        self.deltas[self.version] = (fragment, {n: d.clone() for n, d in delta.items()})
        self.events.put(pb.Event(kind=pb.Event.COMMITTED, version=self.version, fragment=fragment,
                                 round=self.rounds[fragment] - 1, timeline=self.timeline))


def start_client(cfg: DiLoCoConfig, **link_fields) -> tuple[DiLoCoClient, ScriptedLink, dict[str, torch.Tensor]]:
    trainer = CountingTrainer()
    theta0 = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}
    link = ScriptedLink({n: t.clone() for n, t in theta0.items()}, **link_fields)
    client = DiLoCoClient(cfg, trainer, link)
    client.connect()
    return client, link, theta0


def wait_for(predicate, client: DiLoCoClient, what: str) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        client.apply_arrivals()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def config(**overrides) -> DiLoCoConfig:
    return DiLoCoConfig(**{"inner_steps": 2, "fragments": 1, "codec": "fp32", "rounds": 3,
                           "commit_timeout_s": 5.0, **overrides})


def test_overlap_keeps_what_was_trained_since_the_snapshot() -> None:
    client, link, theta0 = start_client(config(overlap=True))
    try:
        assert client.version == 0 and all(torch.equal(client.local[n], theta0[n]) for n in theta0)
        InnerSteps().train(client, 2, 0)  # θ_local = θ_0 + 2
        client.sync(0)  # overlap: returns with the push in flight
        wait_for(lambda: link.pushes and not client.pushes[0].running(), client, "the push")
        header = link.pushes[0]
        assert (header.round, header.base_version, header.tokens, header.loss_mean) == (0, 0, 16, 2.0)
        InnerSteps().train(client, 3, 0)  # θ_local = θ_0 + 5 while the round is open
        assert client.outstanding == {0: 0}
        link.commit({n: torch.full_like(t, 0.25) for n, t in theta0.items()})  # θ_b = θ_0 + 0.25
        wait_for(lambda: client.version == 1, client, "the merge")
        for n, t in theta0.items():
            assert torch.equal(client.theta_b[n], t + 0.25)
            # θ_b(1) + (θ_local(now) − snapshot) = θ_0 + 0.25 + 3
            assert torch.equal(client.local[n], t + 0.25 + 3.0)
        assert client.outstanding == {} and client.rounds == [1] and client.base_version == [1]
        assert client.stats.pushes == 1
    finally:
        client.close()


def test_a_skipped_round_keeps_theta_b_and_the_progress_since_the_snapshot() -> None:
    client, link, theta0 = start_client(config(overlap=True))
    try:
        InnerSteps().train(client, 2, 0)
        client.sync(0)
        InnerSteps().train(client, 1, 0)
        link.rounds[0] += 1  # the guard refused round 0: it closed without a version
        link.events.put(pb.Event(kind=pb.Event.SKIPPED, fragment=0, round=0, version=0, message="norm spike"))
        wait_for(lambda: client.stats.skipped_rounds == 1, client, "the skip")
        assert client.version == 0 and client.rounds == [1] and client.outstanding == {}
        for n, t in theta0.items():
            assert torch.equal(client.theta_b[n], t)  # θ_b stays
            assert torch.equal(client.local[n], t + 1.0)  # only what was trained after the sync
        # the next round's pseudo-gradient starts from θ_b again, for the next round
        InnerSteps().train(client, 1, 0)
        client.sync(0)
        wait_for(lambda: len(link.pushes) == 2, client, "the second push")
        assert (link.pushes[1].round, link.pushes[1].base_version) == (1, 0)
    finally:
        client.close()


def test_rejoin_on_another_timeline_reloads_theta_b() -> None:
    client, link, theta0 = start_client(config(overlap=True))
    try:
        InnerSteps().train(client, 2, 0)
        client.sync(0)
        # The coordinator rolled back while the island was away: new timeline, a θ_b of its own,
        # round numbers moved on. The link registers again and tells the outer loop.
        link.timeline, link.version, link.rounds = 1, 0, [2]
        link.theta_b = {n: t - 7.0 for n, t in theta0.items()}
        link.deltas.clear()
        link.on_rejoin(pb.RegisterReply(epoch=2, version=0, timeline=1))
        wait_for(lambda: client.stats.reloads == 1, client, "the reload")
        assert (client.timeline, client.epoch, client.stats.rejoins) == (1, 2, 1)
        assert client.rounds == [2] and client.outstanding == {}
        for n, t in theta0.items():
            assert torch.equal(client.theta_b[n], t - 7.0) and torch.equal(client.local[n], t - 7.0)
        InnerSteps().train(client, 1, 0)
        client.sync(0)
        wait_for(lambda: len(link.pushes) == 2, client, "the push on the new timeline")
        assert (link.pushes[1].round, link.pushes[1].timeline) == (2, 1)
    finally:
        client.close()


@pytest.mark.parametrize("outcome, pushes, dropped, rollback", [
    ("already_received", 1, 0, False), ("stale", 0, 1, False), ("other_timeline", 0, 1, True)])
def test_push_outcomes(outcome: str, pushes: int, dropped: int, rollback: bool) -> None:
    client, link, _ = start_client(config(overlap=True), outcome=outcome, receiver=False)
    try:
        InnerSteps().train(client, 2, 0)
        client.sync(0)
        wait_for(lambda: not client.pushes[0].running() and client.pushes[0].done(), client, "the push")
        assert (client.stats.pushes, client.stats.dropped_pushes) == (pushes, dropped)
        events = [link.events.get_nowait().kind for _ in range(link.events.qsize())]
        assert (pb.Event.ROLLBACK in events) == rollback
    finally:
        client.close()


def test_a_round_is_split_over_its_fragments_as_evenly_as_it_divides():
    from island.diloco_config import DiLoCoConfig

    assert DiLoCoConfig(inner_steps=50, fragments=4).fragment_steps(0) == [12, 13, 12, 13]
    assert DiLoCoConfig(inner_steps=48, fragments=4).fragment_steps(0) == [12] * 4
    uneven = DiLoCoConfig(inner_steps=50, fragments=3, rounds=2, round_steps=[7, 50])
    assert uneven.fragment_steps(0) == [2, 2, 3] and sum(uneven.fragment_steps(1)) == 50
