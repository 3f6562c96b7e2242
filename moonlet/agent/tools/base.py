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
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"tool name {tool.name!r} is registered twice")
        self.tools[tool.name] = tool

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
