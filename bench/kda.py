"""Kimi Delta Attention core: the token-by-token recurrence (kda_recurrent, the reference) vs the
chunked WY form (kda_chunked), on random inputs, in one run.

    python bench/kda.py                              # CPU, float32, Kimi-Linear-48B's layer shape
    python bench/kda.py --tokens 2048 8192 --repeat 1 --warmup 0   # what docs/benchmarks.md records

One row per sequence length: one layer's KDA (heads × head_dim, batch 1, q/k L2-normalized, decays
as the published gate would give them), forward only (no_grad), median of --repeat runs after a
warm-up, and the largest output difference between the two forms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moonlet.model.kda import kda_chunked, kda_recurrent


def inputs(T: int, H: int, d: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, T, H, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T, H, d, generator=gen), dim=-1)
    v = torch.randn(1, T, H, d, generator=gen)
    # -exp(A_log) * softplus(x + dt_bias) with A in [1, 16] and small pre-activations: decays of the
    # size a freshly initialized layer produces
    A = torch.empty(H, 1).uniform_(1, 16, generator=gen)
    g = -A * F.softplus(torch.randn(1, T, H, d, generator=gen) - 4)
    beta = torch.rand(1, T, H, generator=gen)
    return [t.to(device) for t in (q, k, v, g, beta)]


def timed(fn, args, repeat: int, warmup: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)[0]
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing each form")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"KDA core, {args.heads} heads x {args.head_dim}, batch 1, float32, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat} "
          f"after {args.warmup} warm-up")
    print(f"{'tokens':>8} {'recurrent s':>12} {'chunked s':>10} {'speed-up':>9} {'max |diff|':>11}")
    with torch.no_grad():
        for T in args.tokens:
            x = inputs(T, args.heads, args.head_dim, args.device)
            t_rec, o_rec = timed(kda_recurrent, x, args.repeat, args.warmup)
            t_chk, o_chk = timed(kda_chunked, x, args.repeat, args.warmup)
            diff = (o_rec - o_chk).abs().max().item()
            print(f"{T:>8} {t_rec:>12.3f} {t_chk:>10.3f} {t_rec / t_chk:>8.1f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
