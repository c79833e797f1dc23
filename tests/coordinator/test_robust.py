"""Robust aggregation: the math of norm clipping and the coordinate-wise trimmed mean, and a run in
which one of four islands pushes large-norm garbage every round through the real gRPC API."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable

import pytest
import torch

from coordinator import aggregate
from coordinator.aggregate import Aggregator, clip_scales, trimmed_mean, trimmed_mean_tensors
from coordinator.config import CoordinatorConfig
from coordinator.params import Contribution, ParamState
from island.diloco import DiLoCoClient
from island.job import load_job, open_client
from island.train import Trainer
from protos import archipelago_pb2 as pb
from protos.accumulate import WeightedSum
from protos.broadcast import digest, l2_norm
from tests.coordinator.conftest import SMALL, TOKENS, CoordinatorHarness

# ---- the math ------------------------------------------------------------------------------------


def test_trimmed_mean_equals_a_hand_computation():
    values = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 7.0], [100.0, 0.0]])  # [n=4 islands, 2 coords]
    # column 0 sorted: 1 2 3 100 -> keep 2, 3; column 1 sorted: -5 0 7 10 -> keep 0, 7
    equal = trimmed_mean(values, torch.ones(4), trim=1)
    assert equal.tolist() == [2.5, 3.5]
    # weights follow each kept value's row: column 0 keeps rows 1 (w 1) and 2 (w 3): (2 + 9) / 4;
    # column 1 keeps rows 3 (w 1) and 2 (w 3): (0 + 21) / 4
    weighted = trimmed_mean(values, torch.tensor([1.0, 1.0, 3.0, 1.0]), trim=1)
    assert weighted.tolist() == [2.75, 5.25]
    assert trimmed_mean(values, torch.ones(4), trim=0).tolist() == [26.5, 3.0]  # the plain mean


@pytest.mark.parametrize("n", [4, 5, 8])
def test_trimmed_mean_of_tensors_matches_a_brute_force_per_coordinate(monkeypatch, n):
    monkeypatch.setattr(aggregate, "_TRIM_STEP", 7 * n)  # several slices of coordinates per tensor
    gen = torch.Generator().manual_seed(n)
    deltas = [{"a": torch.randn(5, 6, generator=gen), "b": torch.randn(11, generator=gen)} for _ in range(n)]
    weights = [float(w) for w in torch.rand(n, generator=gen) + 0.5]
    out = trimmed_mean_tensors(deltas, weights, ["a", "b"], trim_fraction=0.25)
    k = math.floor(0.25 * n)
    for name in ("a", "b"):
        flat = [d[name].reshape(-1).tolist() for d in deltas]
        for j, got in enumerate(out[name].reshape(-1).tolist()):
            kept = sorted(range(n), key=lambda i, j=j: flat[i][j])[k:n - k]
            want = sum(flat[i][j] * weights[i] for i in kept) / sum(weights[i] for i in kept)
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (name, j)


def contributions(deltas: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> list[Contribution]:
    weights = weights or [1.0] * len(deltas)
    return [Contribution(f"island-{i}", 0, 0, 0, 100, w, "", 3.0, math.nan, 1.0)
            for i, (_, w) in enumerate(zip(deltas, weights, strict=True))]


def robust(agg: Aggregator, params: ParamState, deltas: list[dict[str, torch.Tensor]],
              weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    return agg(params.fragment_specs(0), contributions(deltas, weights), deltas, 0)


def weighted_mean(params: ParamState, deltas: list[dict[str, torch.Tensor]],
                  weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """What the round engine's merge gives (coordinator/merge.py)."""
    total = WeightedSum(params.fragment_specs(0))
    for d, w in zip(deltas, weights or [1.0] * len(deltas), strict=True):
        total.add_tensors(d, w)
    return total.mean()


