"""File tools, confined to the work directory: read_file (line ranges, size cap; image files as image
blocks for models with vision, see images.py; PDFs as their pages' text), write_file, str_replace
(exactly one match)."""

from __future__ import annotations

from ... import pdf
from ..images import image_content, sniff
from .base import Tool, ToolContext, ToolError, ToolResult

MAX_LINES = 1000
MAX_BYTES = 100_000
MAX_LINE_CHARS = 2000
MAX_PDF_PAGES = 20  # pages of a PDF per read_file call (as Claude Code's Read reads them)


def _looks_pdf(path, data: bytes) -> bool:
    """A PDF by its first bytes; a file named .pdf may have up to 1 KiB before the header, as readers allow."""
    return data.startswith(pdf.PDF_MAGIC) or (path.suffix.lower() == ".pdf" and pdf.is_pdf(data))


def read_pdf(data: bytes, name: str, pages: str | None) -> str:
    """A PDF's text for read_file: a header naming the file and its page count, then per page a
    ``--- page N ---`` marker and the page's text (or a note for a page without a text layer). At most
    ``MAX_PDF_PAGES`` pages and ``MAX_BYTES`` characters per call; what is left is named in a last line
    (``use pages="6-12" to read on``)."""
    try:
        count = pdf.page_count(data)
        if pages is None:
            first, last = 1, min(count, MAX_PDF_PAGES)
        else:
            first, last = pdf.parse_page_range(pages)
            if first > count:
                raise ToolError(f"pages {pages!r}: the PDF has {count} pages")
            last = min(last, count, first + MAX_PDF_PAGES - 1)
        texts = pdf.page_texts(data, first, last)
    except pdf.PDFError as e:
        raise ToolError(f"{name}: {e}") from None
    except ValueError as e:  # a bad page range
        raise ToolError(str(e)) from None
    head = f"[PDF: {name}, {count} page{'s' if count != 1 else ''}]"
    out, size, shown = [head], len(head), first - 1
    for n, text in zip(range(first, last + 1), texts):
        block = f"{pdf.page_marker(n)}\n{text if text.strip() else pdf.empty_page_note(n)}"
        if size + len(block) + 1 > MAX_BYTES:
            if n == first:  # one page over the cap on its own: its start, cut
                room = max(MAX_BYTES - size - 1, 0)
                out.append(block[:room] + f"\n[... page {n} cut, {len(block) - room} more characters]")
                shown = n
            break
        out.append(block)
        size += len(block) + 1
        shown = n
    if shown < count:
        out.append(f"[showing pages {first}-{shown} of {count}; use pages=\"{shown + 1}-{min(count, shown + MAX_PDF_PAGES)}\" "
                   f"to read on]")
    else:
        out.append(pdf.END_MARKER)
    return "\n".join(out)


class ReadFileTool(Tool):
    name = "read_file"
    description = (f"Read a file in the work directory. Returns numbered lines; at most {MAX_LINES} lines or "
                   f"{MAX_BYTES // 1000} KB per call — use `offset` (1-based first line) and `limit` to read more. "
                   f"A PDF returns its pages' text, at most {MAX_PDF_PAGES} pages per call — use `pages` "
                   f"('3' or '2-5') to choose.")
    input_schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "relative to the work directory"},
            "offset": {"type": "integer", "minimum": 1, "description": "first line to read (1-based)"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LINES},
            "pages": {"type": "string", "description": "PDF files only: a page ('3') or a range ('2-5'), 1-based"},
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
        if _looks_pdf(path, data):
            if "offset" in args or "limit" in args:
                raise ToolError(f"{args['path']!r} is a PDF: choose its pages with `pages` ('3' or '2-5'), not "
                                "offset/limit")
            return ToolResult(read_pdf(data, ctx.workspace.relative(path), args.get("pages")))
        if args.get("pages") is not None:
            raise ToolError(f"`pages` is for PDF files and {args['path']!r} is not one; use offset/limit for lines")
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
