"""The prefix cache's disk tier: time to first token for a long shared prompt, cold vs disk-warm after a
restart.

    python bench/disk_cache.py --threads 1                      # moonlet-tiny's shape, a 4,096-token prompt
    python bench/disk_cache.py --threads 1 --hidden 512 --layers 8 --prompt-len 8192
    python bench/disk_cache.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8

One random-weight model (moonlet-tiny's architecture, resizable with --hidden/--layers). Each round:

- *no disk tier*: a fresh engine computes the prompt (the baseline);
- *cold*: a fresh engine with an empty ``--disk-cache-dir`` computes it and writes its blocks in the
  background (write-through); closing it waits for the writes (timed separately);
- *disk-warm after restart*: another fresh engine over the same directory — an empty device pool, as
  after a restart — reads the prompt's blocks from disk and computes only the last token;
- *device-warm*: the same prompt again in that engine (blocks on the device: the lower bound).

Time to first token = the wall time of ``generate`` with ``max_tokens=1``. Before the disk-warm run the
block files are dropped from the page cache (``posix_fadvise(DONTNEED)``, per file; --keep-page-cache
to skip), so the reads come from the drive unless the filesystem keeps them in memory anyway (tmpfs).
The first token and its log-probabilities must be the same in every run. Medians over --rounds rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from moonlet.config import ModelConfig
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli
from moonlet.testing import random_model
from moonlet.train.recipes.tiny import model_config


def build_model(args) -> torch.nn.Module:
    cfg = ModelConfig.from_dict(model_config()).replace(max_position_embeddings=max(8192, args.prompt_len + 64),
                                                        vocab_size=args.vocab)
    if args.hidden:
        h = args.hidden
        cfg = cfg.replace(hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=3 * h // 2,
                          kv_lora_rank=h // 4, q_lora_rank=h // 2)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    model = random_model(cfg, seed=0).to(args.device)
    return model.cast(getattr(torch, args.dtype)) if args.dtype else model


def timed_generate(llm: LLM, prompt: list[int], device: str):
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=5)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def drop_page_cache(directory: str) -> int:
    """Ask the kernel to drop the block files' cached pages; returns the files touched."""
    n = 0
    for dirpath, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".kv"):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                n += 1
    return n


def one_round(model, engine_args: dict, prompt: list[int], args, root: str) -> dict:
    directory = tempfile.mkdtemp(prefix="moonlet-disk-bench-", dir=root)
    try:
        with LLM(model=model, **engine_args) as plain:
            t_plain, ref = timed_generate(plain, prompt, args.device)
        with LLM(model=model, **engine_args, disk_cache_dir=directory) as cold:
            t_cold, out_cold = timed_generate(cold, prompt, args.device)
            start = time.perf_counter()
            cold.engine.disk.flush()
            t_flush = time.perf_counter() - start
            written = cold.stats()
        files = drop_page_cache(directory) if not args.keep_page_cache else 0
        with LLM(model=model, **engine_args, disk_cache_dir=directory) as warm:
            t_warm, out_warm = timed_generate(warm, prompt, args.device)
            t_device, out_device = timed_generate(warm, prompt, args.device)
            stats = warm.stats()
        outs = [ref, out_cold, out_warm, out_device]
        same = all(o.token_ids == ref.token_ids for o in outs) and all(
            abs(o.logprobs[0][t] - ref.logprobs[0][t]) < 1e-3 for o in outs for t in ref.logprobs[0])
        return {"plain": t_plain, "cold": t_cold, "flush": t_flush, "warm": t_warm, "device": t_device,
                "warm_hit": out_warm.num_cached_tokens, "device_hit": out_device.num_cached_tokens,
                "disk_hits": stats["disk_cache_hits"], "bytes_read": stats["disk_cache_bytes_read"],
                "blocks_written": written["disk_cache_blocks_written"],
                "bytes_written": written["disk_cache_bytes_written"], "dropped": written["disk_cache_writes_dropped"],
                "files_dropped_from_page_cache": files, "same": same}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=4096, help="tokens of the shared prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=None, help="resize the model (default moonlet-tiny's 256)")
    p.add_argument("--layers", type=int, default=None, help="layers (default moonlet-tiny's 4)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--root", default=None, help="where the temporary cache directories go (default: the system's "
                                                "temporary directory)")
    p.add_argument("--keep-page-cache", action="store_true", help="do not drop the block files from the page cache")
    p.add_argument("--seed", type=int, default=0)
    add_engine_cli_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    engine_args = engine_args_from_cli(args)
    for key in ("device", "dtype", "disk_cache_dir"):
        engine_args.pop(key, None)
    bs = engine_args.get("block_size") or (64 if args.device == "cuda" else 16)
    engine_args.setdefault("num_blocks", -(-(args.prompt_len + 16) // bs) + 4)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(2, args.vocab, (args.prompt_len,), generator=g).tolist()
    root = args.root or tempfile.gettempdir()
    one_round(model, {**engine_args}, prompt[:256], args, root)  # warm-up
    rounds = [one_round(model, engine_args, prompt, args, root) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in ("plain", "cold", "flush", "warm", "device")}
    r0 = rounds[0]
    print(f"device {args.device} | dtype {model.dtype} | threads {torch.get_num_threads()} | hidden "
          f"{model.config.hidden_size} x {model.config.num_hidden_layers} layers | block size {bs} | prompt "
          f"{args.prompt_len} tokens | {r0['blocks_written']} blocks, {r0['bytes_written'] / 2**20:.1f} MiB on disk "
          f"| page cache dropped: {not args.keep_page_cache} | same first token and logprobs in every run: "
          f"{all(r['same'] for r in rounds)} | medians of {args.rounds} rounds\n")
    print("| run | cached tokens | time to first token | vs no disk tier |")
    print("|---|---:|---:|---:|")
    rows = [("no disk tier", 0, med["plain"]), ("cold, writing to the disk tier", 0, med["cold"]),
            ("disk-warm after restart", r0["warm_hit"], med["warm"]),
            ("device-warm (same engine again)", r0["device_hit"], med["device"])]
    for name, hit, t in rows:
        print(f"| {name} | {hit:,} | {t * 1000:.1f} ms | {med['plain'] / t:.2f}x |")
    read_mib = r0["bytes_read"] / 2**20
    print(f"\nwrites still queued when the cold request returned, waited for at close: {med['flush'] * 1000:.1f} ms "
          f"(median); disk-warm read {read_mib:.1f} MiB ({r0['disk_hits']:,} tokens), "
          f"{read_mib / med['warm']:.0f} MiB/s including the rest of the step; writes dropped: "
          f"{sum(r['dropped'] for r in rounds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
