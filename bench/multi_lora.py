"""Multi-LoRA serving: throughput with 0, 1 and 4 LoRA adapters mixed in one batch, against the engine
without LoRA and with the adapter merged into the weights.

    python bench/multi_lora.py                         # bundled moonlet-tiny, 64 prompts x 128 -> 64, rank 16, CPU
    python bench/multi_lora.py --num-prompts 64 --input-len 128 --output-len 64 --rank 16 --threads 1
    python bench/multi_lora.py --device cuda --dtype bfloat16 --num-prompts 256

Rows, each a fresh engine over the same random prompts (greedy, exactly --output-len tokens each, all
requests in one ``generate`` call, after a warm-up):

- "LoRA off": the plain engine;
- "merged": adapter 0 merged into the weights (``merge_adapter``), LoRA off — what one adapter costs
  when it is served merged;
- "LoRA on, 0 adapters": ``enable_lora`` with every request on the base model (the hooks stay off);
- "1 adapter": every request under adapter 0;
- "4 adapters mixed": requests round-robin over adapters 0..3 (max_loras=4, all resident).

The adapters target moonlet's default modules (MLA projections, dense MLP, shared experts) with random
nonzero factors of rank --rank. Printed: output and total (prompt + output) tokens per second.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.benchmark import random_prompts


def load_base(args):
    from moonlet.assets import default_model_path
    from moonlet.weights import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(str(args.model or default_model_path()), device=device, dtype=dtype).eval()


def timed(llm: LLM, prompts, params) -> tuple[float, int]:
    vocab = llm.engine.model_config.vocab_size
    llm.generate(random_prompts(4, 32, vocab, 99), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moonlet.model.lora import merge_adapter
    from moonlet.testing import random_adapter

    base = load_base(args)
    tmp = Path(tempfile.mkdtemp(prefix="moonlet-multi-lora-"))
    paths = [str(random_adapter(base, tmp / f"a{i}", r=args.rank, alpha=2.0 * args.rank, seed=i, std=0.05))
             for i in range(4)]
    prompts = random_prompts(args.num_prompts, args.input_len, base.config.vocab_size, args.seed)
    common = dict(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engine = dict(max_num_seqs=args.num_prompts)
    rows = []

    def row(label, llm, loras):
        params = [SamplingParams(**common, lora=loras[i % len(loras)]) for i in range(len(prompts))]
        seconds, out_tokens = timed(llm, prompts, params)
        total = out_tokens + args.num_prompts * args.input_len
        rows.append((label, out_tokens / seconds, total / seconds, seconds))
        llm.close()

    row("LoRA off", LLM(model=base, **engine), [None])
    row("merged (adapter 0 in the weights)", LLM(model=merge_adapter(copy.deepcopy(base), paths[0]), **engine), [None])
    lora = dict(lora_modules={f"a{i}": path for i, path in enumerate(paths)}, max_loras=4, max_lora_rank=args.rank)
    row("LoRA on, 0 adapters (all base)", LLM(model=base, **engine, **lora), [None])
    row("1 adapter", LLM(model=base, **engine, **lora), ["a0"])
    row("4 adapters mixed", LLM(model=base, **engine, **lora), ["a0", "a1", "a2", "a3"])

    print(f"multi-LoRA, {args.num_prompts} prompts x {args.input_len} -> {args.output_len} tokens, rank {args.rank}, "
          f"{base.device}, {base.dtype}, {args.threads} thread(s)")
    print("| run | out tok/s | total tok/s | s |")
    print("|---|---|---|---|")
    for label, out_rate, total_rate, seconds in rows:
        print(f"| {label} | {out_rate:,.0f} | {total_rate:,.0f} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
