"""`moonlet train` (a recipe or a config file, resumable, torchrun-ready), `moonlet eval-tools`
(the held-out tool-use evaluation of a checkpoint) and `moonlet data chat` (conversations -> token
shards for fine-tuning)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model with MuonClip (a named recipe or a config file)",
                       description="Train with MuonClip. `--recipe tiny` builds its tokenizer and data, trains and "
                                   "exports moonlet-tiny. For data parallelism launch with "
                                   "`torchrun --nproc-per-node N -m moonlet train ...`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="recipe name (tiny, tiny-draft)")
    src.add_argument("--config", help="training config file (JSON or TOML with TrainConfig fields)")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, loss.png); default from the "
                                 "recipe/config")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint directory, or (no value) the latest one under --out")
    p.add_argument("--max-steps", type=int, help="override the number of optimizer steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a config field, e.g. --set lr=0.001 --set optimizer='\"adamw\"'")
    p.add_argument("--shard-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: partition the optimizer state over the ranks (ZeRO-1 Distributed Muon; "
                        "the default) or replicate it on every rank (--no-shard-optimizer); same result either way")
    p.add_argument("--phase", help="recipe runs: run only this phase (e.g. tasks; earlier phases must be done)")
    p.add_argument("--export", help="recipe runs: where to write the final model (default OUT/final)")
    p.add_argument("--eval-tools", type=int, default=0, metavar="N",
                   help="recipe runs: afterwards run the held-out tool-use evaluation on N tasks")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval-tools", help="held-out tool-use evaluation (calculator / read_file) of a checkpoint",
                       description="Generate greedily on held-out synthetic tasks and report how often the model "
                                   "makes the right tool calls with the right arguments and then states the right "
                                   "answer. Default model: the bundled moonlet-tiny.")
    e.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled moonlet-tiny)")
    e.add_argument("--tasks", type=int, default=200, help="number of held-out tasks (default 200)")
    e.add_argument("--seed", type=int, default=None, help="task seed (default: the fixed evaluation seed)")
    e.add_argument("--json", dest="json_out", help="also write the full report (with failures) to this file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--show-failures", type=int, default=5)
    e.add_argument("--unquoted-paths", action="store_true",
                   help="write file paths in the requests without quotes (moonlet-tiny's last phase quoted them)")
    e.add_argument("--wide-operands", type=float, default=0.0, metavar="P",
                   help="fraction of expressions with operands of up to four digits (default 0: one or two)")
    e.set_defaults(func=run_eval)

    lo = sub.add_parser("lora", help="LoRA adapters: merge one into a full checkpoint",
                        description="LoRA adapters in PEFT's format (what `moonlet train` writes with a `lora` "
                                    "config, or PEFT's save_pretrained).")
    losub = lo.add_subparsers(dest="lora_command", metavar="ACTION")
    m = losub.add_parser("merge", help="merge an adapter into its base model and write a full checkpoint",
                         description="Load BASE (a checkpoint directory, or 'moonlet-tiny'), merge ADAPTER into its "
                                     "weights (W + alpha/r * B A), and write the result with its tokenizer to OUT, "
                                     "ready for `moonlet serve --model OUT`.")
    m.add_argument("--base", required=True, help="the base model's directory (or 'moonlet-tiny')")
    m.add_argument("--adapter", required=True, help="the adapter directory (adapter_config.json + "
                                                    "adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="where to write the merged checkpoint (must not exist)")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32)")
    m.set_defaults(func=run_lora_merge)
    lo.set_defaults(func=lambda args: (lo.print_help(), 2)[1])

    d = sub.add_parser("data", help="build training data (chat conversations -> token shards)",
                       description="Build token datasets for `moonlet train`.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    c = dsub.add_parser("chat", help="JSONL conversations (OpenAI or Anthropic shape) -> token shards, loss on the "
                                     "assistant's tokens",
                        description="Convert JSONL conversations (one per line; OpenAI Chat Completions or Anthropic "
                                    "Messages shape, detected per line) into token shards rendered with a "
                                    "checkpoint's chat template, with the loss mask on the tokens the assistant "
                                    "produced. Writes OUT/train (and OUT/eval with --eval-fraction) and OUT/report.json.")
    c.add_argument("inputs", nargs="+", metavar="IN.jsonl", help="conversation files")
    c.add_argument("--out", required=True, help="dataset directory to write")
    c.add_argument("--tokenizer", help="checkpoint (or tokenizer) directory whose tokenizer and chat template to use "
                                       "(default: the bundled moonlet-tiny)")
    c.add_argument("--eval-fraction", type=float, default=0.0, metavar="F",
                   help="share of the conversations held out as OUT/eval (default 0)")
    c.add_argument("--seed", type=int, default=0, help="seed of the eval split")
    c.add_argument("--max-tokens", type=int, metavar="N",
                   help="longest example kept (default: the tokenizer's model_max_length); for training, at most "
                        "seq_len + 1 keeps every example in one row")
    c.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="what to do with an example over --max-tokens (default drop)")
    c.add_argument("--skip-bad", action="store_true", help="skip lines that cannot be converted (counted and "
                                                           "reported) instead of stopping at the first")
    c.add_argument("--format", choices=("auto", "openai", "anthropic"), default="auto",
                   help="shape of the lines (default: detected per line)")
    c.add_argument("--template-arg", action="append", default=[], metavar="KEY=JSON",
                   help="a chat-template switch, e.g. --template-arg thinking=false")
    c.set_defaults(func=run_data_chat)
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def run_train(args) -> int:
    import os

    from .trainer import TrainConfig, Trainer, resolve_checkpoint

    overrides = _overrides(args.set)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.shard_optimizer is not None:
        overrides["shard_optimizer"] = args.shard_optimizer
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    recipe = None
    if args.recipe:
        from .recipes import get_recipe

        recipe = get_recipe(args.recipe)
        plan = recipe.phases(args.out or f"runs/{args.recipe}", **overrides)
        if args.phase:
            plan = [p for p in plan if p[0] == args.phase]
            if not plan:
                names = [p[0] for p in recipe.phases()]
                raise ValueError(f"recipe {args.recipe!r} has no phase {args.phase!r}; phases: {', '.join(names)}")
        if int(os.environ.get("RANK", "0")) == 0:
            recipe.prepare(plan[0][1], log=log)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            from .trainer import _init_distributed

            _init_distributed()
            dist.barrier()  # the other ranks wait for rank 0's data
        for _, cfg in plan:
            recipe.match_tokenizer(cfg)
    else:
        data = TrainConfig.from_file(args.config).to_dict()
        data.update(overrides)
        if args.out:
            data["out_dir"] = args.out
        plan = [("train", TrainConfig.from_dict(data))]

    trainer = None
    for name, cfg in plan:
        resume = None
        if args.resume and args.resume != "auto":
            resume = resolve_checkpoint(args.resume)
        elif args.resume:
            try:
                resume = resolve_checkpoint(cfg.out_dir)
            except FileNotFoundError:
                resume = None  # this phase has not started yet
        trainer = Trainer(cfg, resume=resume)
        params = trainer.model_config.param_counts()
        log(f"{name}: {params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active); "
            f"optimizer {cfg.optimizer}; {cfg.max_steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens"
            f"{' x' + str(cfg.grad_accum) if cfg.grad_accum > 1 else ''}; world size {trainer.world}"
            f"{' (optimizer state sharded)' if trainer.sharded else ''}"
            f"{'; resuming at step ' + str(trainer.step) if resume else ''}")
        trainer.train()
        trainer.save_checkpoint(f"{cfg.out_dir}/checkpoints/step-{trainer.step:06d}")  # every rank: it syncs
        if trainer.rank == 0:
            log(f"metrics: {cfg.out_dir}/metrics.jsonl, loss curve: {cfg.out_dir}/loss.png")
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if trainer.rank == 0 and recipe is not None:
        dest = recipe.finish(plan[-1][1], trainer, args.export, log=log)
        if args.eval_tools:
            return _print_eval(str(dest), args.eval_tools, None, None, "cpu", 5)
    return 0


def run_eval(args) -> int:
    from ..commands.generate import resolve_model_path

    return _print_eval(resolve_model_path(args.model), args.tasks, args.seed, args.json_out, args.device,
                       args.show_failures, quote_paths=not args.unquoted_paths, wide_operands=args.wide_operands)


def _print_eval(path: str, tasks: int, seed, json_out, device: str, show: int, quote_paths: bool = True,
                wide_operands: float = 0.0) -> int:
    import torch

    from ..tokenizer import Tokenizer
    from ..weights import load_model
    from .evaluate import EVAL_SEED, evaluate_tool_use

    torch.manual_seed(0)
    model = load_model(path, device=device, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(path)
    report = evaluate_tool_use(model, tok, tasks, EVAL_SEED if seed is None else seed, progress=True,
                               quote_paths=quote_paths, wide_operands=wide_operands)
    print(f"model: {path}")
    print(f"held-out tool-use tasks: {report['num_tasks']}  ({report['seconds']:.0f}s)")
    print(f"  pass (right calls, right arguments, right final answer): {report['pass_rate']:.1%}")
    print(f"  well-formed tool calls: {report['well_formed_rate']:.1%}   right arguments: {report['args_rate']:.1%}")
    for kind, rate in report["by_kind"].items():
        print(f"  {kind:<11} {rate:.1%}")
    for f in report["failures"][:show]:
        print(f"  FAIL [{f['kind']}] {f['user']!r}: {f['failure']}")
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


def run_data_chat(args) -> int:
    from ..commands.generate import resolve_model_path
    from ..tokenizer import Tokenizer
    from .chat_data import ChatDataError, build_chat_dataset

    path = resolve_model_path(args.tokenizer)
    tok = Tokenizer.from_pretrained(path)
    max_tokens = args.max_tokens if args.max_tokens is not None else tok.model_max_length
    try:
        report = build_chat_dataset(args.inputs, tok, args.out, eval_fraction=args.eval_fraction, seed=args.seed,
                                    max_tokens=max_tokens, overlong=args.overlong, skip_bad=args.skip_bad,
                                    fmt=args.format, template_kwargs=_overrides(args.template_arg))
    except ChatDataError as e:
        hint = "" if args.skip_bad else " (--skip-bad skips bad lines)"
        raise ChatDataError(f"{e}{hint}") from None
    print(f"tokenizer: {path} (max tokens per example: {max_tokens or 'unlimited'})")
    print(report.summary())
    for err in report.errors[:5]:
        print(f"  skipped {err}")
    if report.skipped > 5:
        print(f"  ... {report.skipped - 5} more (all in {args.out}/report.json, up to {len(report.errors)})")
    return 0


def run_lora_merge(args) -> int:
    from pathlib import Path

    from .trainer import merge_lora_checkpoint

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {args.out!r} already exists; give a new directory (nothing is overwritten)")
    merge_lora_checkpoint(args.base, args.adapter, out, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0
