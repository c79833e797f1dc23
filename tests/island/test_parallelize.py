"""FSDP2 and expert parallel over two real processes (gloo, TCP on 127.0.0.1) against one process.

Two ranks are started once for the module (starting a process that imports torch costs seconds)
and run one function per test; every wait is bounded and the ranks are killed on any failure.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from archipelago import config as cfglib
from archipelago.config import ConfigError
from island.model import ModelConfig, build_model
from island.moe import MoE, update_router_biases
from island.parallelize import (
    apply_expert_parallel,
    apply_fsdp,
    clip_grad_norm_,
    default_mp_policy,
    full_state_dict,
    init_distributed,
)
from island.train import OptimConfig, Trainer, TrainJobConfig, build_optimizer

WORLD = 2
TOL = dict(atol=1e-5, rtol=1e-5)


def _serve(rank: int, port: int, parent: int, tasks, results) -> None:
    """A rank: join the group, then run `fn(mesh, rank, *args)` for each task until None.

    It leaves on its own when the test process is gone (killed before it could say stop)."""
    torch.set_num_threads(1)
    mesh = init_distributed(rank, WORLD, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=60)
    while True:
        try:
            task = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:
                os._exit(1)
            continue
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(mesh, rank, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
            raise
    torch.distributed.destroy_process_group()


class Ranks:
    """Two worker processes; `run(fn, *args)` returns [result of rank 0, result of rank 1]."""

    def __init__(self) -> None:
        self.procs: list = []

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, port, os.getpid(), self.tasks[r], self.results),
                                  daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 120.0) -> list:
        if not self.procs:
            self.start()
        for q in self.tasks:
            q.put((fn, args))
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(got) < WORLD:
            try:
                rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    self.close()
                    pytest.fail(f"ranks died (exit codes {dead})" if dead else f"no result in {timeout}s")
                continue
            if not ok:
                self.close()
                pytest.fail(f"rank {rank} raised:\n{value}")
            got[rank] = value
        return [got[r] for r in range(WORLD)]

    def close(self) -> None:
        for q in getattr(self, "tasks", []):
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        self.procs = []


@pytest.fixture(scope="module")
def ranks():
    pool = Ranks()
    yield pool
    pool.close()


def dense_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def moe_cfg(**kw) -> ModelConfig:  # tiny-moe's shape, shrunk: routed top-2 plus a shared expert
    base = dict(qk_norm=False, num_experts=4, num_experts_per_tok=2, moe_ffn_dim=16,
                num_shared_experts=1, router_bias_update_rate=1e-2)
    return dense_cfg(**{**base, **kw})


def batch(rows: int, cfg: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.vocab_size, (rows, cfg.max_seq_len + 1),
                           generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one process holds it (collective for FSDP gradients)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


def train(model, x, y, steps: int, max_norm: float, clip) -> tuple[list[float], list[float], dict]:
    """AdamW steps on (x, y): losses, grad norms, and the first step's gradients."""
    opt = build_optimizer(model, OPTIM)
    losses, norms, first = [], [], {}
    for step in range(steps):
        loss = model.loss(x, y)
        loss.backward()
        if step == 0:
            first = full_grads(model)
        norms.append(float(clip(model, max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_biases(model)
        losses.append(float(loss.detach()))
    return losses, norms, first


def one_process(cfg: ModelConfig, x, y, steps: int, max_norm: float):
    model = build_model(cfg, seed=0)
    losses, norms, grads = train(model, x, y, steps, max_norm,
                                 lambda m, n: torch.nn.utils.clip_grad_norm_(m.parameters(), n))
    return losses, norms, grads, model.state_dict()


# ---- FSDP2 -----------------------------------------------------------------------------------


def _fsdp_rank(mesh, rank, cfg, x, y, steps, max_norm):
    model = apply_fsdp(build_model(cfg, seed=0), mesh.get_group())  # a plain group works too
    q = model.layers[0].self_attn.q_proj.weight
    shard_rows = (q.to_local().shape[0], q.shape[0])
    rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    losses, norms, grads = train(model, x[rows], y[rows], steps, max_norm, clip_grad_norm_)
    return losses, norms, grads, full_state_dict(model), shard_rows


def test_fsdp_on_two_ranks_trains_like_one_process_on_the_whole_batch(ranks):
    cfg, steps, max_norm = dense_cfg(), 5, 0.5
    x, y = batch(4, cfg)
    out = ranks.run(_fsdp_rank, cfg, x, y, steps, max_norm)
    ref_losses, ref_norms, ref_grads, ref_state = one_process(cfg, x, y, steps, max_norm)

    assert out[0][4] == (cfg.dim // 2, cfg.dim), "each rank holds half of every block weight"
    mean_losses = [sum(r[0][s] for r in out) / WORLD for s in range(steps)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), **TOL)
    assert ref_norms[0] > max_norm, "setup: clipping must be active"
    for _, norms, grads, state, _ in out:
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)
        assert state.keys() == ref_state.keys()
        for name, t in state.items():
            torch.testing.assert_close(t, ref_state[name], **TOL, msg=name)


def test_mixed_precision_only_where_the_device_has_bf16_matmuls():
    cpu, cuda = default_mp_policy("cpu"), default_mp_policy("cuda")
    assert cpu.param_dtype is None and cpu.reduce_dtype is None
    assert cuda.param_dtype == torch.bfloat16 and cuda.reduce_dtype == torch.float32


# ---- expert parallel -------------------------------------------------------------------------


def make_moe(cfg: ModelConfig, bias: list[float] | None) -> MoE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moe = MoE(cfg)
    if bias is not None:
        moe.expert_bias.copy_(torch.tensor(bias))
    return moe.train()


def _ep_rank(mesh, rank, cfg, x_all, w_all, counts, bias):
    moe = apply_expert_parallel(make_moe(cfg, bias), mesh)
    start = sum(counts[:rank])
    x = x_all[start:start + counts[rank]].clone().requires_grad_()
    out = moe(x)
    (out * w_all[start:start + counts[rank]]).sum().backward()
    update_router_biases(moe)
    return dict(out=out.detach(), x_grad=x.grad, bias=moe.expert_bias.clone(),
                grads={n: p.grad for n, p in moe.named_parameters()})


@pytest.mark.parametrize("counts,bias", [
    ([7, 13], None),
    # every token picks experts 0 and 1 (rank 0's), and rank 0 has no tokens of its own: one rank
    # only sends, the other only receives, and rank 1's experts see nothing.
    ([0, 20], [5.0, 5.0, 0.0, 0.0]),
], ids=["uneven", "one-sided"])
def test_expert_parallel_matches_the_local_moe(ranks, counts, bias):
    cfg = moe_cfg()
    gen = torch.Generator().manual_seed(1)
    n = sum(counts)
    x_all, w_all = torch.randn(n, cfg.dim, generator=gen), torch.randn(n, cfg.dim, generator=gen)
    out = ranks.run(_ep_rank, cfg, x_all, w_all, counts, bias)

    ref = make_moe(cfg, bias)
    x = x_all.clone().requires_grad_()
    ref_out = ref(x)
    (ref_out * w_all).sum().backward()
    update_router_biases(ref)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    torch.testing.assert_close(torch.cat([r["out"] for r in out]), ref_out.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in out]), x.grad, **TOL)
    for name, g in ref_grads.items():
        if ".experts." not in f".{name}":  # replicated: the router and the shared expert
            torch.testing.assert_close(out[0]["grads"][name] + out[1]["grads"][name], g, **TOL, msg=name)
            continue
        owner = int(name.split(".")[1]) // (cfg.num_experts // WORLD)
        assert name not in out[1 - owner]["grads"], f"{name} must live on rank {owner} only"
        got = out[owner]["grads"][name]
        if g is None:
            assert got is None, f"{name}: no token reached it, so it must get no gradient"
        else:
            torch.testing.assert_close(got, g, **TOL, msg=name)
    for r in out:
        assert torch.equal(r["bias"], ref.expert_bias), "the balancing bias must use global counts"
    if bias is not None:
        assert all(ref_grads[f"experts.{e}.up_proj.weight"] is None for e in (2, 3)), "setup"


