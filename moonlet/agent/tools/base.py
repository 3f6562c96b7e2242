"""What a tool is: a name, a description and a JSON-Schema for its input (the Anthropic tool shape),
an async `run`, and two flags the loop needs: `read_only` (auto-approved under the `reads` policy)
and `parallel_safe` (may run at the same time as its neighbours in one reply); and `confined(agent)`:
whether a call can change files only inside the agent's work directory (and temp) and reach no
network (auto-approved under the `edits` policy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..loop import Agent
    from .workspace import Workspace


class ToolError(Exception):
    """Raised by a tool for a failure the model should read (sent back as an error tool_result)."""


@dataclass
class ToolResult:
    content: str | list[dict]
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(b.get("text", "") for b in self.content if b.get("type") == "text")


@dataclass
class ToolContext:
    workspace: "Workspace"
    agent: "Agent | None" = None
    tool_use_id: str = ""
    vision: bool | None = None    # None: the agent's config says (False without an agent)

    @property
    def can_see(self) -> bool:
        """Whether images may go to the model (else tools describe them in text)."""
        if self.vision is not None:
            return self.vision
        return bool(self.agent is not None and getattr(self.agent.config, "vision", False))


class Tool:
    name: str = ""
    description: str = ""
    input_schema: dict = {"type": "object", "properties": {}}
    read_only: bool = False
    parallel_safe: bool | None = None  # None: same as read_only

    @property
    def concurrent(self) -> bool:
        return self.read_only if self.parallel_safe is None else self.parallel_safe

    def confined(self, agent=None) -> bool:
        """Whether this tool can only change files in the work directory (or the temp directory) and
        cannot reach the network: the file-editing tools, and the shell when its sandbox says so."""
        return False

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}

    def summary(self, args: dict) -> str:
        """One line naming the call, for approval prompts and the terminal."""
        first = next(iter(args.values()), "") if args else ""
        text = first if isinstance(first, str) else repr(first)
        text = text.replace("\n", " ")
        return f"{self.name}({text[:100]}{'…' if len(text) > 100 else ''})"

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult | str:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the tool holds (processes, connections)."""


@dataclass
class ToolChanges:
    """What `ToolRegistry.refresh` found: tool names added and removed since the last look, and the
    notices the sources collected meanwhile (an MCP server's log messages and progress)."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notices: list[dict] = field(default_factory=list)


@dataclass
class ToolRegistry:
    """The tools one agent offers the model. Besides fixed tools it may hold *sources* whose tools
    change during a session (an MCP server after `notifications/tools/list_changed`): a source has
    `name`, `tools` (its current Tool objects), `tools_version` (bumped on every change) and
    `async settle()` (waits for a change being read); optionally `drain_notices()`. `refresh()`
    brings the registry up to date; the loop calls it before every step. `allowed`, when set (by
    --tools or a sub-agent type), limits which of a source's new tools are taken in."""
    tools: dict[str, Tool] = field(default_factory=dict)
    sources: list = field(default_factory=list)
    allowed: set[str] | None = None
    gone: dict[str, str] = field(default_factory=dict)      # removed tool name -> why (for the model)
    _synced: dict = field(default_factory=dict, repr=False)  # id(source) -> (version, its tool names)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"tool name {tool.name!r} is registered twice")
        self.tools[tool.name] = tool

    def add_source(self, source) -> None:
        """Take in a source's current tools and follow its later changes."""
        for tool in source.tools:
            self.add(tool)
        self.sources.append(source)
        self._synced[id(source)] = (source.tools_version, [t.name for t in source.tools])

    def restrict(self, names) -> None:
        """Keep only `names` (in the registry's order), now and for tools sources add later."""
        names = set(names)
        self.tools = {n: t for n, t in self.tools.items() if n in names}
        self.allowed = names if self.allowed is None else self.allowed & names

    async def refresh(self) -> ToolChanges:
        """Follow the sources' changes: a tool a source no longer has leaves the registry, a new one
        joins it (at the end, if `allowed` lets it), a changed one is replaced in place."""
        changes = ToolChanges()
        for source in self.sources:
            await source.settle()
            drain = getattr(source, "drain_notices", None)
            if drain is not None:
                changes.notices.extend(drain())
            version, old = self._synced[id(source)]
            if source.tools_version == version:
                continue
            current = {t.name: t for t in source.tools}
            for name in old:
                if name not in current and self.tools.pop(name, None) is not None:
                    changes.removed.append(name)
                    self.gone[name] = (f"{getattr(source, 'source_label', repr(source.name))} no longer offers it "
                                       f"(its tool list changed)")
            for name, tool in current.items():
                if name in old and name in self.tools:
                    self.tools[name] = tool
                elif name not in old and name not in self.tools and (self.allowed is None or name in self.allowed):
                    self.tools[name] = tool
                    self.gone.pop(name, None)
                    changes.added.append(name)
            self._synced[id(source)] = (source.tools_version, list(current))
        return changes

    def missing(self, name: str) -> str:
        """The error for a call to a tool the registry does not have."""
        if name in self.gone:
            return (f"Tool {name!r} is no longer available: {self.gone[name]}. Available tools: "
                    f"{', '.join(self.names())}.")
        return f"Unknown tool {name!r}. Available tools: {', '.join(self.names())}."

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def names(self) -> list[str]:
        return list(self.tools)

    async def close(self) -> None:
        for tool in self.tools.values():
            await tool.close()


_TYPES: dict[str, Any] = {
    "string": str, "boolean": bool, "object": dict, "array": list, "null": type(None),
}


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    py = _TYPES.get(expected)
    return py is None or isinstance(value, py)


def validate_args(value: Any, schema: dict, path: str = "input") -> list[str]:
    """Check `value` against the common subset of JSON Schema tools use (type, required, properties,
    additionalProperties: false, enum, items, minimum/maximum, anyOf/oneOf). Keywords outside that
    subset are accepted as given, so a tool with an unusual schema still works. Returns the problems
    as readable strings (empty when valid)."""
    if not isinstance(schema, dict):
        return []
    errors: list[str] = []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            if options and all(validate_args(value, s, path) for s in options):
                errors.append(f"{path}: does not match any allowed form")
    expected = schema.get("type")
    if expected is not None:
        kinds = expected if isinstance(expected, list) else [expected]
        if not any(_type_ok(value, k) for k in kinds):
            return errors + [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__} {value!r:.80}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r:.80} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                errors.append(f"{path}: missing required field {name!r}")
        for name, item in value.items():
            if name in props:
                errors.extend(validate_args(item, props[name], f"{path}.{name}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected field {name!r} (allowed: {', '.join(props) or 'none'})")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors.extend(validate_args(item, schema["items"], f"{path}[{i}]"))
    return errors
