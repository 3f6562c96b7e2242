"""`moonlet bench`: throughput and latency.

- ``moonlet bench offline``: N random prompts of a given length through ``moonlet.engine.LLM`` in
  one batch (optionally beside the one-request-at-a-time baseline), tokens/s as a table.
- ``moonlet bench online --url URL``: a load test against a running server: N streaming requests,
  at most ``--concurrency`` in flight, arriving as a Poisson process at ``--request-rate`` per second
  (default: all at once); time to first token, inter-token latency and end-to-end latency
  percentiles and tokens/s as a table. ``--api completions`` (default) sends random token-id
  prompts with ``ignore_eos`` so every request has exactly the asked lengths; ``--api messages``
  sends random words through the Anthropic Messages API (lengths then vary).
"""

from __future__ import annotations

import asyncio
import json
import math
import platform
import random
import time
from datetime import date

from ..engine.config import add_engine_cli_args
from .serve import engine_args as cli_engine_args, resolve_model

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumpy zebras near "
         "old stone bridges under bright autumn skies").split()


def register(sub) -> None:
    p = sub.add_parser("bench", help="offline throughput or an online load test, printed as a table",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)

    off = modes.add_parser("offline", help="engine throughput on N random prompts (moonlet.engine.LLM)")
    src = off.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    src.add_argument("--random", default=None, metavar="CONFIG",
                     help="random weights instead of a checkpoint: 'moonlet-tiny' (the bundled model's shape), "
                          "'tiny-k2' (the test config), a preset name or a config.json path")
    off.add_argument("--num-prompts", type=int, default=32)
    off.add_argument("--input-len", type=int, default=128)
    off.add_argument("--output-len", type=int, default=64)
    off.add_argument("--baseline", action="store_true",
                     help="also time one-request-at-a-time generation over a contiguous cache")
    off.add_argument("--seed", type=int, default=0)
    add_engine_cli_args(off)
    off.set_defaults(func=run_offline_cmd)

    on = modes.add_parser("online", help="load test against a running server")
    on.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    on.add_argument("--api", choices=["completions", "messages"], default="completions")
    on.add_argument("--api-key", default=None)
    on.add_argument("--model-name", default="moonlet", help="the model field sent with each request")
    on.add_argument("--num-prompts", type=int, default=64)
    on.add_argument("--input-len", type=int, default=128)
    on.add_argument("--output-len", type=int, default=64)
    on.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    on.add_argument("--request-rate", type=float, default=math.inf,
                    help="mean arrivals per second (Poisson); default inf: all at once")
    on.add_argument("--seed", type=int, default=0)
    on.set_defaults(func=run_online_cmd)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def device_line(device: str | None = None) -> str:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return f"device: {device} ({name}); torch {torch.__version__}; {date.today().isoformat()}"


# ---- offline --------------------------------------------------------------------------------------
def run_offline(model_path=None, random_config=None, num_prompts=32, input_len=128, output_len=64,
                baseline=False, seed=0, **engine_args) -> list[dict]:
    """Rows (dicts) for ``moonlet.engine.benchmark.format_table``: the engine, and the baseline if asked."""
    from ..engine import LLM
    from ..engine.benchmark import bench_engine, bench_sequential, random_prompts

    if random_config is not None:
        from ..config import ModelConfig
        from ..testing import random_model, tiny_k2_config

        if random_config == "tiny-k2":
            config = tiny_k2_config()
        elif random_config == "moonlet-tiny":
            from ..train.recipes.tiny import model_config

            config = ModelConfig.from_dict(model_config())
        else:
            config = ModelConfig.from_pretrained(random_config)
        llm = LLM(model=random_model(config, seed=seed), tokenizer=None, **engine_args)
    else:
        llm = LLM(resolve_model(model_path), **engine_args)
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(num_prompts, input_len, vocab, seed=seed)
    rows = [bench_engine(llm, prompts, output_len)]
    if baseline:
        rows.append(bench_sequential(llm.engine.model, prompts, output_len))
    return rows


def run_offline_cmd(args) -> int:
    from ..engine.benchmark import format_table

    kwargs = cli_engine_args(args, None if args.random else resolve_model(args.model))
    rows = run_offline(args.model, args.random, args.num_prompts, args.input_len, args.output_len, args.baseline,
                       args.seed, **kwargs)
    print(device_line(kwargs.get("device")))
    print(f"offline: {args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} tokens out "
          f"(greedy, ignore_eos)\n")
    print(format_table(rows))
    return 0


# ---- online ---------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


