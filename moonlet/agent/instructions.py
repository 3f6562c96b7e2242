"""Project instructions: ``AGENTS.md`` files that tell the agent how a project works.

A repository keeps its conventions (how to build, run the tests, style rules, what not to touch) in
an ``AGENTS.md`` at its root and, for parts with rules of their own, in subdirectories. The agent reads,
in this order (general first, most specific last, so later text can refine earlier text):

1. the user's own file, ``$MOONLET_HOME/agent/AGENTS.md`` (``~/.moonlet`` without MOONLET_HOME);
2. ``AGENTS.md`` in every directory from the project root down to the work directory, where the
   project root is the nearest ancestor of the work directory holding ``.git`` (without one, only
   the work directory itself is read).

The texts go into the system prompt under a heading that names each file, for the top agent and
its sub-agents alike. They are read when a session starts or resumes, so edits take effect on the
next resume. A file larger than ``MAX_FILE_CHARS`` is cut (with a note saying so); unreadable or
non-UTF-8 files are reported in the text instead of stopping the agent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "AGENTS.md"
MAX_FILE_CHARS = 20_000


@dataclass
class Instructions:
    """The instruction files found, in order: (path as shown to the model, text)."""

    files: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.files)

    def render(self) -> str:
        """The system prompt section (empty when there is no file)."""
        if not self.files:
            return ""
        parts = ["# Project instructions",
                 "These files hold instructions for working here. Follow them; when two disagree, the later "
                 "(more specific) one wins. Direct requests from the user take precedence."]
        for path, text in self.files:
            parts.append(f"## {path}\n{text.strip()}")
        return "\n\n".join(parts)


def user_instructions_path() -> Path:
    home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
    return Path(home) / "agent" / FILE_NAME


def project_dirs(workdir: str | os.PathLike) -> list[Path]:
    """The directories whose AGENTS.md apply to ``workdir``: from the project root (nearest ancestor
    with .git) down to ``workdir``; only ``workdir`` outside a repository."""
    work = Path(workdir).resolve()
    chain = [work, *work.parents]
    for i, d in enumerate(chain):
        if (d / ".git").exists():
            return list(reversed(chain[:i + 1]))
    return [work]


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"(this file is not UTF-8 text and was not read: {path})"
    except OSError as e:
        return f"(this file could not be read: {e.strerror or e})"
    if len(text) > MAX_FILE_CHARS:
        text = (text[:MAX_FILE_CHARS] + f"\n\n[cut: the file has {len(text):,} characters; only the first "
                f"{MAX_FILE_CHARS:,} are shown. Read the rest with read_file if needed.]")
    return text


def load_instructions(workdir: str | os.PathLike) -> Instructions:
    """The instruction files for an agent working in ``workdir`` (see the module docstring)."""
    files: list[tuple[str, str]] = []
    seen: set[Path] = set()
    user = user_instructions_path()
    if user.is_file():
        files.append((f"{user} (your own instructions for every project)", _read(user)))
        seen.add(user.resolve())
    work = Path(workdir).resolve()
    for d in project_dirs(work):
        path = d / FILE_NAME
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            shown = path.relative_to(work) if d == work else Path(os.path.relpath(path, work))
            files.append((str(shown), _read(path)))
    return Instructions(files)
