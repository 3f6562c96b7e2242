"""Prefix caching on a hybrid (Kimi Linear: KDA + MLA) model in the engine: how many prompt tokens are
recomputed, and the time it takes, for two workloads.

    python bench/hybrid_prefix.py                       # chat: 8 conversations x 6 turns, CPU, one thread
    python bench/hybrid_prefix.py --conversations 8 --turns 6 --user-len 48 --output-len 32 --threads 1
    python bench/hybrid_prefix.py --workload swarm      # 32 sub-agents: one 500-token system prompt + 32-token tasks
    python bench/hybrid_prefix.py --workload swarm --agents 32 --system-len 500 --task-len 32 --output-len 16

chat:

Each conversation starts from its own random prompt; every turn appends the reply and --user-len new
random tokens, as a chat client resending the whole conversation does. All conversations' turn t are
submitted together (one ``generate`` call), greedy, exactly --output-len tokens each. The same
conversations run twice on one random-weight model: prefix caching on (recurrent-state snapshots at
block boundaries; see docs/serving-engine.md) and off (--no-prefix-caching). Both runs must produce
the same tokens.

swarm: --agents requests, each the same --system-len random tokens (system prompt and tool
definitions) followed by its own --task-len random tokens, all submitted in one ``generate`` call
(greedy, --output-len tokens each), as an agent swarm spawning sub-agents does. Three runs: prefix
caching off; on, with snapshots only at prompt ends and generations (branch points off: the shared
prefix, ending mid-prompt, has no snapshot, so no hits); on, with branch-point snapshots (the default:
once one request matched another's cached prefix, the next ones resume at its last block boundary).
All three must produce the same tokens.

Extra engine flags (--block-size, --state-snapshots, ...) apply to every run.
"""

from __future__ import annotations

import argparse
import time

import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli
from moonlet.testing import random_model, tiny_kimi_linear_config


def small_kimi_linear(hidden: int, vocab: int, max_len: int):
    """A small Kimi-Linear-shaped model: KDA, KDA, KDA, MLA after a dense first layer (random weights)."""
    cfg = tiny_kimi_linear_config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=hidden // 2, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=max_len,
        linear_attn_config=dict(kda_layers=[1, 2, 3], full_attn_layers=[4], num_heads=4, head_dim=hidden // 4,
                                short_conv_kernel_size=4))
    return random_model(cfg, seed=0)


