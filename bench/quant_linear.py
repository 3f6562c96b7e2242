"""Linear layers and a MoE layer computed from quantized weights vs the same weights dequantized.

    python bench/quant_linear.py                               # CPU: the plain-PyTorch reference paths
    python bench/quant_linear.py --tokens 1 16 256 4096        # on a CUDA machine: adds the Triton rows

Rows (K2 shapes, random weights quantized with moonlet.quant's writers):

- ``linear NxK``: one weight. ``bf16`` is ``F.linear`` on the dense bf16 weight (what a dequantized
  load computes with); ``fp8 ref`` / ``int4 ref`` are ``Fp8BlockLinear`` / ``Int4GroupLinear`` on their
  reference path (dequantize the whole weight, then ``F.linear``); ``fp8 triton`` / ``int4 triton``
  their CUDA kernel (the weight tile dequantized in registers). The bytes column is the weight as held
  in memory (values + scales).
- ``moe E x [I, H] top-k``: routed experts only, after ``fuse_experts``: bf16 grouped GEMMs
  (``moonlet.kernels.moe``) vs the quantized stacks (``moonlet.kernels.quant_moe``: the reference
  dequantizes each used expert; Triton runs the two grouped launches).

Each cell is the median of --repeat timed calls after a warm-up, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moonlet.kernels import quant_linear
from moonlet.kernels.moe import grouped_experts, stack_experts
from moonlet.kernels.quant_moe import (
    quant_grouped_experts_reference, quant_grouped_experts_triton, stack_quantized_experts,
)
from moonlet.kernels.quant_linear import QuantizedMatrix, quant_linear_reference
from moonlet.quant import pack_int4, quantize_fp8_block

LINEAR_SHAPES = {  # K2 (hidden 7168, expert 2048, q_lora 1536, kv_lora 512, 64 heads)
    "expert-gate 2048x7168": (2048, 7168),
    "expert-down 7168x2048": (7168, 2048),
    "kv_b_proj 16384x512": (16384, 512),
    "o_proj 7168x8192": (7168, 8192),
}


def quantize(kind: str, w: torch.Tensor) -> QuantizedMatrix:
    if kind == "fp8":
        q, s = quantize_fp8_block(w)
        return QuantizedMatrix("fp8", q, s, tuple(w.shape), (128, 128))
    parts = pack_int4(w)
    return QuantizedMatrix("int4", parts["weight_packed"], parts["weight_scale"], tuple(w.shape), (1, 32))


def timed(fn, repeat: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64])
    p.add_argument("--shapes", nargs="+", default=list(LINEAR_SHAPES), choices=list(LINEAR_SHAPES))
    p.add_argument("--experts", type=int, default=16, help="routed experts in the MoE rows (K2: 384)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    kinds = ["fp8", "int4"]
    triton_kinds = [k for k in kinds if device.type == "cuda" and quant_linear.available(k)]
    columns = ["bf16"] + [f"{k} ref" for k in kinds] + [f"{k} triton" for k in triton_kinds]

    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"bf16 activations, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat} "
          f"(ms)")
    print("| layer | tokens | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes:
        n, k = LINEAR_SHAPES[name]
        w = torch.randn(n, k, generator=gen).mul_(0.02)
        dense = w.to(device, dtype)
        quant = {kind: quantize(kind, w) for kind in kinds}
        quant = {kind: QuantizedMatrix(m.kind, m.data.to(device), m.scale.to(device), m.shape, m.block)
                 for kind, m in quant.items()}
        sizes = f"bf16 {dense.numel() * 2 / 2**20:.0f} MiB, " + ", ".join(
            f"{kind} {m.nbytes() / 2**20:.1f} MiB" for kind, m in quant.items())
        for tokens in args.tokens:
            x = torch.randn(tokens, k, generator=gen).to(device, dtype)
            cells = [timed(lambda: torch.nn.functional.linear(x, dense), args.repeat, device)]
            cells += [timed(lambda m=m: quant_linear_reference(x, m), args.repeat, device) for m in quant.values()]
            cells += [timed(lambda m=quant[kind]: quant_linear.quant_linear_triton(x, m), args.repeat, device)
                      for kind in triton_kinds]
            print(f"| linear {name} ({sizes}) | {tokens} | " + " | ".join(f"{c:.3f}" for c in cells) + " |",
                  flush=True)
        del dense, quant

    # a MoE layer's routed experts at K2's expert shape
    hidden, inter, experts = 7168, 2048, args.experts
    mats = {m: [torch.randn(*shape, generator=gen).mul_(0.02) for _ in range(experts)]
            for m, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}
    dense = stack_experts(*[[t.to(device, dtype) for t in mats[m]] for m in ("gate", "up", "down")])
    stacks = {}
    for kind in kinds:
        per = {m: [quantize(kind, t) for t in mats[m]] for m in mats}
        per = {m: [QuantizedMatrix(q.kind, q.data.to(device), q.scale.to(device), q.shape, q.block) for q in qs]
               for m, qs in per.items()}
        stacks[kind] = stack_quantized_experts(per["gate"], per["up"], per["down"])
    del mats
    label = f"moe {experts} x [{inter}, {hidden}] top-{args.top_k} (bf16 {dense.gate_up.numel() * 3 // 2 * 2 / 2**30:.2f} GiB, " \
        + ", ".join(f"{kind} {s.nbytes() / 2**30:.2f} GiB" for kind, s in stacks.items()) + ")"
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
        scores = torch.rand(tokens, experts, generator=gen)
        weights, indices = scores.topk(min(args.top_k, experts), dim=-1)
        weights, indices = weights.to(device), indices.to(device)
        cells = [timed(lambda: grouped_experts(x, weights, indices, dense), args.repeat, device)]
        cells += [timed(lambda s=s: quant_grouped_experts_reference(x, weights, indices, s), args.repeat, device)
                  for s in stacks.values()]
        cells += [timed(lambda s=stacks[kind]: quant_grouped_experts_triton(x, weights, indices, s), args.repeat,
                        device) for kind in triton_kinds]
        print(f"| {label} | {tokens} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