def honest_and_garbage(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    theta = {"w": torch.zeros(64, 32), "b": torch.zeros(32)}
    honest = [{n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in theta.items()} for _ in range(3)]
    garbage = {n: torch.randn(t.shape, generator=gen) * 1e4 for n, t in theta.items()}  # finite, huge
    return theta, honest + [garbage]


def test_clip_scales():
    assert clip_scales([1.0, 2.0, 8.0, 0.0], bound=4.0) == [1.0, 1.0, 0.5, 1.0]


def test_a_garbage_contribution_with_a_huge_norm_is_clipped_to_a_multiple_of_the_median():
    theta, deltas = honest_and_garbage()
    params = ParamState(theta, num_fragments=1)
    norms = [l2_norm(d) for d in deltas]
    agg = Aggregator(CoordinatorConfig(clip_update_norm=2.0), num_fragments=1)
    grad, info = robust(agg, params, deltas)
    bound = 2.0 * (sorted(norms)[1] + sorted(norms)[2]) / 2  # median of 4: mean of the middle two
    assert info["clip_bound"] == pytest.approx(bound)
    assert set(info["clipped"]) == {"island-3"}
    assert info["clipped"]["island-3"] == pytest.approx(bound / norms[3])
    # the mean is the honest mean plus a quarter of the garbage scaled down to the bound
    want = {n: (sum(d[n] for d in deltas[:3]) + deltas[3][n] * (bound / norms[3])) / 4 for n in theta}
    for n in theta:
        torch.testing.assert_close(grad[n], want[n])
    assert l2_norm(grad) < 2 * max(norms[:3]) and norms[3] > 1e4 * max(norms[:3])
    assert list(agg.norms[0]) == norms  # the window keeps the norms as pushed

    # Later rounds measure against the window: a lone garbage push is clipped even in a round of one.
    _, info = robust(agg, params, deltas[3:])
    assert info["clipped"] == {"island-0": pytest.approx(info["clip_bound"] / norms[3])}


def test_trimmed_mean_with_clipping_leaves_the_garbage_out():
    theta, deltas = honest_and_garbage()
    params = ParamState(theta, num_fragments=1)
    agg = Aggregator(CoordinatorConfig(aggregation="trimmed_mean", clip_update_norm=2.0), num_fragments=1)
    grad, info = robust(agg, params, deltas)
    assert info["aggregation"] == "trimmed_mean"
    honest_mean = weighted_mean(params, deltas[:3])
    assert l2_norm({n: grad[n] - honest_mean[n] for n in theta}) < l2_norm(honest_mean)


def test_defaults_are_the_weighted_mean_bit_for_bit():
    theta, deltas = honest_and_garbage()
    params = ParamState(theta, num_fragments=1)
    weights = [3.0, 1.0, 0.5, 2.0]
    grad, info = robust(Aggregator(CoordinatorConfig(), 1), params, deltas, weights)
    want = weighted_mean(params, deltas, weights)
    assert info == {} and all(torch.equal(grad[k], want[k]) for k in theta)
    # the trimmed mean needs 4 contributions: with 3 it is the weighted mean
    grad, info = robust(Aggregator(CoordinatorConfig(aggregation="trimmed_mean"), 1), params, deltas[:3],
                           weights[:3])
    want = weighted_mean(params, deltas[:3], weights[:3])
    assert info == {} and all(torch.equal(grad[k], want[k]) for k in theta)


def test_robust_aggregation_config_errors_name_the_field():
    from archipelago.config import ConfigError

    for kwargs, field in (({"aggregation": "median"}, "aggregation"), ({"trim_fraction": 0.5}, "trim_fraction"),
                          ({"clip_update_norm": -1.0}, "clip_update_norm"), ({"clip_window": 0}, "clip_window")):
        with pytest.raises(ConfigError, match=field):
            CoordinatorConfig(**kwargs)


# ---- one attacker among four islands, over gRPC ----------------------------------------------------

ATTACKER = "island-x"
ROUNDS, H = 5, 6


class Attacker(threading.Thread):
    """Registers as an island and, every round, pushes finite garbage of the right shapes whose norm
    is about a thousand times an honest pseudo-gradient's; stops on `stop` or after 120 s."""

    def __init__(self, c: CoordinatorHarness, token: str) -> None:
        super().__init__(name="attacker", daemon=True)
        self.c, self.token = c, token
        self.stop = threading.Event()
        self.pushed: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        c = self.c
        channel = c.channel()
        try:
            lease = c.register(ATTACKER, token=self.token)
            gen = torch.Generator().manual_seed(99)
            deadline = threading.Timer(120, self.stop.set)
            deadline.start()
            while not self.stop.is_set():
                beat = c.stub(channel).Heartbeat(pb.HeartbeatRequest(lease=lease), timeout=10)
                open_round = beat.fragments[0].round
                if not self.pushed or open_round > self.pushed[-1]:
                    garbage = {n: torch.randn(s, generator=gen) * 10.0 for n, s in c.files.shapes.items()}
                    c.send(c.push_parts(lease, round=open_round, base_version=beat.version, tensors=garbage,
                                        tokens=H * 4 * 32), channel=channel)
                    self.pushed.append(open_round)
                self.stop.wait(0.02)
            deadline.cancel()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def train_islands(c: CoordinatorHarness, job, num_honest: int, attacker_token: str | None) -> tuple[float, dict]:
    """Run `num_honest` DiLoCo islands (threads, real client) and maybe the attacker to the end;
    the eval loss of the final θ_b and the coordinator's status."""
    trainers = [Trainer(job, island_id=i, num_islands=num_honest, total_steps=ROUNDS * H) for i in range(num_honest)]
    clients = [open_client(job.diloco, t, c.address, f"island-{i}", TOKENS[f"island-{i}"])
               for i, t in enumerate(trainers)]
    attacker = Attacker(c, attacker_token) if attacker_token else None
    errors: list[BaseException] = []

    def run(client: DiLoCoClient) -> None:
        try:
            client.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(client,), daemon=True) for client in clients]
    if attacker is not None:
        attacker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    if attacker is not None:
        attacker.stop.set()
        attacker.join(timeout=30)
        assert attacker.error is None, repr(attacker.error)
        assert len(attacker.pushed) >= ROUNDS
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert len({digest(cl.theta_b) for cl in clients}) == 1
    return clients[0].evaluate_broadcast(), json.loads(c.admin_status().json)


