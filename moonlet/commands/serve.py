"""`moonlet serve`: the Anthropic Messages API and the OpenAI API over the engine, under uvicorn."""

from __future__ import annotations

import os

from ..engine.config import add_engine_cli_args, engine_args_from_cli


def resolve_model(path: str | None) -> str:
    """--model, else the bundled moonlet-tiny; a clear error when neither exists."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--model {path!r} is not a directory; give a checkpoint directory holding "
                                    f"config.json, safetensors shards and tiktoken.model")
        return path
    try:
        from ..assets import default_model_path

        return str(default_model_path())
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(f"no --model given: {e}. Pass --model PATH (a checkpoint directory)") from None


def engine_args(args, model_path: str | None) -> dict:
    """The engine keyword arguments from the CLI flags (``engine_args_from_cli``), where
    ``--speculative draft`` without ``--speculative-model`` means the bundled moonlet-tiny-draft when
    ``model_path`` is the bundled moonlet-tiny (``moonlet.assets.bundled_draft_for``; any other model
    is an error that asks for --speculative-model)."""
    kwargs = engine_args_from_cli(args)
    if kwargs.get("speculative") == "draft" and "speculative_model" not in kwargs:
        from ..assets import bundled_draft_for

        kwargs["speculative_model"] = bundled_draft_for(model_path)
    return kwargs


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over the Anthropic and OpenAI APIs",
                       description="Serve a checkpoint (default: the bundled moonlet-tiny) at /v1/messages "
                                   "(Anthropic), /v1/chat/completions and /v1/completions (OpenAI), /v1/models, "
                                   "/health and /metrics.")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOONLET_API_KEY"),
                   help="require this key (x-api-key or Authorization: Bearer); default $MOONLET_API_KEY, else none")
    p.add_argument("--served-model-name", default=None,
                   help="the model id /v1/models lists (default: the checkpoint directory's name)")
    p.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="generation requests in flight before answering 429 (default: no limit)")
    p.add_argument("--batch-dir", default=None,
                   help="where batches (/v1/messages/batches, /v1/batches) and uploaded files (/v1/files, in "
                        "DIR/files) are kept, so that they survive a restart "
                        "(default: $MOONLET_HOME/batches, ~/.moonlet/batches; 'none': in memory only)")
    p.add_argument("--batch-concurrency", type=int, default=8,
                   help="batch requests running at once, over all batches (default 8)")
    p.add_argument("--batch-retention-days", type=float, default=29.0,
                   help="days after its creation an ended batch keeps its requests and results; then they are "
                        "deleted and the batch is archived (default 29, as the Message Batches API)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="with --enable-lora / --lora-modules: add POST /v1/load_lora_adapter {lora_name, lora_path} "
                        "and /v1/unload_lora_adapter {lora_name} (vLLM's routes); adapter paths are read from the "
                        "server's disk, so only for trusted clients (default: off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_cli_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from ..engine import AsyncLLM
    from ..server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.allow_runtime_lora and not (args.enable_lora or args.lora_modules):
        raise SystemExit("moonlet serve: --allow-runtime-lora needs --enable-lora (or --lora-modules NAME=PATH)")
    path = resolve_model(args.model)
    engine = AsyncLLM(path, start=False, **engine_args(args, path))
    if args.batch_concurrency < 1:
        raise SystemExit(f"moonlet serve: --batch-concurrency {args.batch_concurrency} must be at least 1")
    if not args.batch_retention_days > 0:
        raise SystemExit(f"moonlet serve: --batch-retention-days {args.batch_retention_days} must be more than 0")
    batch_dir = args.batch_dir
    if batch_dir is None:
        home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
        batch_dir = os.path.join(home, "batches")
    elif batch_dir.lower() == "none":
        batch_dir = None
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     max_concurrent_requests=args.max_concurrent_requests, shutdown_engine_on_exit=True,
                     batch_dir=batch_dir, batch_concurrency=args.batch_concurrency,
                     batch_retention_days=args.batch_retention_days,
                     allow_runtime_lora=args.allow_runtime_lora)
    name = app.state.moonlet.served_model_name
    print(f"moonlet serve: {name} (context {engine.max_model_len} tokens) on http://{args.host}:{args.port} "
          f"— Anthropic: /v1/messages, OpenAI: /v1/chat/completions; auth {'on' if args.api_key else 'off'}",
          flush=True)
    for adapter, adapter_path in engine.list_loras().items():
        print(f"moonlet serve: LoRA adapter {adapter} ({adapter_path}) — select it with model={adapter!r}", flush=True)
    stats = engine.stats()
    print(f"moonlet serve: KV cache {stats['blocks_total']} blocks x {stats['block_size']} tokens in "
          f"{stats['kv_cache_dtype']} ({stats['kv_cache_bytes'] / 2**20:.1f} MiB)", flush=True)
    if stats.get("disk_cache_bytes_total"):
        print(f"moonlet serve: disk cache {engine.engine.disk.directory}: {stats['disk_cache_blocks_used']} blocks "
              f"({stats['disk_cache_bytes_used'] / 2**20:.1f} of {stats['disk_cache_bytes_total'] / 2**20:.1f} MiB)",
              flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
