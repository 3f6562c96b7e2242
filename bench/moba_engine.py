"""The serving engine's MoBA attention over the paged latent cache: sparse paths vs the masked references.

Times one layer's attention as ``PagedLatentKV`` runs it on a MoBA layer, for

- a prefill chunk: the last ``--chunk`` tokens of a ``--ctx``-token sequence (the CPU engine's default
  token budget is 512), ``moba_sparse_prefill_attention`` vs ``moba_prefill_attention``;
- a decode step: ``--batch`` sequences of ``--ctx`` tokens, one query each,
  ``moba_sparse_decode_attention`` (the heads' union, the engine's default) and
  ``moba_per_head_decode_attention`` (one table per head, plain-PyTorch decode kernel) vs
  ``moba_decode_attention``.

Shapes: absorbed MLA at the real width (cache entries of 512 + 64 = 576, values = the first 512),
``--heads`` query heads (few, so it runs in minutes on 2 cores; K2 has 64), pages of 64 tokens, a
random ``--dtype`` pool with its per-page sums. The paths run in turn for ``--repeat`` rounds after a
warm-up, all in one process; each reports its fastest round, in wall-clock and in process CPU seconds
(all threads; steadier than wall clock on a shared machine). The largest difference between the
paths' results is printed as a check. Where the heads' union of picks covers the whole context the
sparse decode calls the masked reference itself (keys read 1.000): those rows time the same code twice.

    python bench/moba_engine.py                                   # ctx 8192 32768 65536, B=512 k=3
    python bench/moba_engine.py --ctx 8192 --moba 512:3 4096:12 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from moonlet.engine.moba import (PageSums, moba_decode_attention, moba_per_head_decode_attention,
                                 moba_prefill_attention, moba_sparse_decode_attention, moba_sparse_prefill_attention)

KV_LORA, ROPE, PAGE = 512, 64, 64
D = KV_LORA + ROPE


def _timed(fn) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and process CPU seconds of one call, and its result."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def _compare(fns: dict, repeat: int) -> tuple[dict, float]:
    """The functions in turn for ``repeat`` rounds after a warm-up; the fastest round of each, wall and CPU (so
    load from other processes hits all alike), and the largest difference of their results from the first's."""
    best = {name: [float("inf")] * 2 for name in fns}
    results = [fn() for fn in fns.values()]
    diff = max((r - results[0]).abs().max().item() for r in results[1:])
    for _ in range(repeat):
        for name, fn in fns.items():
            wall, cpu, _ = _timed(fn)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    return best, diff


def _cache(num_seqs: int, ctx: int, dtype: torch.dtype, gen: torch.Generator):
    """A pool holding num_seqs sequences of ctx tokens in shuffled pages, its page sums and the tables."""
    pages = -(-ctx // PAGE)
    num_pages = num_seqs * pages + 1
    pool = torch.randn(num_pages, PAGE, D, generator=gen).to(dtype)
    sums = PageSums([0], num_pages, D, "cpu")
    sums.update(0, pool, torch.arange(num_pages))
    tables = torch.randperm(num_pages, generator=gen)[:num_seqs * pages].view(num_seqs, pages)
    return pool, sums.layer(0), tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--moba", nargs="+", default=["512:3"], help="block_size:top_k settings")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk: new tokens at the end of the context")
    p.add_argument("--batch", type=int, default=4, help="decode: sequences in the step")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=3, help="rounds; each path reports its fastest")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.moba]
    scale = (128 + ROPE) ** -0.5

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{args.heads} heads, entries {KV_LORA}+{ROPE}, page {PAGE}, {args.dtype} pool; "
          f"prefill chunk {args.chunk} tokens, decode batch {args.batch}")
    print(f"{'ctx':>6} {'moba':>9} {'op':>8} {'path':>9} {'wall s':>8} {'cpu s':>8} {'speed-up':>9} "
          f"{'keys read':>10} {'max diff':>9}")
    gen = torch.Generator().manual_seed(0)

    def rows(ctx, setting, op, best, reads, diff):
        base = best["masked"][0]
        for name, (wall, cpu) in best.items():
            print(f"{ctx:>6} {setting:>9} {op:>8} {name:>9} {wall:>8.4f} {cpu:>8.4f} {base / wall:>8.1f}x "
                  f"{reads[name]:>10.3f} {diff:>9.1e}", flush=True)

    for ctx in args.ctx:
        for block, top_k in settings:
            pool, sums, tables = _cache(args.batch, ctx, dtype, gen)
            moba = (block, top_k)
            # prefill chunk of the first sequence
            q = torch.randn(args.chunk, args.heads, D, generator=gen).to(dtype)
            call = (pool, sums, tables[0], ctx, scale, KV_LORA) + moba
            best, diff = _compare({"masked": lambda: moba_prefill_attention(q, *call),
                                   "sparse": lambda: moba_sparse_prefill_attention(q, *call)}, args.repeat)
            own = block // 2 + 1  # average own-block keys of a query
            rows(ctx, f"{block}:{top_k}", "prefill", best,
                 {"masked": 1.0, "sparse": min(ctx, (top_k - 1) * block + own) / ctx}, diff)
            # decode step of the whole batch
            qd = torch.randn(args.batch, args.heads, D, generator=gen).to(dtype)
            lens = torch.full((args.batch,), ctx, dtype=torch.long)
            dcall = (pool, sums, tables, lens, scale, KV_LORA) + moba
            best, diff = _compare({"masked": lambda: moba_decode_attention(qd, *dcall),
                                   "sparse": lambda: moba_sparse_decode_attention(qd, *dcall),
                                   "per-head": lambda: moba_per_head_decode_attention(qd, *dcall)}, args.repeat)
            union = min(args.heads * (top_k - 1), (ctx - 1) // block) + 1  # gathered blocks, own included
            per_head = args.heads * min(ctx, (top_k - 1) * block + block)
            rows(ctx, f"{block}:{top_k}", "decode", best,
                 {"masked": 1.0, "sparse": min(1.0, union * block / ctx), "per-head": per_head / ctx}, diff)
    print("keys read / ctx: prefill sparse, attended keys per (query, head); decode sparse, entries gathered per "
          "sequence (the heads' union + own block, at most); decode per-head, entries read per sequence over all "
          "heads (at most). The masked references read all of ctx. speed-up: wall clock against masked.")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
