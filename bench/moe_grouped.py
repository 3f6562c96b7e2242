"""MoE layer forward: the per-expert loop (MoE.route_tokens, the reference) vs the grouped-GEMM path
(moonlet.kernels.moe), on random weights, in one run.

    python bench/moe_grouped.py                       # CPU, float32, tiny and Moonlight-size layers
    python bench/moe_grouped.py --device cuda --dtype bfloat16 --tokens 1 8 64 4096

Shapes: ``tiny`` (tiny_k2_config: H 64, 8 experts, top-3, one shared expert stacked as a group),
``moonlight`` (the moonlight-16b-a3b preset's MoE: H 2048, I 1408, 64 experts, top-6, a 2x-wide
shared expert run as a dense MLP) and ``moonlight-1shared`` (the same with one shared expert of the
routed size, stacked as K2 and DeepSeek-V3 do). Each row times --layers MoE layers applied in turn
(the router included) and prints the median over --repeat runs after a warm-up.

On CPU the grouped path's [tokens*k, H] temporaries are large enough that glibc serves them with
mmap, and the page faults of each fresh mapping can cost more than the GEMMs at small H; running
with MALLOC_MMAP_THRESHOLD_=64000000 (or jemalloc/tcmalloc) removes that effect from both columns.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moonlet.config import preset
from moonlet.model.moe import MoE
from moonlet.testing import tiny_k2_config


def shape_config(name: str):
    if name == "tiny":
        return tiny_k2_config()
    cfg = preset("moonlight-16b-a3b")
    if name == "moonlight-1shared":
        cfg = cfg.replace(n_shared_experts=1)
    elif name != "moonlight":
        raise SystemExit(f"unknown shape {name!r}; use tiny, moonlight or moonlight-1shared")
    return cfg


def build_layers(cfg, n: int, device, dtype) -> list[MoE]:
    layers = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        with torch.device("meta"):
            moe = MoE(cfg)
        moe = moe.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02).to(dtype))
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.zero_()
        layers.append(moe.eval())
    return layers


def time_forward(layers, x, fused: bool, repeat: int, device) -> float:
    for moe in layers:
        if fused:
            moe.fuse_experts()
        elif moe.stacked is not None:
            moe.stacked = None  # back to the loop; the weights stay views, which the loop reads as well

    def run():
        h = x
        for moe in layers:
            h = moe(h)
        return h

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        run()
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny", "moonlight", "moonlight-1shared"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 512])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    print(f"device {device}, {args.dtype}, {args.layers} MoE layers, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}")
    print("| shape | tokens | loop ms | grouped ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.shapes:
        cfg = shape_config(name)
        layers = build_layers(cfg, args.layers, device, dtype)
        for tokens in args.tokens:
            x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
            loop_ms = time_forward(layers, x, fused=False, repeat=args.repeat, device=device)
            with torch.inference_mode():
                loop_out = layers[0](x)
            grouped_ms = time_forward(layers, x, fused=True, repeat=args.repeat, device=device)
            with torch.inference_mode():
                diff = (layers[0](x).float() - loop_out.float()).abs().max().item()
            print(f"| {name} | {tokens} | {loop_ms:.2f} | {grouped_ms:.2f} | {loop_ms / grouped_ms:.2f}x | {diff:.2e} |",
                  flush=True)
        del layers
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
