"""Distributed Muon (ZeRO-1): ownership plan, and ShardedMuonClip on gloo ranks against one process
running the replicated MuonClip on the summed gradients (parameters, clip norms, QK-Clip, state size)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moonlet.testing import random_model, tiny_k2_config
from moonlet.train.distributed import (ShardedMuonClip, newton_schulz_flops, optimizer_state_numel, plan_owners,
                                       read_optimizer_shards, shard_file_name)
from moonlet.train.muonclip import MuonClip, param_groups, set_max_logit_recording


def test_plan_balances_newton_schulz_work_and_state_memory():
    model = random_model(tiny_k2_config())
    groups = param_groups(model)
    specs = [(tuple(p.shape), g["use_muon"]) for g in groups for p in g["params"]]
    for world in (2, 3):
        owners = plan_owners(specs, world)
        assert owners == plan_owners(specs, world)  # every rank computes the same plan
        work = [sum(newton_schulz_flops(s) for (s, m), o in zip(specs, owners) if m and o == r) for r in range(world)]
        state = [sum(torch.Size(s).numel() * (1 if m else 2) for (s, m), o in zip(specs, owners) if o == r)
                 for r in range(world)]
        # brute-force bound for greedy LPT: no rank exceeds the mean by more than the largest item
        biggest_ns = max(newton_schulz_flops(s) for s, m in specs if m)
        assert max(work) - sum(work) / world <= biggest_ns
        assert max(state) / (sum(state) / world) < 1.15, state
    assert plan_owners(specs, 1) == [0] * len(specs)


def test_plan_with_more_ranks_than_parameters():
    specs = [((8, 4), True), ((16, 16), True), ((5,), False)]
    owners = plan_owners(specs, 5)
    assert owners[1] == 0 and owners[0] == 1  # the costlier matrix goes first, to rank 0
    assert owners[2] == 2  # the AdamW vector to the rank with the least state
    with pytest.raises(ValueError, match="Muon needs 2-D"):
        plan_owners([((3, 4, 5), True)], 2)
    with pytest.raises(ValueError, match="world size"):
        plan_owners(specs, 0)


def test_needs_a_process_group():
    w = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        ShardedMuonClip([dict(params=[w], use_muon=True)])


# ---- multi-process ------------------------------------------------------------------------------
def _spawn(fn, world, tmp_path, *args):
    mp.spawn(_entry, args=(fn, world, str(tmp_path), args), nprocs=world, join=True)


def _entry(rank, fn, world, tmp, args):
    """Run ``fn`` as one rank of a gloo group; a callable it returns runs after the group is gone
    (a single-process reference must not join the collectives QK-Clip makes under a group)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    dist.barrier()  # every rank connected before any can finish
    try:
        after = fn(rank, world, tmp, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if after is not None:
        after()
    os._exit(0)  # success: results are on disk; skip the child's slow interpreter teardown (seconds)


TAU = 0.12  # below the random tiny model's largest max logits (~0.13-0.16), above most heads'
MAX_NORM = 0.05  # below the summed gradient norm, so clipping scales every step


def _ids(step, rank):
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))


COLLECTIVES = ("all_reduce", "scatter_gather")  # gloo's default, and the reduce-scatter/all-gather NCCL uses


def _make(collectives=None):
    """The tiny model and MuonClip, or ShardedMuonClip with ``collectives``."""
    model = random_model(tiny_k2_config(), seed=6).train()
    mods = set_max_logit_recording(model, True)
    kw = dict(lr=2e-2, weight_decay=0.1, attention_modules=mods, qk_clip_tau=TAU)
    if collectives is None:
        return model, MuonClip(param_groups(model), **kw)
    return model, ShardedMuonClip(param_groups(model), collectives=collectives, **kw)


def _loss(model, ids):
    return model(ids).float().logsumexp(-1).mean()


def _tiny_k2_worker(rank, world, tmp, steps):
    """Each rank: a few sharded steps on its own batch; rank 0 then replays them in one process with
    the replicated MuonClip on the summed gradients (same thread count, so same bf16 matmuls)."""
    out = {}
    for collectives in COLLECTIVES:
        model, opt = _make(collectives)
        norms, clips = [], []
        for step in range(steps):
            _loss(model, _ids(step, rank)).backward()
            opt.reduce_gradients()
            norms.append(opt.clip_grad_norm_(MAX_NORM).clone())
            opt.step()
            clips.append(opt.last_clip)
            opt.zero_grad(set_to_none=True)
        out[collectives] = {"params": {k: v.clone() for k, v in model.state_dict().items()}, "norms": norms,
                            "clips": clips, "state_numel": optimizer_state_numel(opt), "owned": opt.owned}
    torch.save(opt.state_dict(), f"{tmp}/{shard_file_name(rank, world)}")
    if rank != 0:
        torch.save(out, f"{tmp}/rank{rank}.pt")
        return None

    def reference():
        ref, ref_opt = _make()
        ref_norms, ref_clips = [], []
        for step in range(steps):
            for r in range(world):  # accumulates g0 + g1: the same float sum the reduce-scatter makes
                _loss(ref, _ids(step, r)).backward()
            for p in ref.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # what the sharded reduce fills in
            ref_norms.append(ref_opt.clip_grad_norm_(MAX_NORM).clone())
            ref_opt.step()
            ref_clips.append(ref_opt.last_clip)
            ref_opt.zero_grad(set_to_none=True)
        out["ref"] = {"params": ref.state_dict(), "norms": ref_norms, "clips": ref_clips,
                      "state_numel": optimizer_state_numel(ref_opt), "state": ref_opt.state_dict()}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    return reference


