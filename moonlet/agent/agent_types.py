"""Sub-agent types: named sub-agents with their own system prompt and tool set, defined in files.

A project keeps them in ``.moonlet/agents/*.md`` under the work directory; a user in
``$MOONLET_HOME/agent/agents/*.md`` (a project file with the same name wins). Each file is a
Markdown document with a front-matter block::

    ---
    name: reviewer
    description: Reviews a change for bugs and missing tests; read-only.
    tools: read_file, grep, glob
    max_steps: 40
    ---
    You are a careful code reviewer. ...

``name`` (letters, digits, ``-``, ``_``) and ``description`` are required; ``tools`` (comma-separated,
or a ``[a, b]`` list) limits the sub-agent to those tools, by name, out of what the parent agent has
(default: the same tools as any sub-agent); ``max_steps`` caps its steps. The body is the sub-agent's
system prompt (the project instructions and hook context are added to it as for any agent). The
``task`` and ``swarm`` tools take ``agent: NAME`` to start one; their descriptions list the types.
A malformed file is an error that names it, when the agent starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEYS = {"name", "description", "tools", "max_steps", "model"}


@dataclass(frozen=True)
class AgentType:
    name: str
    description: str
    prompt: str
    tools: tuple[str, ...] | None = None  # None: the default sub-agent tools
    max_steps: int | None = None
    source: str = ""


def _parse_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def parse_agent_file(path: Path) -> AgentType:
    """One definition; ValueError naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"sub-agent file {path}: cannot be read ({e})") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in [line.strip() for line in lines[1:]]:
        raise ValueError(f"sub-agent file {path}: must start with a front-matter block between '---' lines "
                         "(name, description, optional tools and max_steps), then the system prompt")
    end = 1 + [line.strip() for line in lines[1:]].index("---")
    fields: dict[str, str] = {}
    for n, line in enumerate(lines[1:end], 2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(f"sub-agent file {path}:{n}: expected 'key: value' with key one of {', '.join(sorted(KEYS))}; "
                             f"got {line.strip()!r}")
        fields[key] = value.strip().strip("'\"")
    name, description = fields.get("name", ""), fields.get("description", "")
    if not NAME.match(name):
        raise ValueError(f"sub-agent file {path}: 'name' must be 1-64 letters, digits, '-' or '_'; got {name!r}")
    if not description:
        raise ValueError(f"sub-agent file {path}: 'description' is required (it tells the model when to use it)")
    prompt = "\n".join(lines[end + 1:]).strip()
    if not prompt:
        raise ValueError(f"sub-agent file {path}: the system prompt (the text after the front matter) is empty")
    tools = tuple(_parse_list(fields["tools"])) if fields.get("tools") else None
    max_steps = None
    if fields.get("max_steps"):
        try:
            max_steps = int(fields["max_steps"])
        except ValueError:
            max_steps = 0
        if max_steps < 1:
            raise ValueError(f"sub-agent file {path}: max_steps must be a positive integer; got {fields['max_steps']!r}")
    return AgentType(name, description, prompt, tools, max_steps, str(path))


def agent_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Where definitions are read from, lowest precedence first."""
    home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
    return [Path(home) / "agent" / "agents", Path(workdir) / ".moonlet" / "agents"]


def load_agent_types(workdir: str | os.PathLike, known_tools: list[str] | None = None) -> dict[str, AgentType]:
    """The sub-agent types for an agent working in ``workdir``; with ``known_tools``, a type naming a
    tool outside them is an error listing them."""
    types: dict[str, AgentType] = {}
    for d in agent_dirs(workdir):
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.md")):
            t = parse_agent_file(path)
            types[t.name] = t
    if known_tools is not None:
        for t in types.values():
            unknown = [name for name in t.tools or () if name not in known_tools]
            if unknown:
                raise ValueError(f"sub-agent file {t.source}: unknown tool(s) {', '.join(unknown)}; the tools here are "
                                 f"{', '.join(known_tools)}")
    return types
