"""Tensor / expert parallelism: what each rank holds for the published shapes, and what the split costs.

    python bench/tensor_parallel.py                       # memory plan for kimi-k2, deepseek-v3, moonlight
    python bench/tensor_parallel.py --presets kimi-k2 --sizes 4 8 16
    python bench/tensor_parallel.py --timing              # also time moonlet-tiny, tp 1 vs 2 (gloo on CPU)

Memory plan: each preset is built on the meta device and split with ``moonlet.parallel.shard_transformer``
for every size in --sizes (exactly as a rank loads it, without reading weights or starting processes).
Per rank: parameters, bytes in bf16, and bytes as K2.6 ships (routed experts INT4 in groups of 32 with
a bf16 scale: 0.5625 bytes per weight; everything else bf16). The latent KV cache is not split (each
rank keeps the whole latent of every token), so its bytes per token are the same at every size.

Timing (--timing): the bundled moonlet-tiny, --prompts prompts of --prompt-len random tokens, greedy,
--output-len tokens each, in one process and over 2 processes on the CPU. Both must give the same
tokens (float32). On a 2-core machine this measures the cost of the split (two all-reduces per layer,
the step sent to the worker), not a speed-up: one small model gains nothing from two CPU processes.
"""

from __future__ import annotations

import argparse
import time

import torch

from moonlet.config import ModelConfig
from moonlet.model import Transformer
from moonlet.parallel import TensorParallel, shard_transformer

INT4_BYTES_PER_WEIGHT = 0.5 + 2 / 32  # packed nibble + a bf16 scale per group of 32


def plan_row(config: ModelConfig, world: int) -> dict:
    with torch.device("meta"):
        model = Transformer(config)
    if world > 1:
        shard_transformer(model, TensorParallel(0, world, group=object()))  # no collective runs on meta
    experts = other = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            experts += p.numel()
        else:
            other += p.numel()
    return dict(world=world, params=experts + other, bf16=2 * (experts + other),
                int4=experts * INT4_BYTES_PER_WEIGHT + 2 * other)


def memory_plan(presets: list[str], sizes: list[int]) -> None:
    print("| preset | ranks | params / rank | bf16 GB / rank | INT4 experts GB / rank | latent KV KiB / token / rank |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in presets:
        config = ModelConfig.from_pretrained(name)
        kv = len([i for i in range(config.num_hidden_layers) if not config.is_kda_layer(i)]) * config.latent_dim * 2
        for world in sizes:
            try:
                row = plan_row(config, world)
            except ValueError as e:
                print(f"| {name} | {world} | cannot split: {e} | | | |")
                continue
            print(f"| {name} | {world} | {row['params'] / 1e9:.2f} B | {row['bf16'] / 1e9:.1f} | "
                  f"{row['int4'] / 1e9:.1f} | {kv / 1024:.1f} |")


def timing(args) -> None:
    from moonlet.engine import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    results = {}
    for world in (1, 2):
        with LLM(dtype="float32", tensor_parallel_size=world, max_num_seqs=args.prompts) as llm:
            llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            results[world] = (time.perf_counter() - t0, [o.token_ids for o in outs])
    same = results[1][1] == results[2][1]
    print("\n| moonlet-tiny, CPU | wall s | output tok/s |")
    print("|---|---:|---:|")
    for world, (wall, _) in results.items():
        print(f"| tensor_parallel_size {world} | {wall:.2f} | {args.prompts * args.output_len / wall:.1f} |")
    print(f"\nsame tokens: {same}")
    if not same:
        raise SystemExit("tensor-parallel tokens differ from the single-process run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["kimi-k2", "deepseek-v3", "moonlight-16b-a3b"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    memory_plan(args.presets, args.sizes)
    if args.timing:
        timing(args)


if __name__ == "__main__":
    main()