def test_one_garbage_island_of_four_does_not_hurt_with_robust_aggregation(
        coordinator_factory: Callable[..., CoordinatorHarness], data_cache, tmp_path):
    job = load_job("ci", SMALL + [f"data.cache_dir={data_cache}", "train.batch_size=4", "train.seq_len=32",
                                  "train.eval_batches=4", "optim.warmup_steps=3", f"diloco.inner_steps={H}",
                                  f"diloco.rounds={ROUNDS}", "diloco.eval_every_rounds=0",
                                  "diloco.chunk_bytes=65536", "diloco.max_message_bytes=262144"])  # the harness's
    islands_file = tmp_path / "islands.json"
    islands_file.write_text(json.dumps({**TOKENS, ATTACKER: "tok-x"}))
    # The divergence guard is a separate defence (it would refuse the plain mean's garbage rounds):
    # off here, so that the aggregation alone is measured.
    common = {"islands_file": str(islands_file), "outer_lr": 1.0, "outer_momentum": 0.5, "checkpoint_every": 0,
              "guard_norm_factor": 0.0, "guard_loss_factor": 0.0}

    clean, _ = train_islands(coordinator_factory(min_islands=3, **common), job, 3, None)
    robust, status = train_islands(coordinator_factory(min_islands=4, aggregation="trimmed_mean",
                                                       clip_update_norm=2.0, **common), job, 3, "tok-x")
    plain, _ = train_islands(coordinator_factory(min_islands=4, **common), job, 3, "tok-x")

    rounds = [h for h in status["history"] if ATTACKER in h["islands"]]
    assert len(rounds) == ROUNDS and all(h["aggregation"] == "trimmed_mean" for h in rounds)
    assert all(ATTACKER in h["clipped"] for h in rounds), [h["clipped"] for h in rounds]
    assert abs(robust / clean - 1) < 0.05, f"robust {robust:.4f} vs clean {clean:.4f}"
    assert plain > 1.5 * clean, f"the attack should hurt the plain mean: {plain:.4f} vs clean {clean:.4f}"


def test_the_merge_does_not_depend_on_the_order_pushes_arrive_in(coordinator_factory) -> None:
    """Three pushes of one round, in two arrival orders, give the same θ_g and θ_b bit for bit (the
    weighted sum's float rounding depends on the order of its terms, so the engine sums in key order)."""
    islands = ["island-0", "island-1", "island-2"]
    digests = []
    for order in (islands, islands[::-1]):
        c = coordinator_factory(min_islands=3, quorum=1.0)
        leases = {i: c.register(i) for i in islands}
        grads = {i: c.pseudo_grad(0, seed=k, scale=10.0 ** -k) for k, i in enumerate(islands)}
        for i in order:
            c.push(leases[i], 0, 0, 0, grads[i], tokens=1000 + 7 * int(i[-1]))
        status = c.status()
        assert status.version == 1
        digests.append((status.theta_g, status.theta_b))
    assert digests[0] == digests[1]

