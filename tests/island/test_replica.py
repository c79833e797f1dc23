"""Replica groups under torchft (real Lighthouse, Managers, gloo, HTTP state transfer).

Each replica group is a real process with its own TCPStore (served by the test process); the
Lighthouse runs in the test process. Every wait is bounded and every process is killed by PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed import TCPStore

from archipelago import config as cfglib
from archipelago.config import ConfigError
from island.job import IslandJobConfig
from island.replica import ReplicaTrainer, TorchftEndpoint
from island.train import Trainer, model_tensors, optimizer_tensors
from protos.broadcast import digest

WORDS = "the king queen lord of and to my a is that in thou thy with not be his for me this you".split()
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replica-data")
    rng = random.Random(0)
    (root / "a.txt").write_text(" ".join(rng.choice(WORDS) + ("\n" if i % 13 == 0 else "")
                                         for i in range(5_000)))
    return root


def make_job(root: Path, *extra: str) -> IslandJobConfig:
    """tiny-moe shrunk (routed experts, shared expert, balancing bias) on a small corpus."""
    return cfglib.load(IslandJobConfig, "tiny-moe", [
        "model.vocab_size=512", "data.vocab_size=512", f"data.corpus='{root / 'a.txt'}'",
        f"data.cache_dir='{root / 'cache'}'", "model.dim=32", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=64", "model.num_experts=4",
        "model.moe_ffn_dim=16", "model.router_bias_update_rate=1e-2", "train.batch_size=4",
        "train.seq_len=16", "train.eval_batches=2", "optim.warmup_steps=2", "train.num_threads=1",
        "island.num_replica_groups=2", "island.heartbeat_timeout_ms=1000", "island.join_timeout_ms=2000",
        "island.timeout_s=20", "island.quorum_timeout_s=60", *extra])


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"model.{n}": t.detach().clone() for n, t in model_tensors(trainer.model).items()} | {
        f"optim.{n}": t.detach().clone() for n, t in optimizer_tensors(trainer.optimizer).items()}


def _group(g: int, rank: int, lighthouse: str, store_port: int, root: str, extra: list[str], steps: int,
           out: str, parent: int) -> None:
    """One rank of replica group g: train to `steps`, logging each step; pause while `hold{g}` exists.

    When `pause_after_solo{g}` holds a number N, the group creates `hold{g}` itself once it has
    committed N steps alone, so the test need not catch it between two fast steps.
    Rank 0 writes the log and, at the end, the group's full state."""
    torch.set_num_threads(1)
    out_dir = Path(out)
    job = make_job(Path(root), *extra)
    if job.parallel.num_ranks > 1:  # the group's own process group, over its TCPStore
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), TORCHELASTIC_USE_AGENT_STORE="True")
        torch.distributed.init_process_group("gloo", init_method="env://", rank=rank,
                                             world_size=job.parallel.num_ranks, timeout=timedelta(seconds=60))
    endpoint = TorchftEndpoint(lighthouse=lighthouse, store_host="127.0.0.1", store_port=store_port,
                               hostname="127.0.0.1", replica_id=f"test_group{g}")
    trainer = ReplicaTrainer(job, job.island, g, endpoint, total_steps=steps)
    (out_dir / f"ready{g}.{rank}").write_text(str(os.getpid()))
    while not (out_dir / "go").exists():
        time.sleep(0.05)
    log = []
    while trainer.step < steps:
        while (out_dir / f"hold{g}").exists():
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.05)
        stats = trainer.train_step()
        log.append({"step": trainer.step, "loss": stats.loss, "grad_norm": stats.grad_norm,
                    "committed": trainer.committed, "participants": trainer.num_participants})
        if rank == 0:
            (out_dir / f"progress{g}.json").write_text(json.dumps(log))
        pause_after = out_dir / f"pause_after_solo{g}"
        if pause_after.exists() and sum(e["participants"] == 1 and e["committed"] for e in log) >= \
                int(pause_after.read_text()):
            pause_after.unlink(missing_ok=True)
            (out_dir / f"hold{g}").touch()
        if os.getppid() != parent:
            os._exit(1)
    state = (full_state(trainer) if trainer.mesh is None else
             {f"model.{n}": t for n, t in trainer.full_model_state().items()})
    if rank == 0:
        torch.save({"log": log, "heals": trainer.heals, "state": state}, out_dir / f"final{g}.pt")
    trainer.manager.shutdown(wait=False)


