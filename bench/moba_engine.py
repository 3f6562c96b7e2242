"""The serving engine's MoBA attention over the paged latent cache: sparse paths vs the masked references.

Times one layer's attention as ``PagedLatentKV`` runs it on a MoBA layer, for

- a prefill chunk: the last ``--chunk`` tokens of a ``--ctx``-token sequence (the CPU engine's default
  token budget is 512), ``moba_sparse_prefill_attention`` vs ``moba_prefill_attention``;
- a decode step: ``--batch`` sequences of ``--ctx`` tokens, one query each,
  ``moba_sparse_decode_attention`` vs ``moba_decode_attention``.

Shapes: absorbed MLA at the real width (cache entries of 512 + 64 = 576, values = the first 512),
``--heads`` query heads (few, so it runs in minutes on 2 cores; K2 has 64), pages of 64 tokens, a
random ``--dtype`` pool with its per-page sums. Each row is the fastest of ``--repeat`` runs after one
warm-up, all in one process; the largest difference between the two paths is printed as a check.

    python bench/moba_engine.py                                   # ctx 8192 32768 65536, B=512 k=3
    python bench/moba_engine.py --ctx 8192 --moba 512:3 4096:12 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from moonlet.engine.moba import (PageSums, moba_decode_attention, moba_prefill_attention,
                                 moba_sparse_decode_attention, moba_sparse_prefill_attention)

KV_LORA, ROPE, PAGE = 512, 64, 64
D = KV_LORA + ROPE


def _best(fn, repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


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
    p.add_argument("--repeat", type=int, default=3)
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
    print(f"{'ctx':>6} {'moba':>9} {'op':>8} {'masked s':>9} {'sparse s':>9} {'speed-up':>9} {'keys read':>10} "
          f"{'max diff':>9}")
    gen = torch.Generator().manual_seed(0)
    for ctx in args.ctx:
        for block, top_k in settings:
            pool, sums, tables = _cache(args.batch, ctx, dtype, gen)
            moba = (block, top_k)
            # prefill chunk of the first sequence
            q = torch.randn(args.chunk, args.heads, D, generator=gen).to(dtype)
            call = (pool, sums, tables[0], ctx, scale, KV_LORA) + moba
            t_ref, ref = _best(lambda: moba_prefill_attention(q, *call), args.repeat)
            t_sp, sp = _best(lambda: moba_sparse_prefill_attention(q, *call), args.repeat)
            own = block // 2 + 1  # average own-block keys of a query
            read = min(ctx, (top_k - 1) * block + own)
            print(f"{ctx:>6} {f'{block}:{top_k}':>9} {'prefill':>8} {t_ref:>9.3f} {t_sp:>9.3f} "
                  f"{t_ref / t_sp:>8.1f}x {read / ctx:>10.3f} {(ref - sp).abs().max().item():>9.1e}", flush=True)
            # decode step of the whole batch
            qd = torch.randn(args.batch, args.heads, D, generator=gen).to(dtype)
            lens = torch.full((args.batch,), ctx, dtype=torch.long)
            dcall = (pool, sums, tables, lens, scale, KV_LORA) + moba
            t_ref, ref = _best(lambda: moba_decode_attention(qd, *dcall), args.repeat)
            t_sp, sp = _best(lambda: moba_sparse_decode_attention(qd, *dcall), args.repeat)
            union = min(args.heads * (top_k - 1), (ctx - 1) // block) + 1  # gathered blocks, own included
            print(f"{ctx:>6} {f'{block}:{top_k}':>9} {'decode':>8} {t_ref:>9.4f} {t_sp:>9.4f} "
                  f"{t_ref / t_sp:>8.1f}x {min(1.0, union * block / ctx):>10.3f} "
                  f"{(ref - sp).abs().max().item():>9.1e}", flush=True)
    print("keys read: prefill, attended keys per (query, head) / ctx; decode, gathered entries per sequence "
          "(the heads' union + own block, at most) / ctx. The masked references read all of ctx.")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
