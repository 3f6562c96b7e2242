"""The FP8 latent KV cache (``--kv-cache-dtype fp8``): capacity, and on moonlet-tiny its speed and accuracy.

    python bench/kv_cache_dtype.py --threads 1
    python bench/kv_cache_dtype.py --memory 64GiB --dtype float32

Part 1, from the configs alone (nothing is allocated): bytes per token (every latent layer's entry, FP8
scales included) for Kimi K2, Moonlight-16B-A3B and moonlet-tiny with the cache in bf16 and in FP8, the
tokens a pool of --memory holds, and what 1M tokens of context take.

Part 2, moonlet-tiny on this machine's CPU: the engine run twice on the same prompts (greedy, --max-tokens
each, --batch prompts at a time), with the cache in the model dtype (--dtype, default bfloat16) and in FP8:
decode tokens per second (a timed run after a warm-up run), the share of generated tokens equal to the
model-dtype run's (up to each prompt's first difference), and the deviation of the log-probability of the
model-dtype run's token at each step before that point (the same context in both runs, so what differs is
the cache).
"""

from __future__ import annotations

import argparse
import time

import torch

from moonlet.assets import default_model_path
from moonlet.config import ModelConfig, preset
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.cache import bytes_per_block, latent_layer_ids, parse_bytes

PROMPTS = ["def add(a, b):\n    return", "The capital of France is", "import os\nimport sys\n\ndef main():",
           "class Foo:\n    def __init__(self", "What is 12 + 30?", "for i in range(10):\n    print(",
           "Hello, who are you?", "def read_file(path):\n    with open(", "The capital of Japan is",
           "while True:\n    line = input(", "Repeat after me: the quick brown fox", "x = [1, 2, 3]\ny = sum("]


def capacity(memory: int) -> None:
    tiny = ModelConfig.from_pretrained(str(default_model_path()))
    models = {"Kimi K2": preset("kimi-k2"), "Moonlight-16B-A3B": preset("moonlight-16b-a3b"), "moonlet-tiny": tiny}
    print(f"| model | latent layers x values | bf16 bytes/token | fp8 bytes/token | ratio | tokens in {memory / 2**30:g} "
          f"GiB (bf16 / fp8) | 1M tokens (bf16 / fp8) |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in models.items():
        bf16 = bytes_per_block(cfg, 1, torch.bfloat16)
        fp8 = bytes_per_block(cfg, 1, torch.float8_e4m3fn)
        print(f"| {name} | {len(latent_layer_ids(cfg))} x {cfg.latent_dim} | {bf16:,} | {fp8:,} | {bf16 / fp8:.2f}x | "
              f"{memory // bf16:,} / {memory // fp8:,} | {bf16 * 2**20 / 1e9:.1f} / {fp8 * 2**20 / 1e9:.1f} GB |")


def run_engine(kv: str, args) -> tuple[list, float, int]:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=1)
    with LLM(None, dtype=args.dtype, kv_cache_dtype=kv, max_num_seqs=args.batch) as llm:
        llm.generate(PROMPTS[:2], params)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(PROMPTS[:args.batch], params)
        seconds = time.perf_counter() - start
        stats = llm.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"  {kv:>4}: cache {stats['kv_cache_dtype']}, {stats['blocks_total']} blocks in "
          f"{stats['kv_cache_bytes'] / 2**20:.1f} MiB; {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s")
    return outs, tokens / seconds, stats["blocks_total"]


def accuracy(ref, fp8) -> None:
    agree = total = 0
    deviations = []
    for a, b in zip(ref, fp8):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        agree += first
        total += len(a.token_ids)
        for i in range(min(first + 1, len(a.token_ids))):
            token = a.token_ids[i]
            if token in b.logprobs[i]:
                deviations.append(abs(a.logprobs[i][token] - b.logprobs[i][token]))
    dev = torch.tensor(deviations)
    print(f"  tokens equal to the model-dtype run (up to each prompt's first difference): {agree}/{total} "
          f"({agree / total:.0%}); prompts identical throughout: "
          f"{sum(a.token_ids == b.token_ids for a, b in zip(ref, fp8))}/{len(ref)}")
    print(f"  |logprob deviation| of the model-dtype run's token, {len(dev)} steps with the same context: "
          f"mean {dev.mean():.4f}, median {dev.median():.4f}, max {dev.max():.4f} nats")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", default="80GiB", help="pool memory for the capacity table (default 80GiB)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="moonlet-tiny's run dtype")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together (at most 12)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    capacity(parse_bytes(args.memory))
    print(f"\nmoonlet-tiny, {args.dtype}, CPU ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{args.max_tokens} tokens each:")
    ref, ref_speed, ref_blocks = run_engine("auto", args)
    fp8, fp8_speed, fp8_blocks = run_engine("fp8", args)
    print(f"  decode speed fp8 / auto: {fp8_speed / ref_speed:.2f}x")
    accuracy(ref, fp8)


if __name__ == "__main__":
    main()
