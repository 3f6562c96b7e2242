"""Multi-turn chat on a hybrid (Kimi Linear: KDA + MLA) model in the engine, with and without prefix
caching: how many prompt tokens each turn recomputes, and the time it takes.

    python bench/hybrid_prefix.py                       # 8 conversations x 6 turns, CPU, one thread
    python bench/hybrid_prefix.py --conversations 8 --turns 6 --user-len 48 --output-len 32 --threads 1

Each conversation starts from its own random prompt; every turn appends the reply and --user-len new
random tokens, as a chat client resending the whole conversation does. All conversations' turn t are
submitted together (one ``generate`` call), greedy, exactly --output-len tokens each. The same
conversations run twice on one random-weight model: prefix caching on (recurrent-state snapshots at
block boundaries; see docs/serving-engine.md) and off (--no-prefix-caching). Both runs must produce
the same tokens. Extra engine flags (--block-size, --state-snapshots, ...) apply to both runs.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    max_len = args.turns * (args.user_len + args.output_len) + 64
    model = small_kimi_linear(args.hidden, args.vocab, max_len)
    engine_args = engine_args_from_cli(args)
    engine_args.pop("enable_prefix_caching", None)
    engine_args.setdefault("device", "cpu")

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
