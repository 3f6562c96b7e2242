"""The ``moonlet`` command. Each subcommand lives in the module that owns its feature; this file only
collects them. A feature module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed args and returning an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order `moonlet --help` lists them.
COMMAND_MODULES = [
    "moonlet.commands.params",
    "moonlet.commands.generate",
    "moonlet.train.cli",
    "moonlet.agent.cli",
    "moonlet.commands.serve",
    "moonlet.commands.batch",
    "moonlet.commands.chat",
    "moonlet.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonlet",
        description="moonlet: the Kimi K2 model family — model, training, serving and agents.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"moonlet {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
