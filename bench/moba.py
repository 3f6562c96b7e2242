"""MoBA block-sparse attention vs dense causal SDPA: one attention layer on CPU.

Times the attention op alone (no projections) at Moonlight-like head shapes (16 heads, q/k 192,
v 128, batch 1, float32) for a forward (no grad) and a forward + backward, and reports the peak
resident memory the op added. Each measurement runs in a fresh child process so its peak RSS
(``ru_maxrss``) is its own. The methods of one (T, mode) run in turn, for --rounds rounds, and each
reports its fastest round, so load from other processes on a shared machine hits all of them alike.

Two dense baselines: "SDPA" as MLAttention calls it (d_v != d_qk, so PyTorch's CPU SDPA takes its
math path, which holds [heads, T, T] scores; only run up to --math-max-seq), and "SDPA flash" with
v zero-padded to d_qk so the fused CPU flash kernel runs (the padding is timed too).

    python bench/moba.py                      # T = 4096, 8192, 16384; B=512/k=3 and B=1024/k=3
    python bench/moba.py --seq 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _one(method: str, T: int, mode: str, block_size: int, top_k: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from moonlet.model.sparse import moba_attention

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    heads, d_qk, d_v = 16, 192, 128
    grad = mode == "fwd+bwd"
    q, k = (torch.randn(1, heads, T, d_qk, generator=gen).requires_grad_(grad) for _ in range(2))
    v = torch.randn(1, heads, T, d_v, generator=gen).requires_grad_(grad)
    d_out = torch.randn(1, heads, T, d_v, generator=gen)
    scale = d_qk**-0.5

    def run():
        with torch.set_grad_enabled(grad):
            if method == "dense":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            elif method == "flash":
                v_pad = F.pad(v, (0, d_qk - d_v))
                out = F.scaled_dot_product_attention(q, k, v_pad, is_causal=True, scale=scale)[..., :d_v]
            else:
                out = moba_attention(q, k, v, block_size, top_k, scale)
            if grad:
                out.backward(d_out)
                q.grad = k.grad = v.grad = None

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "peak_mib": max(0, after.ru_maxrss - before.ru_maxrss) / 1024}


def _measure(args, method, T, mode, block_size, top_k) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(T), mode, str(block_size), str(top_k),
           str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _attended_fraction(T: int, block_size: int, top_k: int) -> float:
    """Attended (query, key) pairs under MoBA over those of dense causal attention."""
    pairs = 0
    for t in range(T):
        own = t // block_size
        pairs += (t - own * block_size + 1) + min(top_k - 1, own) * block_size
    return pairs / (T * (T + 1) / 2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, T, mode, bs, k, threads = sys.argv[2:]
        print(json.dumps(_one(method, int(T), mode, int(bs), int(k), int(threads))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--moba", nargs="+", default=["512:3", "1024:3"], help="block_size:top_k settings")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="each measurement is the best of this many runs")
    p.add_argument("--math-max-seq", type=int, default=4096, help="longest T for the math-path SDPA baseline")
    args = p.parse_args()
    settings = [tuple(int(x) for x in s.split(":")) for s in args.moba]

    import os

    import torch

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          "batch 1, 16 heads, d_qk 192, d_v 128, float32")
    print(f"{'T':>6} {'mode':>8} {'method':>16} {'attended':>9} {'seconds':>9} {'speed-up':>9} {'cpu s':>7} "
          f"{'sys s':>6} {'peak MiB':>9}")
    print("seconds: wall clock; cpu s / sys s: process CPU time (all threads) / its system part, of the same run;"
          " speed-up: wall clock against 'SDPA flash' (the faster dense baseline)")
    for T in args.seq:
        for mode in args.modes:
            methods = [("SDPA (math)", "dense", 0, 0)] if T <= args.math_max_seq else []
            methods += [("SDPA flash", "flash", 0, 0)] + [(f"MoBA B={bs} k={k}", "moba", bs, k) for bs, k in settings]
            best: dict[str, dict] = {}
            peak = {name: 0.0 for name, *_ in methods}
            for _ in range(args.rounds):
                for name, method, bs, k in methods:
                    r = _measure(args, method, T, mode, bs, k)
                    if name not in best or r["seconds"] < best[name]["seconds"]:
                        best[name] = r
                    peak[name] = max(peak[name], r["peak_mib"])
            for name, method, bs, k in methods:
                r = best[name]
                frac = _attended_fraction(T, bs, k) if method == "moba" else 1.0
                speed = "" if method == "dense" else f"{best['SDPA flash']['seconds'] / r['seconds']:.2f}x"
                print(f"{T:>6} {mode:>8} {name:>16} {frac:>9.3f} {r['seconds']:>9.3f} {speed:>9} "
                      f"{r['user'] + r['sys']:>7.2f} {r['sys']:>6.2f} {peak[name]:>9.0f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