def _uneven_rank(mesh, rank):
    with pytest.raises(ValueError, match="3 experts cannot be split evenly over 2 ranks"):
        apply_expert_parallel(make_moe(moe_cfg(num_experts=3), None), mesh)


def test_expert_parallel_refuses_experts_that_do_not_split_evenly(ranks):
    ranks.run(_uneven_rank)


# ---- FSDP2 + expert parallel -----------------------------------------------------------------


def _fsdp_ep_rank(mesh, rank, cfg, x, y, steps, max_norm):
    model = apply_fsdp(apply_expert_parallel(build_model(cfg, seed=0), mesh), mesh)
    experts = model.layers[0].mlp.experts
    assert sorted(experts.keys()) == [str(e) for e in range(rank * 2, rank * 2 + 2)]
    assert not hasattr(experts["0" if rank == 0 else "2"].up_proj.weight, "to_local"), \
        "experts must not be FSDP-sharded"
    rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    losses, norms, grads = train(model, x[rows], y[rows], steps, max_norm, clip_grad_norm_)
    return losses, norms, grads, full_state_dict(model)


def test_fsdp_with_expert_parallel_trains_like_one_process(ranks):
    cfg, steps, max_norm = moe_cfg(), 3, 0.5
    x, y = batch(4, cfg, seed=2)
    out = ranks.run(_fsdp_ep_rank, cfg, x, y, steps, max_norm)
    ref_losses, ref_norms, ref_grads, ref_state = one_process(cfg, x, y, steps, max_norm)

    assert ref_norms[0] > max_norm, "setup: clipping must be active"
    mean_losses = [sum(r[0][s] for r in out) / WORLD for s in range(steps)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), **TOL)
    grads = {**out[0][2], **out[1][2]}  # each rank reports its own experts
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=name)
    for _, norms, _, state in out:
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL)
        assert state.keys() == ref_state.keys()
        for name, t in state.items():
            torch.testing.assert_close(t, ref_state[name], **TOL, msg=name)
    assert not torch.equal(ref_state["layers.0.mlp.expert_bias"], torch.zeros(cfg.num_experts))