class Groups:
    """The test's replica group processes, its Lighthouse and the groups' TCPStores."""

    def __init__(self, out: Path, root: Path, extra: list[str], steps: int, min_replicas: int,
                 ranks: int = 1) -> None:
        from torchft.coordination import LighthouseServer

        self.out, self.root, self.extra, self.steps, self.ranks = out, root, extra, steps, ranks
        self.lighthouse = LighthouseServer(bind="[::]:0", min_replicas=min_replicas, join_timeout_ms=2000,
                                           heartbeat_timeout_ms=1000)
        self.address = f"http://127.0.0.1:{self.lighthouse.address().rsplit(':', 1)[1]}"
        self.procs: dict[int, list[mp.Process]] = {}
        self.stores: list[TCPStore] = []
        self.ctx = mp.get_context("spawn")

    def start(self, g: int) -> None:
        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.stores.append(store)
        self.procs[g] = []
        for rank in range(self.ranks):
            (self.out / f"ready{g}.{rank}").unlink(missing_ok=True)
            proc = self.ctx.Process(target=_group, args=(g, rank, self.address, store.port, str(self.root),
                                                         self.extra, self.steps, str(self.out), os.getpid()),
                                    daemon=True)
            proc.start()
            self.procs[g].append(proc)

    def ready(self, g: int) -> bool:
        return all((self.out / f"ready{g}.{rank}").exists() for rank in range(self.ranks))

    def wait(self, what, done, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = done()
            if value:
                return value
            dead = {g: [p.exitcode for p in ps] for g, ps in self.procs.items()
                    if any(p.exitcode not in (None, 0) for p in ps)}
            if dead:
                pytest.fail(f"replica groups died while waiting for {what}: exit codes {dead}")
            time.sleep(0.1)
        pytest.fail(f"timed out after {timeout}s waiting for {what}")

    def progress(self, g: int) -> list[dict]:
        path = self.out / f"progress{g}.json"
        try:
            return json.loads(path.read_text()) if path.exists() else []
        except json.JSONDecodeError:  # caught mid-write
            return []

    def kill(self, g: int) -> None:
        for proc in self.procs.pop(g):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)

    def finish(self) -> dict[int, dict]:
        for g in list(self.procs):
            self.wait(f"group {g} to finish", lambda g=g: (self.out / f"final{g}.pt").exists())
        for procs in self.procs.values():
            for proc in procs:
                proc.join(timeout=30)
        return {g: torch.load(self.out / f"final{g}.pt", weights_only=False) for g in (0, 1)}

    def close(self) -> None:
        for g in list(self.procs):
            self.kill(g)
        self.lighthouse.shutdown()


@pytest.fixture
def groups_factory(tmp_path):
    made: list[Groups] = []

    def make(*args, **kw) -> Groups:
        made.append(Groups(tmp_path, *args, **kw))
        return made[-1]

    yield make
    for g in made:
        g.close()


