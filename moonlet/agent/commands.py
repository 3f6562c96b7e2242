"""Custom slash commands: prompt templates kept in files, run as ``/NAME ARGS``.

A project keeps them in ``.moonlet/commands/*.md`` under the work directory, a user in
``$MOONLET_HOME/agent/commands/*.md`` (a project file with the same name wins); the file name is the
command's name. The file is the prompt, with an optional front-matter block giving a one-line
``description`` for ``/help``::

    ---
    description: review a file for bugs
    ---
    Review $1 for bugs. Focus on: $ARGUMENTS

``$ARGUMENTS`` becomes everything after the command, ``$1`` .. ``$9`` its whitespace-separated words
(missing ones become empty). ``/NAME ...`` works in interactive mode and as the TASK of
``moonlet agent run``; the expanded text is what the session records as the user's prompt. Built-in
commands (``/help``, ``/compact``, ...) cannot be overridden.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

BUILTINS = {"help", "exit", "quit", "compact", "todo", "pin", "usage"}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Command:
    name: str
    template: str
    description: str = ""
    source: str = ""

    def expand(self, arguments: str) -> str:
        words = arguments.split()

        def positional(m: re.Match) -> str:
            i = int(m.group(1)) - 1
            return words[i] if i < len(words) else ""

        text = self.template.replace("$ARGUMENTS", arguments.strip())
        return re.sub(r"\$([1-9])", positional, text)


def command_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Where commands are read from, lowest precedence first."""
    home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
    return [Path(home) / "agent" / "commands", Path(workdir) / ".moonlet" / "commands"]


def parse_command_file(path: Path) -> Command:
    """One command; ValueError naming the file for a bad name, front matter or an empty prompt."""
    name = path.stem
    if not NAME.match(name) or name in BUILTINS:
        raise ValueError(f"command file {path}: {name!r} cannot be a command name (letters, digits, '-', '_'; not "
                         f"one of the built-ins {', '.join(sorted(BUILTINS))})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"command file {path}: cannot be read ({e})") from None
    description = ""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        try:
            end = 1 + [line.strip() for line in lines[1:]].index("---")
        except ValueError:
            raise ValueError(f"command file {path}: the front matter opened by '---' is never closed") from None
        for n, line in enumerate(lines[1:end], 2):
            key, sep, value = line.partition(":")
            if not line.strip():
                continue
            if not sep or key.strip() != "description":
                raise ValueError(f"command file {path}:{n}: the front matter takes 'description: ...' only")
            description = value.strip().strip("'\"")
        text = "\n".join(lines[end + 1:])
    if not text.strip():
        raise ValueError(f"command file {path}: the prompt template is empty")
    return Command(name, text.strip(), description, str(path))


def load_commands(workdir: str | os.PathLike) -> dict[str, Command]:
    commands: dict[str, Command] = {}
    for d in command_dirs(workdir):
        if d.is_dir():
            for path in sorted(d.glob("*.md")):
                c = parse_command_file(path)
                commands[c.name] = c
    return commands


def expand_prompt(line: str, commands: dict[str, Command]) -> str | None:
    """The prompt for ``line`` when it invokes a custom command (``/NAME ...``), else None."""
    if not line.startswith("/"):
        return None
    head, _, rest = line[1:].partition(" ")
    command = commands.get(head)
    return None if command is None else command.expand(rest)
