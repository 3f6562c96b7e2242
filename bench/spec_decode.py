"""Speculative decoding with n-gram drafts: throughput and acceptance with and without it.

    python bench/spec_decode.py                      # the bundled moonlet-tiny, CPU
    python bench/spec_decode.py --num-prompts 1 8 --num-speculative-tokens 2 4 8
    python bench/spec_decode.py --random tiny-k2     # a random model (no tokenizer: token workloads only)

Workloads (greedy unless --temperature, exactly --output-len tokens each, ignore_eos):

- ``quote``: chat prompts asking the model to repeat a piece of source code (functions of this
  package), the copy-heavy shape of agent work (needs the model's tokenizer);
- ``repeat``: a random token span written three times, so the context invites copying;
- ``random``: random token ids (drafts seldom match: the cost of speculating for nothing).

For each workload and batch size it runs the engine without speculation, then with ``--speculative
ngram`` for each k, on a fresh engine each (no prefix-cache carry-over), and checks that the outputs
are identical (sampled runs give every request its own seed, and a seeded request samples the same
tokens with and without speculation). Prints a Markdown table: output tokens/s, engine steps, drafts verified, accepted,
the acceptance rate and the mean tokens a verifying sequence got per step.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.benchmark import random_prompts


def source_snippets() -> list[str]:
    """Source of a few functions of this package: text to be quoted back."""
    from moonlet.engine import cache, sampler, spec, thinking

    funcs = [sampler.apply_penalties, cache.block_hash, spec.propose_ngram, thinking.prompt_leaves_thinking_open,
             cache.parse_bytes, sampler.filter_logits, thinking._last_index, cache.available_memory]
    return [inspect.getsource(f) for f in funcs]


def workloads(llm: LLM, num_prompts: int, input_len: int, seed: int) -> dict[str, list[list[int]]]:
    vocab = llm.engine.model_config.vocab_size
    out: dict[str, list[list[int]]] = {}
    tok = llm.tokenizer
    if tok is not None and hasattr(tok, "apply_chat_template"):
        snippets = source_snippets()
        prompts = []
        for i in range(num_prompts):
            text = snippets[i % len(snippets)]
            conv = [{"role": "user", "content": "Repeat this code exactly, nothing else:\n\n" + text}]
            prompts.append(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
        out["quote"] = prompts
    span = max(4, input_len // 3)
    out["repeat"] = [p * 3 for p in random_prompts(num_prompts, span, vocab, seed)]
    out["random"] = random_prompts(num_prompts, input_len, vocab, seed + 1)
    return out


def run(model_path, model, tokenizer, prompts, output_len: int, temperature: float, **engine_args) -> dict:
    llm = LLM(model_path, model=model, tokenizer=tokenizer, **engine_args)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    llm.engine.cache.allocator.reset_prefix_cache()
    before = llm.stats()
    params = [SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = llm.stats()
    d = {k: after[k] - before[k] for k in ("steps", "spec_draft_tokens", "spec_accepted_tokens", "spec_verifications")}
    n_out = sum(len(o.token_ids) for o in outs)
    return dict(outputs=[o.token_ids for o in outs], seconds=seconds, out_tokens=n_out, tok_s=n_out / seconds, **d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    p.add_argument("--random", default=None, help="random weights instead: tiny-k2")
    p.add_argument("--num-prompts", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=96, help="prompt length of the token workloads")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[4])
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--ngram-min", type=int, default=2)
    p.add_argument("--workloads", nargs="+", default=["quote", "repeat", "random"])
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, one seed per request")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="model and cache dtype (default: the checkpoint's; moonlet-tiny: bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = tokenizer = None
    path = args.model
    if args.random:
        from moonlet.testing import random_model, tiny_k2_config

        if args.random != "tiny-k2":
            print(f"--random {args.random!r}: only tiny-k2 is offered here", file=sys.stderr)
            return 2
        model = random_model(tiny_k2_config(), seed=args.seed)
    elif path is None:
        from moonlet.assets import default_model_path

        path = str(default_model_path())
    base = dict(device=args.device, dtype=args.dtype)
    probe = LLM(path, model=model, **base)
    tokenizer = probe.tokenizer
    print(f"model: {args.random or path} | device {probe.engine.config.device} | {probe.engine.model.dtype} "
          f"| threads {torch.get_num_threads()} "
          f"| ngram {args.ngram_max}..{args.ngram_min} | {args.output_len} tokens out, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, ignore_eos\n")
    print("| workload | prompts | speculation | out tok | seconds | out tok/s | speed-up | steps | drafts | accepted "
          "| acceptance | tokens/verify | same output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prompts_all in workloads(probe, max(args.num_prompts), args.input_len, args.seed).items():
        if name not in args.workloads:
            continue
        for n in args.num_prompts:
            prompts = prompts_all[:n]
            plain = run(path, model, tokenizer, prompts, args.output_len, args.temperature, **base)
            rows = [("off", plain)]
            for k in args.num_speculative_tokens:
                rows.append((f"ngram k={k}", run(path, model, tokenizer, prompts, args.output_len, args.temperature,
                                                  speculative="ngram",
                                                  num_speculative_tokens=k, ngram_max=args.ngram_max,
                                                  ngram_min=args.ngram_min, **base)))
            for label, r in rows:
                drafts, acc, ver = r["spec_draft_tokens"], r["spec_accepted_tokens"], r["spec_verifications"]
                rate = f"{acc / drafts:.0%}" if drafts else "-"
                per = f"{(acc + ver) / ver:.2f}" if ver else "-"
                same = "yes" if r["outputs"] == plain["outputs"] else "NO"
                print(f"| {name} | {n} | {label} | {r['out_tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} "
                      f"| {r['tok_s'] / plain['tok_s']:.2f}x | {r['steps']} | {drafts} | {acc} | {rate} | {per} "
                      f"| {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
