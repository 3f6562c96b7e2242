"""Parallel sampling: one request with n samples against n separate requests of the same prompt.

    python bench/parallel_sampling.py                     # 4 prompts x 1024 tokens, n = 8, 32 tokens out, CPU
    python bench/parallel_sampling.py --num-prompts 4 --input-len 1024 --n 8 --output-len 32 --threads 1
    python bench/parallel_sampling.py --random moonlet-tiny-shape --device cuda --dtype bfloat16 --input-len 4096

Two runs over the same random prompts on one model (random weights unless --model), each in a fresh
engine after a warm-up on other prompts, all requests in one ``generate`` call, sampled (temperature
1) with seeds:

- "n = N": one request per prompt with ``SamplingParams(n=N, seed=s)`` — sample i uses seed s + i;
- "N requests": N requests per prompt with seeds s, s + 1, ..., s + N - 1, as a client without ``n``
  sends them (all at once, so they are admitted together and none finds the others' blocks cached).

Both must produce the same tokens (sample i = the request with seed s + i). Printed: prompt tokens,
those computed (``prefix_cache_queries - prefix_cache_hits``), and the wall time of the call.
Extra engine flags (--block-size, --max-num-batched-tokens, ...) apply to both runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.benchmark import random_prompts
from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli


def build_model(args):
    from moonlet import testing

    if args.random == "moonlet-tiny-shape":  # the bundled model's architecture, random weights
        from moonlet.config import ModelConfig
        from moonlet.train.recipes.tiny import model_config

        cfg = ModelConfig.from_dict(model_config())
    else:
        cfg = testing.tiny_k2_config()
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.input_len + args.output_len))
    model = testing.random_model(cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if args.dtype:
        model = model.cast(getattr(torch, args.dtype))
    return model


def run(make_llm, prompts, args, grouped: bool) -> dict:
    llm = make_llm()
    vocab = llm.engine.model_config.vocab_size
    llm.generate(random_prompts(2, 64, vocab, args.seed + 1), SamplingParams(max_tokens=4, n=2))  # warm-up
    before = llm.stats()
    common = dict(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    if grouped:
        params = SamplingParams(n=args.n, seed=args.seed, **common)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
    else:
        params = [SamplingParams(seed=args.seed + i, **common) for _ in prompts for i in range(args.n)]
        t0 = time.perf_counter()
        outs = llm.generate([p for p in prompts for _ in range(args.n)], params)
    if llm.engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = llm.stats()
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    llm.close()
    return {"seconds": seconds, "prompt": sum(len(p) for p in prompts) * args.n, "computed": queries - hits,
            "tokens": [o.token_ids for o in outs], "steps": after["steps"] - before["steps"],
            "config": llm.engine.config}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: random weights)")
    p.add_argument("--random", default="tiny-k2", choices=["tiny-k2", "moonlet-tiny-shape"])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    add_engine_cli_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine_args = engine_args_from_cli(args)
    if args.model:
        def make_llm():
            return LLM(args.model, **engine_args)
        name = args.model
    else:
        model = build_model(args)
        engine_args.pop("device", None), engine_args.pop("dtype", None)

        def make_llm():
            return LLM(model=model, **engine_args)
        name = f"random {args.random}"
    probe = make_llm()
    prompts = random_prompts(args.num_prompts, args.input_len, probe.engine.model_config.vocab_size, args.seed)
    probe.close()
    grouped = run(make_llm, prompts, args, grouped=True)
    separate = run(make_llm, prompts, args, grouped=False)
    if grouped["tokens"] != separate["tokens"]:
        print("the two runs generated different tokens", file=sys.stderr)
        return 1
    rc = grouped["config"]
    print(f"model: {name} | device {rc.device} | threads {torch.get_num_threads()} | blocks {rc.num_blocks} x "
          f"{rc.block_size} | max_num_batched_tokens {rc.max_num_batched_tokens} | torch {torch.__version__}")
    print(f"{args.num_prompts} prompts x {args.input_len} tokens, {args.n} samples each, {args.output_len} tokens out "
          f"(temperature 1, seeded); identical tokens in both runs\n")
    print("| run | prompt tokens | computed | steps | time | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in ((f"n = {args.n}", grouped), (f"{args.n} requests", separate)):
        print(f"| {label} | {r['prompt']:,} | {r['computed']:,} | {r['steps']} | {r['seconds']:.2f} s | "
              f"{separate['seconds'] / r['seconds']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