def test_sharded_steps_equal_the_replicated_optimizer_on_summed_gradients(tmp_path):
    steps = 3
    _spawn(_tiny_k2_worker, 2, tmp_path, steps)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = res[0]["ref"]
    for collectives in COLLECTIVES:
        _check_against_reference(res[0][collectives], res[1][collectives], ref, steps)
    # the shards merge into exactly the replicated optimizer's state
    merged = read_optimizer_shards(tmp_path, 2)
    assert merged["state"].keys() == ref["state"]["state"].keys()
    for k, s in ref["state"]["state"].items():
        for name, t in s.items():
            assert torch.equal(merged["state"][k][name], t), (k, name)
    # and a single-process MuonClip loads the merged shards
    _, single = _make()
    single.load_state_dict(merged)
    assert optimizer_state_numel(single) == ref["state_numel"]


def _check_against_reference(r0, r1, ref, steps):
    start = random_model(tiny_k2_config(), seed=6).state_dict()
    moved = 0
    for name, want in ref["params"].items():
        # every rank ends with the reference's parameters, bit for bit
        assert torch.equal(r0["params"][name], want), name
        assert torch.equal(r1["params"][name], want), name
        moved += not torch.equal(want, start[name])
    assert moved > 20  # the steps really changed the model
    # the clip norm is the exact global norm on both ranks
    for a, b, c in zip(r0["norms"], r1["norms"], ref["norms"]):
        assert torch.equal(a, c) and torch.equal(b, c) and c > MAX_NORM
    # QK-Clip saw the same maxima and clipped the same heads as one process
    assert r0["clips"] == ref["clips"] and r1["clips"] == ref["clips"]
    clipped = [len(c["clipped"]) for step in ref["clips"] for c in step]
    assert sum(clipped) > 0 and sum(clipped) < 3 * 4 * steps  # some heads, not all
    # optimizer state: the two shards partition the replicated state, about half each
    assert r0["state_numel"] + r1["state_numel"] == ref["state_numel"]
    assert max(r0["state_numel"], r1["state_numel"]) < 0.56 * ref["state_numel"], (r0["state_numel"], r1["state_numel"])
    assert not set(i for i, o in enumerate(r0["owned"]) if o) & set(i for i, o in enumerate(r1["owned"]) if o)


