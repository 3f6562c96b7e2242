"""File tools, confined to the work directory: read_file (line ranges, size cap; image files as image
blocks for models with vision, see images.py), write_file, str_replace (exactly one match)."""

from __future__ import annotations

from ..images import image_content, sniff
from .base import Tool, ToolContext, ToolError, ToolResult

MAX_LINES = 1000
MAX_BYTES = 100_000
MAX_LINE_CHARS = 2000


class ReadFileTool(Tool):
    name = "read_file"
    description = (f"Read a file in the work directory. Returns numbered lines; at most {MAX_LINES} lines or "
                   f"{MAX_BYTES // 1000} KB per call — use `offset` (1-based first line) and `limit` to read more.")
    input_schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "relative to the work directory"},
            "offset": {"type": "integer", "minimum": 1, "description": "first line to read (1-based)"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LINES},
        },
        "required": ["path"],
    }
    read_only = True

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        path = ctx.workspace.resolve(args["path"])
        if not path.exists():
            raise ToolError(f"{args['path']!r} does not exist")
        if path.is_dir():
            raise ToolError(f"{args['path']!r} is a directory; use glob to list it")
        data = path.read_bytes()
        media_type = sniff(data)  # by content, not by name: a .png that holds text is read as text
        if media_type is not None:
            return ToolResult(image_content(data, media_type, ctx.workspace.relative(path), ctx.can_see))
        if b"\x00" in data[:8192]:
            raise ToolError(f"{args['path']!r} looks binary ({len(data)} bytes); it cannot be shown as text")
        lines = data.decode("utf-8", "replace").splitlines()
        first = args.get("offset", 1)
        limit = args.get("limit", MAX_LINES)
        if first > max(len(lines), 1):
            raise ToolError(f"offset {first} is past the end of the file ({len(lines)} lines)")
        out, size, last = [], 0, first - 1
        for n in range(first, min(len(lines), first - 1 + limit) + 1):
            line = lines[n - 1]
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + f" [... line cut, {len(line) - MAX_LINE_CHARS} more characters]"
            row = f"{n:6}\t{line}"
            if size + len(row) + 1 > MAX_BYTES:
                break
            out.append(row)
            size += len(row) + 1
            last = n
        text = "\n".join(out)
        if last < len(lines):
            text += f"\n[showing lines {first}-{last} of {len(lines)}; use offset={last + 1} to read on]"
        return ToolResult(text or "[empty file]")


def snapshot(path, ctx: ToolContext) -> None:
    """Record what ``path`` holds before a file tool changes it (the session store, for rewind)."""
    agent = ctx.agent
    if agent is None or getattr(agent, "store", None) is None:
        return
    content = path.read_bytes() if path.is_file() else None
    agent.store.record_file_snapshot(agent.session_id, agent.state.steps, ctx.tool_use_id, str(path), content)


class WriteFileTool(Tool):
    name = "write_file"
    description = "Write a text file in the work directory (creating parent folders), replacing it or appending."
    input_schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "content": {"type": "string"},
            "append": {"type": "boolean", "description": "append instead of overwriting"},
        },
        "required": ["path", "content"],
    }

    def confined(self, agent=None) -> bool:
        return True  # paths are resolved inside the work directory

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        path = ctx.workspace.resolve(args["path"])
        if path.is_dir():
            raise ToolError(f"{args['path']!r} is a directory")
        snapshot(path, ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if args.get("append") else "w", encoding="utf-8") as f:
            f.write(args["content"])
        verb = "appended" if args.get("append") else "wrote"
        return ToolResult(f"{verb} {len(args['content'])} characters to {ctx.workspace.relative(path)}")


class StrReplaceTool(Tool):
    name = "str_replace"
    description = ("Replace a snippet in a file: `old` must occur exactly once (include surrounding lines to make "
                   "it unique); it is replaced by `new`.")
    input_schema = {
        "type": "object",
        "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
        "required": ["path", "old", "new"],
    }

    def confined(self, agent=None) -> bool:
        return True  # paths are resolved inside the work directory

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        path = ctx.workspace.resolve(args["path"])
        if not path.is_file():
            raise ToolError(f"{args['path']!r} is not an existing file")
        old, new = args["old"], args["new"]
        if not old:
            raise ToolError("`old` is empty; give the exact text to replace")
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"`old` was not found in {args['path']}; read the file and copy the text exactly "
                            "(whitespace included)")
        if count > 1:
            lines, start = [], 0
            for _ in range(min(count, 10)):
                i = text.index(old, start)
                lines.append(str(text.count("\n", 0, i) + 1))
                start = i + 1
            raise ToolError(f"`old` occurs {count} times in {args['path']} (at lines {', '.join(lines)}); include "
                            "more surrounding text so it matches exactly once")
        snapshot(path, ctx)
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
        line = text.count("\n", 0, text.index(old)) + 1
        return ToolResult(f"replaced 1 occurrence in {ctx.workspace.relative(path)} at line {line}")