@pytest.mark.parametrize("ranks", [1, 2], ids=["2x1", "2x2-fsdp-ep"])
def test_two_replica_groups_train_like_one_process_on_the_whole_batch(corpus, groups_factory, ranks):
    steps = 4
    batch = [f"train.batch_size={4 * ranks}", "optim.grad_clip=0.5"]  # 2 rows on every rank
    single = Trainer(make_job(corpus, *batch), total_steps=steps)  # also prepares the dataset
    ref = [single.train_step() for _ in range(steps)]
    assert ref[0].grad_norm > single.job.optim.grad_clip, "setup: clipping must be active"
    ref_state = full_state(single)
    if ranks > 1:  # a sharded group's optimizer state is not gathered, its model is
        ref_state = {n: t for n, t in ref_state.items() if n.startswith("model.")}

    groups = groups_factory(corpus, ["island.min_replica_groups=2", f"parallel.num_ranks={ranks}", *batch],
                            steps, min_replicas=2, ranks=ranks)
    for g in (0, 1):
        groups.start(g)
    groups.wait("both groups to be ready", lambda: groups.ready(0) and groups.ready(1))
    (groups.out / "go").touch()
    out = groups.finish()

    for g in (0, 1):
        log = out[g]["log"]
        assert [e["participants"] for e in log] == [2] * steps and all(e["committed"] for e in log)
        torch.testing.assert_close(torch.tensor([e["loss"] for e in log]),
                                   torch.tensor([s.loss for s in ref]), **TOL)
        torch.testing.assert_close(torch.tensor([e["grad_norm"] for e in log]),
                                   torch.tensor([s.grad_norm for s in ref]), **TOL)
        state = out[g]["state"]
        assert state.keys() == ref_state.keys()
        for name, t in ref_state.items():
            torch.testing.assert_close(state[name], t, **TOL, msg=name)
    assert digest(out[0]["state"]) == digest(out[1]["state"]), "groups must agree bit for bit"
    assert any(ref_state[f"model.layers.{i}.mlp.expert_bias"].abs().sum() > 0 for i in (0, 1)), \
        "setup: the balancing bias must have moved"


@pytest.mark.chaos
def test_a_killed_group_is_dropped_and_a_restarted_one_heals_bit_identical(corpus, groups_factory):
    steps = 40  # enough that group 0 cannot reach the end while the test notices group 1's third step on a busy host
    Trainer(make_job(corpus))  # prepares the dataset once, here
    groups = groups_factory(corpus, [], steps, min_replicas=1)
    for g in (0, 1):
        groups.start(g)
    groups.wait("both groups to be ready", lambda: groups.ready(0) and groups.ready(1))
    (groups.out / "go").touch()

    groups.wait("group 1 to commit 3 steps", lambda: len(groups.progress(1)) >= 3)
    (groups.out / "pause_after_solo0").write_text("2")  # group 0 then pauses while group 1 restarts
    groups.kill(1)
    groups.wait("group 0 to commit 2 steps alone and pause", lambda: (groups.out / "hold0").exists())
    solo = [e for e in groups.progress(0) if e["participants"] == 1 and e["committed"]]
    assert len(solo) >= 2
    (groups.out / "progress1.json").unlink()
    groups.start(1)
    groups.wait("the restarted group 1 to be ready", lambda: groups.ready(1))
    (groups.out / "hold0").unlink()
    out = groups.finish()

    heals = out[1]["heals"]
    assert len(heals) == 1 and heals[0]["from_step"] == 0 and heals[0]["step"] >= solo[-1]["step"]
    assert heals[0]["peer_sha256"] == heals[0]["own_sha256"], "the healed shard must equal the peer's"
    assert out[0]["heals"] == []
    assert any(e["participants"] == 1 and e["committed"] for e in out[0]["log"]), "group 0 went on alone"
    assert out[1]["log"][0]["participants"] == 2, "a healed group takes part in the step it healed in"
    assert out[0]["log"][-1]["step"] == out[1]["log"][-1]["step"] == steps
    assert digest(out[0]["state"]) == digest(out[1]["state"]), \
        "after recovery both groups must hold the same model and optimizer state bit for bit"


def test_island_table_is_checked_against_the_batch(corpus):
    with pytest.raises(ConfigError, match="must be divisible by island.num_replica_groups"):
        make_job(corpus, "island.num_replica_groups=3")
    with pytest.raises(ConfigError, match="island.min_replica_groups"):
        make_job(corpus, "island.min_replica_groups=3")
