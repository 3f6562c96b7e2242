"""The prefix cache's host tier on an agent-like workload: prompt tokens computed and wall time with and
without ``--host-cache-memory``.

    python bench/host_cache.py --threads 1     # swarm-like: 32 sessions, long shared system prompt, short tasks
    python bench/host_cache.py --threads 1 --hidden 512 --system-len 256 --task-len 512 --user-len 128 \\
        --output-len 8 --sessions 24 --concurrency 6 --turns 4    # long per-session contexts (prefill-heavy)
    python bench/host_cache.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8

Workload: --sessions agent sessions, each a shared system prompt (--system-len random tokens: system
prompt and tool definitions, the same for every session) followed by its own task (--task-len). Every
turn appends the session's reply (--output-len greedy tokens) and a tool result or user message
(--user-len new tokens), and the whole conversation is sent again, as an agent client does. The
server runs --concurrency sessions at a time: turn t of sessions 0..c-1 in one ``generate`` call, then
of the next c, ..., then turn t + 1. So by a session's next turn the other sessions have been through
the device pool, which (default) holds about --concurrency sessions at their final length, far less
than all of them: without the host tier their evicted prefixes are recomputed.

Three runs on one random-weight model (moonlet-tiny's architecture, resizable with --hidden/--layers):
the device pool alone, the same pool with the host tier (default: room for every session), and a device
pool large enough to never evict (what the tier should approach). All three must produce the same
tokens. Extra engine flags (--block-size, --max-num-batched-tokens, ...) apply to every run; --num-blocks
sets the small pool.
"""

from __future__ import annotations

import argparse
import time

import torch

from moonlet.config import ModelConfig
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli
from moonlet.testing import random_model
from moonlet.train.recipes.tiny import model_config


def build_model(args) -> torch.nn.Module:
    cfg = ModelConfig.from_dict(model_config()).replace(max_position_embeddings=8192, vocab_size=args.vocab)
    if args.hidden:
        h = args.hidden
        cfg = cfg.replace(hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=3 * h // 2,
                          kv_lora_rank=h // 4, q_lora_rank=h // 2)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    model = random_model(cfg, seed=0).to(args.device)
    return model.cast(getattr(torch, args.dtype)) if args.dtype else model


def run(model, engine_args: dict, args) -> dict:
    llm = LLM(model=model, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    g = torch.Generator().manual_seed(args.seed)
    system = torch.randint(2, args.vocab, (args.system_len,), generator=g).tolist()
    convs = [system + torch.randint(2, args.vocab, (args.task_len,), generator=g).tolist()
             for _ in range(args.sessions)]
    replies, prompt_tokens, computed = [], 0, 0
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.turns):
        for first in range(0, args.sessions, args.concurrency):
            group = range(first, min(first + args.concurrency, args.sessions))
            outs = llm.generate([convs[i] for i in group], params)
            for i, out in zip(group, outs):
                prompt_tokens += len(convs[i])
                computed += len(convs[i]) - out.num_cached_tokens
                replies.append(out.token_ids)
                convs[i] = convs[i] + out.token_ids + torch.randint(2, args.vocab, (args.user_len,),
                                                                    generator=g).tolist()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = llm.stats()
    rc = llm.engine.config
    return {"seconds": seconds, "replies": replies, "prompt": prompt_tokens, "computed": computed, "stats": stats,
            "blocks": rc.num_blocks, "host_blocks": rc.host_blocks, "host_block_bytes": rc.host_block_bytes,
            "block_size": rc.block_size, "final_len": max(len(c) for c in convs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="sessions served at a time (one generate call)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=512, help="shared system prompt + tools, every session")
    p.add_argument("--task-len", type=int, default=64, help="each session's own first message")
    p.add_argument("--user-len", type=int, default=64, help="new tokens per turn (tool result / user message)")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=None, help="resize the model (default moonlet-tiny's 256)")
    p.add_argument("--layers", type=int, default=None, help="layers (default moonlet-tiny's 4)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    add_engine_cli_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    engine_args = engine_args_from_cli(args)
    engine_args.pop("device", None), engine_args.pop("dtype", None)
    host_memory = engine_args.pop("host_cache_memory", None)
    bs = engine_args.get("block_size") or (64 if args.device == "cuda" else 16)
    final_len = args.system_len + args.task_len + args.turns * (args.output_len + args.user_len)
    per_session = -(-final_len // bs)
    small = dict(engine_args)
    small.setdefault("num_blocks", args.concurrency * per_session + per_session // 2)
    large = {**engine_args, "num_blocks": (args.sessions + args.concurrency) * per_session}
    if host_memory is None:  # room for every session's blocks
        from moonlet.engine.cache import latent_layer_ids

        c = model.config
        per_block = len(latent_layer_ids(c)) * bs * c.latent_dim * torch.empty(0, dtype=model.dtype).element_size()
        host_memory = args.sessions * per_session * per_block
    run(model, {**small, "num_blocks": small["num_blocks"]}, argparse.Namespace(**{**vars(args), "turns": 1,
                                                                                     "sessions": 2}))  # warm-up
    results = {
        "device pool only": run(model, small, args),
        "device pool + host tier": run(model, {**small, "host_cache_memory": host_memory}, args),
        "large device pool": run(model, large, args),
    }
    reference = results["device pool only"]["replies"]
    same = all(r["replies"] == reference for r in results.values())
    r0 = results["device pool + host tier"]
    print(f"device {args.device} | dtype {model.dtype} | threads {torch.get_num_threads()} | hidden "
          f"{model.config.hidden_size} x {model.config.num_hidden_layers} layers | block size {r0['block_size']} | "
          f"small pool {r0['blocks']} blocks, large {results['large device pool']['blocks']} | host tier "
          f"{r0['host_blocks']} blocks x {r0['host_block_bytes']} bytes")
    print(f"{args.sessions} sessions x {args.turns} turns, {args.concurrency} at a time: system {args.system_len} + "
          f"task {args.task_len}, +{args.output_len} reply +{args.user_len} new per turn (final "
          f"{r0['final_len']} tokens) | identical tokens in all runs: {same}\n")
    print("| run | prompt tokens | computed | host hits (tokens) | blocks in / out | MiB in / out | preemptions "
          "| time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        s = r["stats"]
        print(f"| {name} | {r['prompt']:,} | {r['computed']:,} | {s['host_cache_hits']:,} | "
              f"{s['host_cache_blocks_swapped_in']:,} / {s['host_cache_blocks_swapped_out']:,} | "
              f"{s['host_cache_bytes_swapped_in'] / 2**20:.1f} / {s['host_cache_bytes_swapped_out'] / 2**20:.1f} | "
              f"{s['preemptions']} | {r['seconds']:.2f} s |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