class _Small(nn.Module):
    """One Muon matrix and one AdamW vector: with three ranks one rank owns nothing."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(6, 10, generator=gen))
        self.norm = nn.Parameter(torch.randn(10, generator=gen))


def _int_grads(step, rank, model):
    """Small-integer gradients: their sums are exact in any order, so a 3-rank reduce-scatter must
    match the serial sum bit for bit. Rank 1 has no gradient for ``norm`` at step 1 (counts as 0)."""
    gen = torch.Generator().manual_seed(10 * step + rank)
    grads = {n: torch.randint(-8, 9, p.shape, generator=gen).float() for n, p in model.named_parameters()}
    if step == 1 and rank == 1:
        grads["norm"] = None
    return grads


def _uneven_worker(rank, world, tmp, steps):
    out = {}
    for collectives in COLLECTIVES:
        model = _Small()
        opt = ShardedMuonClip(param_groups(model), lr=1e-2, weight_decay=0.1, collectives=collectives)
        for step in range(steps):
            for n, p in model.named_parameters():
                p.grad = _int_grads(step, rank, model)[n]
            norm = opt.clip_grad_norm_(1.0)  # reduces the gradients itself
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[collectives] = {"params": dict(model.named_parameters()), "norm": norm,
                            "numel": optimizer_state_numel(opt), "owned": opt.owned}
    torch.save(out, f"{tmp}/rank{rank}.pt")


def test_uneven_world_three_ranks_one_owning_nothing(tmp_path):
    world, steps = 3, 3
    _spawn(_uneven_worker, world, tmp_path, steps)
    ref_model = _Small()
    ref = MuonClip(param_groups(ref_model), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        for n, p in ref_model.named_parameters():
            parts = [g for r in range(world) if (g := _int_grads(step, r, ref_model)[n]) is not None]
            p.grad = sum(parts[1:], parts[0].clone())
        norm = ref.clip_grad_norm_(1.0)
        ref.step()
        ref.zero_grad(set_to_none=True)
    results = [res for r in range(world) for res in torch.load(tmp_path / f"rank{r}.pt", weights_only=False).values()]
    assert len(results) == 2 * world and sorted(sum(res["owned"]) for res in results) == [0, 0, 1, 1, 1, 1]
    assert sum(res["numel"] for res in results) == 2 * optimizer_state_numel(ref)  # two runs
    for res in results:
        assert torch.equal(res["norm"], norm)
        for n, p in ref_model.named_parameters():
            torch.testing.assert_close(res["params"][n], p.detach(), rtol=0, atol=0)


# ---- the trainer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import numpy as np

    from moonlet.train.data import write_dataset

    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 320, int(rng.integers(5, 40))).tolist(), None) for _ in range(80)]
    write_dataset(docs, d / "train", vocab_size=320)
    write_dataset(docs[:16], d / "eval", vocab_size=320)
    return d


def _train_config(data_dir, out, **kw):
    from moonlet.train.trainer import TrainConfig

    base = dict(model=tiny_k2_config().to_dict(), train_data=str(data_dir / "train"), eval_data=str(data_dir / "eval"),
                out_dir=str(out), seq_len=24, batch_size=4, grad_accum=2, max_steps=4, lr=3e-3, warmup_steps=1,
                eval_every=2, eval_batches=1, save_every=2, log_every=1, qk_clip_tau=0.14, threads=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _trainer_worker(rank, world, tmp, data_dir):
    from moonlet.train.trainer import Trainer

    def params(t):
        return {k: v.clone() for k, v in t.model.state_dict().items()}

    out = {}
    full = Trainer(_train_config(data_dir, f"{tmp}/full"), quiet=True)
    assert full.sharded and isinstance(full.optimizer, ShardedMuonClip)
    out["full"] = (full.train(), params(full), optimizer_state_numel(full.optimizer))
    replicated = Trainer(_train_config(data_dir, f"{tmp}/replicated", shard_optimizer=False), quiet=True)
    assert not replicated.sharded
    out["replicated"] = (replicated.train(), params(replicated), optimizer_state_numel(replicated.optimizer))
    resumed = Trainer(_train_config(data_dir, f"{tmp}/resumed"), resume=f"{tmp}/full/checkpoints/step-000002",
                      quiet=True)
    assert resumed.step == 2
    out["resumed"] = (resumed.train(), params(resumed), optimizer_state_numel(resumed.optimizer))
    torch.save(out, f"{tmp}/trainer-rank{rank}.pt")


@pytest.mark.slow
def test_trainer_sharded_equals_replicated_and_resumes_at_any_world_size(data_dir, tmp_path):
    from moonlet.train.trainer import STATE_NAME, Trainer

    _spawn(_trainer_worker, 2, tmp_path, data_dir)
    ranks = [torch.load(tmp_path / f"trainer-rank{r}.pt", weights_only=False) for r in range(2)]
    full_metrics, full_params, _ = ranks[0]["full"]
    assert any(m.get("clipped_heads") for m in full_metrics), "QK-Clip must act in this run"
    for res in ranks:
        for run in ("full", "replicated", "resumed"):
            for name, t in res[run][1].items():  # every rank, every run: the same parameters bit for bit
                assert torch.equal(t, full_params[name]), (run, name)
    rep_metrics = ranks[0]["replicated"][0]
    assert [m["loss"] for m in rep_metrics] == [m["loss"] for m in full_metrics]
    assert [m["grad_norm"] for m in rep_metrics] == [m["grad_norm"] for m in full_metrics]
    assert [m["loss"] for m in ranks[0]["resumed"][0]] == [m["loss"] for m in full_metrics[2:]]
    # ZeRO-1: each rank holds about half of what every rank holds when replicated
    sharded = [res["full"][2] for res in ranks]
    replicated = ranks[0]["replicated"][2]
    assert sum(sharded) == replicated and max(sharded) < 0.56 * replicated, (sharded, replicated)

    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    state = torch.load(ckpt / STATE_NAME, weights_only=False)
    assert state["optimizer"] is None and state["optimizer_shards"] == 2
    assert sorted(p.name for p in ckpt.glob("optimizer-*.pt")) == [shard_file_name(r, 2) for r in range(2)]
    # one process resumes the 2-rank sharded checkpoint: the whole state, then the same training
    # (its batch is no longer split in two, so sums differ in rounding only)
    single = Trainer(_train_config(data_dir, tmp_path / "single"), resume=ckpt, quiet=True)
    assert optimizer_state_numel(single.optimizer) == replicated
    rest = single.train()
    for a, b in zip(full_metrics[2:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(t, full_params[name], atol=2e-4, rtol=1e-3)