async def _one(client, api: str, url: str, body: dict) -> dict:
    """Send one streaming request; returns its timings and token counts (or an error)."""
    start = time.perf_counter()
    arrivals: list[float] = []
    prompt_tokens = output_tokens = 0
    path = "/v1/completions" if api == "completions" else "/v1/messages"
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data and api == "completions" or data.get("type") == "error":
                    return {"error": str(data.get("error"))}
                now = time.perf_counter()
                if api == "completions":
                    if data.get("choices") and data["choices"][0].get("text"):
                        arrivals.append(now)
                    if data.get("usage"):
                        prompt_tokens = data["usage"]["prompt_tokens"]
                        output_tokens = data["usage"]["completion_tokens"]
                else:
                    if data["type"] == "content_block_delta":
                        arrivals.append(now)
                    elif data["type"] == "message_start":
                        u = data["message"]["usage"]
                        prompt_tokens = u["input_tokens"] + u.get("cache_read_input_tokens", 0)
                    elif data["type"] == "message_delta":
                        output_tokens = data["usage"]["output_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not arrivals:
        arrivals = [end]
    itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "itl": itl, "e2e": end - start, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens}


async def run_online(url: str, api: str = "completions", num_prompts: int = 64, input_len: int = 128,
                     output_len: int = 64, concurrency: int = 16, request_rate: float = math.inf,
                     api_key: str | None = None, model_name: str = "moonlet", seed: int = 0) -> dict:
    """Run the load test; returns a summary dict (see ``format_online``)."""
    import httpx

    if num_prompts < 1 or concurrency < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, concurrency, input_len and output_len must be >= 1")
    rng = random.Random(seed)
    url = url.rstrip("/")
    bodies = []
    for _ in range(num_prompts):
        if api == "completions":
            # token ids below 256: byte-level tokens in any BPE vocabulary, never special tokens
            bodies.append({"model": model_name, "prompt": [rng.randrange(256) for _ in range(input_len)],
                           "max_tokens": output_len, "stream": True, "ignore_eos": True, "temperature": 0,
                           "stream_options": {"include_usage": True}})
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(input_len))
            bodies.append({"model": model_name, "max_tokens": output_len, "stream": True,
                           "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": text}]})
    headers = {"anthropic-version": "2023-06-01"}
    if api_key:
        headers["x-api-key"] = api_key
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None), limits=limits) as client:
        async def limited(body):
            async with gate:
                return await _one(client, api, url, body)

        tasks = []
        start = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    itls = [x for r in ok for x in r["itl"]]
    return {"requests": len(results), "completed": len(ok), "failed": len(errors), "errors": errors[:5],
            "duration_s": duration, "request_throughput": len(ok) / duration, "prompt_tokens": in_tokens,
            "output_tokens": out_tokens, "output_tok_s": out_tokens / duration,
            "total_tok_s": (in_tokens + out_tokens) / duration,
            "ttft_ms": [1000 * r["ttft"] for r in ok], "itl_ms": [1000 * x for x in itls],
            "e2e_ms": [1000 * r["e2e"] for r in ok]}


def format_online(s: dict) -> str:
    """A Markdown table of the summary."""
    rows = [("requests completed / failed", f"{s['completed']} / {s['failed']}"),
            ("duration (s)", f"{s['duration_s']:.2f}"),
            ("requests/s", f"{s['request_throughput']:.2f}"),
            ("prompt tokens / output tokens", f"{s['prompt_tokens']} / {s['output_tokens']}"),
            ("output tokens/s", f"{s['output_tok_s']:.1f}"),
            ("total tokens/s", f"{s['total_tok_s']:.1f}")]
    for key, title in (("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "E2E latency (ms)")):
        values = s[key]
        mean = sum(values) / len(values) if values else math.nan
        rows.append((f"{title} mean / p50 / p90 / p99",
                     " / ".join(f"{x:.1f}" for x in (mean, percentile(values, 50), percentile(values, 90),
                                                     percentile(values, 99)))))
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def run_online_cmd(args) -> int:
    summary = asyncio.run(run_online(args.url, args.api, args.num_prompts, args.input_len, args.output_len,
                                     args.concurrency, args.request_rate, args.api_key, args.model_name, args.seed))
    print(f"online: {args.url} ({args.api}); {args.num_prompts} requests, {args.input_len} tokens in, "
          f"{args.output_len} out, concurrency {args.concurrency}, request rate {args.request_rate}/s; "
          f"{date.today().isoformat()}\n")
    print(format_online(summary))
    for error in summary["errors"]:
        print(f"error: {error}")
    return 0 if summary["failed"] == 0 else 1
