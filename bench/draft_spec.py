"""Speculative decoding on moonlet-tiny: no speculation vs n-gram drafts vs the draft model.

    python bench/draft_spec.py                                  # bundled moonlet-tiny + moonlet-tiny-draft, CPU
    python bench/draft_spec.py --draft runs/a/export runs/b/export --num-prompts 1 8
    python bench/draft_spec.py --draft-k 2 4 6 --ngram-k 4 --dtype float32

Workloads (greedy, up to --output-len tokens, stopping at the end of the turn as served requests do):

- ``tools``: held-out synthetic tool-use conversations (``moonlet.train.synth``, quoted paths, the
  tool set moonlet-tiny was trained with): first requests, and conversations cut after a tool
  result (the next call or the final answer follows);
- ``quote``: chat requests to repeat a function of this package's source, which neither model
  was trained on (the copy-heavy shape of agent work, where n-gram drafts do well);
- ``code``: raw source of this package to continue (no chat template).

Each configuration runs on a fresh engine (no prefix-cache carry-over) after a short warm-up, and
its outputs are compared with those of the run without speculation ("same output"). Printed as a
Markdown table: output tokens/s, engine steps, drafts verified and accepted, acceptance =
accepted / drafts, tokens/verify = mean tokens a sequence got in a step that verified drafts,
draft forwards (draft-model steps, each a batched forward of the draft).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch

from moonlet.engine import LLM, SamplingParams


def package_functions() -> list[str]:
    """Source of a few functions of this package (not in either model's training data)."""
    from moonlet.engine import cache, sampler, spec, thinking

    funcs = [sampler.apply_penalties, cache.block_hash, spec.propose_ngram, thinking.prompt_leaves_thinking_open,
             cache.parse_bytes, sampler.filter_logits, thinking._last_index, cache.available_memory]
    return [inspect.getsource(f) for f in funcs]


def workloads(tok, n: int, seed: int) -> dict[str, list[list[int]]]:
    from moonlet.train.synth import conversation, generate_tasks, prompt_messages

    tasks = generate_tasks(n, seed=seed, heldout=True, quote_paths=True)
    tools = []
    for i, t in enumerate(tasks):
        msgs = conversation(t)[:len(prompt_messages(t)) + 2] if i % 2 and t.calls else prompt_messages(t)
        tools.append(tok.apply_chat_template(msgs, tools=t.tools, add_generation_prompt=True, tokenize=True))
    funcs = package_functions()
    quote = [tok.apply_chat_template([{"role": "user", "content": "Repeat this code exactly, nothing else:\n\n"
                                       + funcs[i % len(funcs)]}], add_generation_prompt=True, tokenize=True)
             for i in range(n)]
    code = [tok.encode(funcs[(i + 3) % len(funcs)], allow_special=False)[:96] for i in range(n)]
    return {"tools": tools, "quote": quote, "code": code}


STATS = ("steps", "spec_draft_tokens", "spec_accepted_tokens", "spec_verifications", "draft_forwards")


def run(path: str, prompts: list[list[int]], output_len: int, **engine_args) -> dict:
    llm = LLM(path, **engine_args)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    llm.engine.cache.allocator.reset_prefix_cache()
    before = llm.stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len))
    seconds = time.perf_counter() - start
    after = llm.stats()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in STATS}
    n_out = sum(len(o.token_ids) for o in outs)
    return dict(outputs=[o.token_ids for o in outs], seconds=seconds, out_tokens=n_out, tok_s=n_out / seconds, **d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target checkpoint (default: the bundled moonlet-tiny)")
    p.add_argument("--draft", nargs="+", default=None,
                   help="draft checkpoint(s) (default: the bundled moonlet-tiny-draft)")
    p.add_argument("--num-prompts", type=int, nargs="+", default=[1, 8])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ngram-k", type=int, nargs="*", default=[4], help="n-gram rows (k values; none: skip)")
    p.add_argument("--draft-k", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--workloads", nargs="+", default=["tools", "quote", "code"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model and cache dtype (default float32, where outputs must be identical)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moonlet.assets import default_draft_path, default_model_path

    path = args.model or str(default_model_path())
    drafts = args.draft or [str(default_draft_path())]
    base = dict(device=args.device, dtype=args.dtype)
    probe = LLM(path, **base)
    print(f"model: {path} | drafts: {', '.join(drafts)} | device {probe.engine.config.device} | "
          f"{probe.engine.model.dtype} | threads {torch.get_num_threads()} | up to {args.output_len} tokens out, "
          f"greedy\n")
    print("| workload | prompts | speculation | out tok | seconds | out tok/s | speed-up | steps | drafts | accepted "
          "| acceptance | tokens/verify | draft fwd | same output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    loads = workloads(probe.tokenizer, max(args.num_prompts), args.seed)
    for name in args.workloads:
        for n in args.num_prompts:
            prompts = loads[name][:n]
            plain = run(path, prompts, args.output_len, **base)
            rows = [("off", plain)]
            for k in args.ngram_k:
                rows.append((f"ngram k={k}", run(path, prompts, args.output_len, speculative="ngram",
                                                 num_speculative_tokens=k, **base)))
            for draft in drafts:
                label = "draft" if len(drafts) == 1 else f"draft {draft.rstrip('/').split('/')[-2]}"
                for k in args.draft_k:
                    rows.append((f"{label} k={k}", run(path, prompts, args.output_len, speculative="draft",
                                                       speculative_model=draft, num_speculative_tokens=k, **base)))
            for label, r in rows:
                drafted, acc, ver = r["spec_draft_tokens"], r["spec_accepted_tokens"], r["spec_verifications"]
                rate = f"{acc / drafted:.0%}" if drafted else "-"
                per = f"{(acc + ver) / ver:.2f}" if ver else "-"
                same = "yes" if r["outputs"] == plain["outputs"] else "NO"
                print(f"| {name} | {n} | {label} | {r['out_tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} "
                      f"| {r['tok_s'] / plain['tok_s']:.2f}x | {r['steps']} | {drafted} | {acc} | {rate} | {per} "
                      f"| {r['draft_forwards'] or '-'} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
