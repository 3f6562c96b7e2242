"""MLA decode attention over the paged latent cache: the Triton kernel vs the PyTorch reference.

    python bench/mla_decode.py --check
    python bench/mla_decode.py --batch 1 8 64 --ctx 1024 4096 --splits 0 4 16

One layer's decode attention at the Moonlight-16B-A3B shape (16 heads, kv_lora 512 + rope 64,
bf16, block size 64; --heads 64 for Kimi K2's heads per GPU). Every sequence in a batch has the
same context length; its blocks are scattered over the pool. Prints a Markdown table: time per
call for the reference (eager), the kernel (eager, and replayed from a CUDA graph: device time
without launch overhead), the kernel's achieved bandwidth = bytes of latents read / graph time, and
the eager speed-up over the reference.
--check compares each configuration's output with the reference first (bf16 tolerance).
Needs CUDA and triton.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from moonlet.engine.attention import paged_decode_attention
from moonlet.kernels import mla_decode


def make_batch(batch: int, ctx: int, heads: int, kv_lora: int, rope: int, block_size: int, dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    D = kv_lora + rope
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq + 8
    pool = torch.randn(num_blocks, block_size, D, device="cuda", dtype=dtype, generator=g)
    tables = torch.randperm(num_blocks, device="cuda", generator=g)[:batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch, heads, D, device="cuda", dtype=dtype, generator=g)
    ctx_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.long)
    return q, pool, tables, ctx_lens


def time_eager(fn, iters: int) -> float:
    """Seconds per call, launches included."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def time_graph(fn, iters: int) -> float:
    """Seconds per call replayed from one CUDA graph of ``iters`` calls (device time)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--heads", type=int, default=16, help="16: Moonlight-16B-A3B; 64: Kimi K2 per GPU")
    ap.add_argument("--kv-lora", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--splits", type=int, nargs="+", default=[0], help="KV splits to try; 0 = the heuristic")
    ap.add_argument("--block-h", type=int, default=None, help="heads per program (power of two >= 16)")
    ap.add_argument("--num-warps", type=int, default=None, help="override mla_decode.NUM_WARPS")
    ap.add_argument("--num-stages", type=int, default=None, help="override the pipeline stages for --dtype")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--check", action="store_true", help="compare outputs with the reference first")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() or not mla_decode.available():
        print("needs a CUDA GPU (compute capability >= 8.0) and the triton package", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    if args.num_warps:
        mla_decode.NUM_WARPS = args.num_warps
    if args.num_stages:
        mla_decode.NUM_STAGES = {**mla_decode.NUM_STAGES, elem: args.num_stages}
    D = args.kv_lora + args.rope
    scale = 1.0 / math.sqrt(128 + args.rope)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; heads {args.heads}, D {args.kv_lora}+{args.rope}, {args.dtype}, "
          f"block size {args.block_size}; {mla_decode.NUM_WARPS} warps, {mla_decode.NUM_STAGES[elem]} stages; "
          "one layer\n")
    print("| batch | ctx | splits | reference ms | kernel ms (eager) | kernel us (graph) | latent GB/s | eager speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed = False
    for batch in args.batch:
        for ctx in args.ctx:
            q, pool, tables, ctx_lens = make_batch(batch, ctx, args.heads, args.kv_lora, args.rope, args.block_size,
                                                   dtype, seed=batch * 100003 + ctx)
            ref_fn = lambda: paged_decode_attention(q, pool, tables, ctx_lens, scale, args.kv_lora)  # noqa: E731
            t_ref = time_eager(ref_fn, max(3, args.iters // 10))
            latent_bytes = batch * ctx * D * elem
            for splits in args.splits:
                kw = dict(num_splits=splits or None, block_h=args.block_h)
                fn = lambda: mla_decode.paged_decode_attention_triton(  # noqa: E731
                    q, pool, tables, ctx_lens, scale, args.kv_lora, **kw)
                if args.check:
                    err = (fn() - ref_fn()).abs().max().item()
                    tol = 1e-4 if dtype == torch.float32 else 2e-2
                    if not err <= tol:
                        print(f"CHECK FAILED batch {batch} ctx {ctx} splits {splits or 'auto'}: max error {err}",
                              file=sys.stderr)
                        failed = True
                used = splits or mla_decode.choose_num_splits(
                    batch, -(-args.heads // (args.block_h or mla_decode.heads_per_program(args.heads))),
                    tables.shape[1] * args.block_size, mla_decode._num_sms(q.device))
                t_eager = time_eager(fn, args.iters)
                t_graph = time_graph(fn, args.iters)
                print(f"| {batch} | {ctx} | {used} | {t_ref * 1e3:.3f} | {t_eager * 1e3:.3f} | {t_graph * 1e6:.1f} | "
                      f"{latent_bytes / t_graph / 1e9:.0f} | {t_ref / t_eager:.1f}x |", flush=True)
            del q, pool, tables, ctx_lens
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
