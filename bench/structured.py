"""Structured outputs: what a JSON-schema or JSON-object constraint adds per engine step.

    python bench/structured.py                        # the bundled moonlet-tiny, CPU
    python bench/structured.py --batch 1 8 --output-len 64

For each batch size it decodes the same chat prompts (greedy) free, under ``json_object`` and under
a JSON schema (compact whitespace, as the servers send it), on one engine (free runs ignore EOS so they decode the full length), after a warm-up run (the
grammar compiles once, then comes from the cache), and prints a Markdown table: engine steps, output
tokens, milliseconds per step (the fastest of ``--repeats`` runs) and the constrained runs' overhead
per step against the free run. A
constrained request may finish before ``--output-len`` (its JSON is complete), so compare per step.
It also prints the grammar compile time (a cache miss) for the schema.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.params import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "status": {"enum": ["active", "inactive", "pending"]},
    },
    "required": ["name", "age", "tags", "address", "status"],
}


def run(llm: LLM, prompts, params: SamplingParams) -> tuple[int, int, float]:
    steps0 = llm.stats()["steps"]
    start = time.perf_counter()
    outs = llm.generate(prompts, [params] * len(prompts))
    elapsed = time.perf_counter() - start
    return llm.stats()["steps"] - steps0, sum(len(o.token_ids) for o in outs), elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest per step is reported")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu")
    grammars = llm.engine.grammars
    start = time.perf_counter()
    grammars.compile(StructuredOutput(json_schema=SCHEMA, any_whitespace=False))
    compile_ms = (time.perf_counter() - start) * 1e3
    print(f"model {llm.model_name}, vocab {llm.engine.model_config.vocab_size}, torch threads "
          f"{torch.get_num_threads()}; schema compile {compile_ms:.1f} ms (cache miss)\n", file=sys.stderr)
    modes = {
        "free": None,
        "json_object": StructuredOutput(json_object=True, any_whitespace=False),
        "json_schema": StructuredOutput(json_schema=SCHEMA, any_whitespace=False),
    }
    print("| batch | mode | steps | output tokens | ms / step | overhead / step |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Describe person {i} as JSON."}],
                                                     tokenize=True, thinking=False) for i in range(b)]
        base = None
        for name, spec in modes.items():
            # free runs ignore EOS so they decode the full length, as the constrained ones mostly do
            params = SamplingParams(temperature=0, max_tokens=args.output_len, structured=spec,
                                    ignore_eos=spec is None)
            run(llm, prompts, params)  # warm-up
            steps, tokens, elapsed = min((run(llm, prompts, params) for _ in range(args.repeats)),
                                         key=lambda r: r[2] / r[0])
            per_step = elapsed / steps * 1e3
            base = per_step if base is None else base
            extra = "" if name == "free" else f"{per_step - base:+.2f} ms ({(per_step / base - 1) * 100:+.0f}%)"
            print(f"| {b} | {name} | {steps} | {tokens} | {per_step:.2f} | {extra} |")


if __name__ == "__main__":
    main()
