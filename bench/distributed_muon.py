"""Distributed Muon (ZeRO-1, ShardedMuonClip) vs the replicated MuonClip under data parallelism:
optimizer-step time and optimizer-state bytes per rank, on gloo ranks (CPU) or NCCL (GPU).

    python bench/distributed_muon.py                               # 2 gloo ranks, moonlet-tiny's shape
    python bench/distributed_muon.py --model tiny --world 3 --steps 10

Every rank builds the same model (``--model moonlet-tiny``: the tiny recipe's architecture, 4 layers,
H 256, 8 routed experts; ``tiny``: tiny_k2_config) and, each step, its own random gradients. What
is timed is everything after the backward pass that the two modes do differently:

- replicated: one flat all-reduce of the gradients, global-norm clipping, then the whole MuonClip
  step (every Newton–Schulz iteration) on every rank;
- sharded: the gradients summed into their owners, exact global-norm clipping (one small
  all-reduce), each owner's update, the updated parameters gathered to every rank; once with the
  collectives ShardedMuonClip uses on gloo (two all-reduces) and once with those it uses on NCCL
  (reduce-scatter, all-gather).

The forward and backward passes are the same in both modes and are not run. QK-Clip is off (it is
the same work in both modes and needs recorded logits). Each number is the best over ``--steps``
steps after ``--warmup`` (the first step allocates the state) of the slowest rank's time in that
step — the minimum, because other jobs on a shared machine only ever add time;
the gradient-sync and (sharded) parameter all-gather columns are parts of that time, the latter
measured on its own after the steps.
A world-size-1 row (the plain single-process MuonClip, no communication) gives the optimizer's own
cost for comparison.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moonlet.config import ModelConfig
from moonlet.model import Transformer
from moonlet.testing import tiny_k2_config
from moonlet.train.distributed import ShardedMuonClip, all_reduce_grads, optimizer_state_numel
from moonlet.train.muonclip import MuonClip, param_groups


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        return tiny_k2_config()
    if name == "moonlet-tiny":
        from moonlet.train.recipes.tiny import model_config as tiny_recipe_model

        return ModelConfig.from_dict(tiny_recipe_model())
    raise SystemExit(f"unknown model {name!r}; use tiny or moonlet-tiny")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def run_mode(mode: str, cfg: ModelConfig, rank: int, world: int, steps: int, warmup: int, device) -> dict:
    model = Transformer(cfg).init_weights(seed=0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = mode.startswith("sharded")
    if sharded:
        opt = ShardedMuonClip(param_groups(model), lr=1e-3, weight_decay=0.1, qk_clip_tau=None,
                              collectives=mode.split(":")[1])
    else:
        opt = MuonClip(param_groups(model), lr=1e-3, weight_decay=0.1, qk_clip_tau=None)
    gen = torch.Generator().manual_seed(1000 + rank)
    times, syncs = [], []
    for step in range(warmup + steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if world > 1:
            if sharded:
                opt.reduce_gradients()
            else:
                all_reduce_grads(params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= warmup:
            times.append(t2 - t0)
            syncs.append(t1 - t0)
    numel = sum(p.numel() for p in params)
    out = {"times": times, "grad_sync": syncs, "state_bytes": state_bytes(opt),
           "state_numel": optimizer_state_numel(opt), "params": numel}
    if sharded:
        out["segment"] = opt.segment
        gathers = []  # the parameter all-gather alone (it is idempotent: every rank re-sends the same values)
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt._gather_params()
            if device.type == "cuda":
                torch.cuda.synchronize()
            gathers.append(time.perf_counter() - t0)
        out["param_sync"] = gathers
    return out


def worker(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    cfg = model_config(args.model)
    results = {}
    for mode in ("replicated", "sharded:all_reduce", "sharded:scatter_gather"):
        res = run_mode(mode, cfg, rank, world, args.steps, args.warmup, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        results[mode] = gathered
    if rank == 0:
        torch.save(results, f"{store}.result")
    dist.barrier()
    dist.destroy_process_group()


def summarize(name: str, per_rank: list[dict]) -> str:
    steps = len(per_rank[0]["times"])
    slowest = [max(r["times"][i] for r in per_rank) for i in range(steps)]
    sync = [max(r["grad_sync"][i] for r in per_rank) for i in range(steps)]
    mib = [r["state_bytes"] / 2**20 for r in per_rank]
    gather = "n/a"
    if "param_sync" in per_rank[0]:
        gather = f"{min(max(r['param_sync'][i] for r in per_rank) for i in range(steps)) * 1e3:.0f}"
    return (f"| {name} | {min(slowest) * 1e3:.0f} | {min(sync) * 1e3:.0f} | {gather} | "
            f"{' / '.join(f'{m:.1f}' for m in mib)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="moonlet-tiny", help="moonlet-tiny (default) or tiny")
    ap.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    args = ap.parse_args()

    cfg = model_config(args.model)
    torch.set_num_threads(args.threads)
    single = run_mode("single", cfg, 0, 1, args.steps, args.warmup,
                      torch.device("cuda:0" if args.device == "cuda" else "cpu"))
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        mp.spawn(worker, args=(args.world, store, args), nprocs=args.world, join=True)
        results = torch.load(f"{store}.result", weights_only=False)

    params = single["params"]
    print(f"model {args.model}: {params / 1e6:.2f}M parameters; {args.world} ranks on {args.device}, "
          f"{args.threads} thread(s) each; best of {args.steps} steps")
    print("| mode | optimizer step ms (slowest rank) | gradient sync ms (part of it) | parameter all-gather ms "
          "(part of it) | optimizer state MiB per rank |")
    print("| --- | --- | --- | --- | --- |")
    print(summarize("1 process, MuonClip (no communication)", [single]))
    print(summarize(f"{args.world} ranks, replicated (all-reduce + full step on every rank)", results["replicated"]))
    print(summarize(f"{args.world} ranks, sharded ZeRO-1, all-reduces (the gloo default)",
                    results["sharded:all_reduce"]))
    print(summarize(f"{args.world} ranks, sharded ZeRO-1, reduce-scatter + all-gather (the NCCL default)",
                    results["sharded:scatter_gather"]))
    seg = results["sharded:all_reduce"][0]["segment"]
    print(f"sharded flat buffer: {args.world} x {seg} elements for {params} parameters "
          f"({args.world * seg / params - 1:.1%} padding)")


if __name__ == "__main__":
    main()