# ---- the trainer on a group of ranks ---------------------------------------------------------

WORDS = "the king queen lord of and to my a is that in thou thy with not be his for me this you".split()


@pytest.fixture(scope="module")
def moe_job(tmp_path_factory):
    """tiny-moe shrunk, on a small synthetic corpus that prepares in a moment."""
    root = tmp_path_factory.mktemp("parallel-data")
    rng = random.Random(0)
    (root / "a.txt").write_text(" ".join(rng.choice(WORDS) + ("\n" if i % 13 == 0 else "")
                                         for i in range(5_000)))

    def make(*extra: str) -> TrainJobConfig:
        return cfglib.load(TrainJobConfig, "tiny-moe", [
            "model.vocab_size=512", "data.vocab_size=512", f"data.corpus='{root / 'a.txt'}'",
            f"data.cache_dir='{root / 'cache'}'", "model.dim=32", "model.num_layers=2",
            "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_dim=64", "model.num_experts=4",
            "model.moe_ffn_dim=16", "model.router_bias_update_rate=1e-2", "train.batch_size=4",
            "train.seq_len=16", "train.eval_batches=2", "optim.warmup_steps=2", *extra])
    return make


def _trainer_rank(mesh, rank, job, steps):
    trainer = Trainer(job, total_steps=steps)
    assert sorted(trainer.model.layers[1].mlp.experts) == [str(2 * rank), str(2 * rank + 1)]
    assert trainer.model.layers[1].self_attn.q_proj.weight.to_local().shape[0] == job.model.dim // 2
    stats = [trainer.train_step() for _ in range(steps)]
    return [(s.loss, s.grad_norm) for s in stats], trainer.evaluate(), trainer.full_model_state()


def test_trainer_over_two_ranks_trains_like_one_process(ranks, moe_job):
    steps = 3
    single = Trainer(moe_job(), total_steps=steps)  # also prepares the dataset the ranks open
    ref = [(s.loss, s.grad_norm) for s in (single.train_step() for _ in range(steps))]
    assert ref[0][1] > moe_job().optim.grad_clip, "setup: clipping must be active"
    ref_eval, ref_state = single.evaluate(), single.full_model_state()
    out = ranks.run(_trainer_rank, moe_job("parallel.num_ranks=2"), steps)

    for stats, eval_loss, state in out:
        torch.testing.assert_close(torch.tensor(stats), torch.tensor(ref), **TOL)
        assert eval_loss == pytest.approx(ref_eval, abs=1e-5)
        assert state.keys() == ref_state.keys()
        for name, t in state.items():
            torch.testing.assert_close(t, ref_state[name], **TOL, msg=name)


def test_parallel_section_is_checked_against_the_batch_and_the_experts(moe_job):
    with pytest.raises(ConfigError, match="parallel.num_ranks"):
        moe_job("parallel.num_ranks=3")
    with pytest.raises(ConfigError, match="model.num_experts"):
        moe_job("parallel.num_ranks=4", "train.batch_size=8", "model.num_experts=6")
    with pytest.raises(ConfigError, match="parallel.num_ranks must be >= 1"):
        moe_job("parallel.num_ranks=0")