def conversation_starts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def run(model, engine_args: dict, args) -> dict:
    llm = LLM(model=model, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    convs = conversation_starts(args.conversations, args.user_len, args.vocab, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    replies: list[list[int]] = []
    per_turn = []
    start = time.perf_counter()
    for turn in range(args.turns):
        before = llm.stats()
        t0 = time.perf_counter()
        outs = llm.generate(convs, params)
        seconds = time.perf_counter() - t0
        after = llm.stats()
        prompt = sum(len(c) for c in convs)
        hit = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        per_turn.append((turn + 1, prompt, prompt - hit, seconds))
        replies.append([o.token_ids for o in outs])
        convs = [c + o.token_ids + torch.randint(2, args.vocab, (args.user_len,), generator=g).tolist()
                 for c, o in zip(convs, outs)]
    total = time.perf_counter() - start
    stats = llm.stats()
    return {"per_turn": per_turn, "seconds": total, "replies": replies, "queries": stats["prefix_cache_queries"],
            "hits": stats["prefix_cache_hits"], "snapshots_saved": stats["state_snapshots_saved"],
            "snapshots_restored": stats["state_snapshots_restored"], "block_size": stats["block_size"]}


def run_swarm(model, engine_args: dict, args, branch_points: bool = True) -> dict:
    llm = LLM(model=model, **engine_args)
    if llm.engine.cache.snapshots is not None:
        llm.engine.cache.branch_snapshots = branch_points
    g = torch.Generator().manual_seed(args.seed)
    system = torch.randint(2, args.vocab, (args.system_len,), generator=g).tolist()
    prompts = [system + t for t in torch.randint(2, args.vocab, (args.agents, args.task_len), generator=g).tolist()]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    stats = llm.stats()
    snaps = llm.engine.cache.snapshots
    return {"seconds": seconds, "replies": [o.token_ids for o in outs], "prompt": stats["prompt_tokens_total"],
            "computed": stats["prompt_tokens_total"] - stats["prefix_cache_hits"],
            "cached": [o.num_cached_tokens for o in outs], "block_size": stats["block_size"],
            "branch_saved": snaps.num_branch_saved if snaps is not None else 0,
            "restored": stats["state_snapshots_restored"]}


def swarm(model, engine_args: dict, args) -> int:
    runs = {
        "caching off": run_swarm(model, dict(engine_args, enable_prefix_caching=False), args),
        "on, no branch points": run_swarm(model, dict(engine_args), args, branch_points=False),
        "on, branch points": run_swarm(model, dict(engine_args), args),
    }
    replies = [r["replies"] for r in runs.values()]
    if any(r != replies[0] for r in replies):
        raise SystemExit("the runs generated different tokens")
    base = runs["caching off"]
    print(f"{args.agents} requests = one {args.system_len}-token shared prefix + a {args.task_len}-token task, "
          f"{args.output_len} reply tokens each, one generate call; hidden {args.hidden}, block size "
          f"{base['block_size']}, torch {torch.__version__}, {args.threads} thread(s); identical tokens in all runs")
    print("| run | prompt tokens | computed | requests that hit (at token) | branch snapshots | time | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        hit = [c for c in r["cached"] if c]
        at = f" (at {sorted(set(hit))[0]})" if len(set(hit)) == 1 else ""
        print(f"| {name} | {r['prompt']} | {r['computed']} | {len(hit)}{at} | {r['branch_saved']} | "
              f"{r['seconds']:.2f} s | {base['seconds'] / r['seconds']:.2f}x |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["chat", "swarm"], default="chat")
    p.add_argument("--agents", type=int, default=32, help="swarm: requests sharing the system prompt")
    p.add_argument("--system-len", type=int, default=500, help="swarm: shared prefix tokens")
    p.add_argument("--task-len", type=int, default=32, help="swarm: distinct tokens per request")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-len", type=int, default=48, help="new tokens per turn (also the first prompt's length)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    add_engine_cli_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.workload == "swarm":
        max_len = args.system_len + args.task_len + args.output_len + 64
    else:
        max_len = args.turns * (args.user_len + args.output_len) + 64
    model = small_kimi_linear(args.hidden, args.vocab, max_len)
    engine_args = engine_args_from_cli(args)
    engine_args.pop("enable_prefix_caching", None)
    engine_args.setdefault("device", "cpu")
    if args.workload == "swarm":
        return swarm(model, engine_args, args)

    on = run(model, dict(engine_args), args)
    off = run(model, dict(engine_args, enable_prefix_caching=False), args)
    if on["replies"] != off["replies"]:
        raise SystemExit("the runs with and without prefix caching generated different tokens")

    print(f"{args.conversations} conversations x {args.turns} turns (+{args.user_len} user tokens, "
          f"{args.output_len} reply tokens per turn), hidden {args.hidden}, block size {on['block_size']}, "
          f"torch {torch.__version__}, {args.threads} thread(s); identical tokens in both runs")
    print("| turn | prompt tokens | computed, caching on | computed, caching off | time on | time off |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (turn, prompt, comp_on, t_on), (_, _, comp_off, t_off) in zip(on["per_turn"], off["per_turn"]):
        print(f"| {turn} | {prompt} | {comp_on} | {comp_off} | {t_on:.2f} s | {t_off:.2f} s |")
    prompt_total = sum(row[1] for row in on["per_turn"])
    computed_on = sum(row[2] for row in on["per_turn"])
    computed_off = sum(row[2] for row in off["per_turn"])
    print(f"| all | {prompt_total} | {computed_on} | {computed_off} | {on['seconds']:.2f} s | {off['seconds']:.2f} s |")
    print(f"hit rate {on['hits'] / max(on['queries'], 1):.1%} of prompt tokens; snapshots saved "
          f"{on['snapshots_saved']}, restored {on['snapshots_restored']}; speed-up {off['seconds'] / on['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
