"""K2's chat format: rendering messages with jinja chat templates, and parsing model output.

Rendering follows transformers' `apply_chat_template` (a sandboxed jinja2 environment with
trim_blocks, lstrip_blocks, a `tojson` that keeps non-ASCII text, `raise_exception`), so a
checkpoint's own `chat_template.jinja` renders here exactly as it does there. Built-in templates:
`kimi-k2` (K2-Instruct-0905), `kimi-k2-thinking` and `kimi-k2.6` (see `moonlet/templates/`).

Parsing splits generated text into content, `<think>` reasoning and tool calls; `parse_output` does a
whole text, `StreamingOutputParser` the same incrementally (identical results for any chunking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

BUILTIN_TEMPLATES = ("kimi-k2", "kimi-k2-thinking", "kimi-k2.6")
DEFAULT_TEMPLATE = "kimi-k2"  # chosen when no `thinking` kwarg is given
THINKING_TEMPLATE = "kimi-k2.6"  # chosen when the caller passes `thinking=...`
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")

THINK_BEGIN, THINK_END = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


# ---- rendering -------------------------------------------------------------------------------
def builtin_template(name: str) -> str:
    """The text of a built-in template by name."""
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; built-in ones are {', '.join(BUILTIN_TEMPLATES)}")
    return resources.files("moonlet").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(template: str) -> str:
    """A built-in name -> its text; template text (containing `{{` or `{%`) -> itself."""
    if template in BUILTIN_TEMPLATES:
        return builtin_template(template)
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(f"chat_template={template!r} is neither a built-in template "
                     f"({', '.join(BUILTIN_TEMPLATES)}) nor jinja template text")


def select_template(requested: str | None, own: str | None, kwargs: Mapping[str, Any]) -> str:
    """The template apply_chat_template uses: an explicit `chat_template=` (name or text), else the
    checkpoint's own, else `kimi-k2.6` when the caller passes `thinking=...`, else `kimi-k2`."""
    if requested:
        return resolve_template(requested)
    if own:
        return own
    return builtin_template(THINKING_TEMPLATE if "thinking" in kwargs else DEFAULT_TEMPLATE)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types (pydantic models and dataclasses become dicts)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(exclude_none=True))
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    raise TypeError(f"chat messages and tools must be JSON-like data, got {type(value).__name__}")


def normalize_messages(messages) -> list[dict]:
    """Validate OpenAI-style messages and return plain-dict copies with `reasoning_content` filled from
    `reasoning` / `thinking` when only those are given (as transformers does)."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if message.get("reasoning_content") is None:
            reasoning = message.get("reasoning") or message.get("thinking")
            if isinstance(reasoning, str):
                message["reasoning_content"] = reasoning
        out.append(message)
    return out


IMAGE_PART_TYPES = ("image", "image_url", "input_image")


def _image_source(part: Mapping, where: str) -> Any:
    """The image an image part holds: ``{"type": "image", "image": X}``, ``{"type": "image_url",
    "image_url": {"url": X}}`` (or ``"image_url": X``) or ``{"type": "input_image", "image_url": X}``;
    X a data URL, a file path, raw bytes or a PIL image. Web URLs are refused (nothing is fetched)."""
    source = part.get("image")
    if source is None:
        source = part.get("image_url")
        if isinstance(source, Mapping):
            source = source.get("url")
    if source is None:
        raise ValueError(f"{where} is an image part without an image; give {{'type': 'image', 'image': ...}} or "
                         f"{{'type': 'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}}")
    if isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https"):
        raise ValueError(f"{where}: image URLs are not fetched ({source[:40]!r}); pass a data URL, a file path, "
                         f"the image's bytes or a PIL image")
    return source


def split_image_parts(messages) -> tuple[list, list]:
    """Take the images out of ``messages`` for rendering: every image part of a content list (see
    ``_image_source``) becomes a text part holding the K2.5 media placeholder
    (``<|media_begin|>image<|media_content|><|media_pad|><|media_end|>``), so any chat template renders
    it where it stands, and its image is collected. Returns (messages, images): copies of the messages
    that had image parts (the others as given) and the images in the order the placeholders appear
    (message order, part order), what ``LLM.generate`` takes beside the rendered prompt."""
    from .multimodal import IMAGE_PLACEHOLDER

    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            out.append(message)
            continue
        parts, changed = [], False
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and (part.get("type") in IMAGE_PART_TYPES or "image" in part
                                              or "image_url" in part):
                images.append(_image_source(part, f"messages[{i}].content[{j}]"))
                parts.append({"type": "text", "text": IMAGE_PLACEHOLDER})
                changed = True
            else:
                parts.append(part)
        out.append({**message, "content": parts} if changed else message)
    return out, images


def render_chat(template: str, messages, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
    """Render `messages` (and `tools`, OpenAI function form) with jinja template text or a built-in name."""
    template = resolve_template(template)
    tools = _plain(list(tools)) if tools else None
    return _compile(template).render(messages=normalize_messages(messages), tools=tools,
                                     add_generation_prompt=add_generation_prompt, **_plain(kwargs))


# ---- parsing ---------------------------------------------------------------------------------
@dataclass
class ToolCall:
    id: str  # e.g. "functions.get_weather:0", echoed verbatim in the next request
    name: str
    arguments: str  # JSON text as the model wrote it (validated, surrounding whitespace removed)


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # set when part of the output was malformed (it is then left in content)


@dataclass
class ContentDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArgsDelta:
    index: int
    text: str


@dataclass
class ToolCallEnd:
    index: int


def tool_name_from_id(call_id: str) -> str | None:
    """`functions.NAME:N` or `NAME:N` -> NAME (the part between the last '.' and the ':'); None if malformed."""
    head, colon, index = call_id.rpartition(":")
    if not colon or not index.isdigit() or any(c.isspace() for c in call_id):
        return None
    name = head.rpartition(".")[2]
    return name or None


def _check_call(raw: str) -> tuple[str, str, str] | str:
    """`<|tool_call_begin|> ID <|tool_call_argument_begin|> ARGS <|tool_call_end|>` -> (id, name, args),
    or an error message."""
    body = raw[len(CALL_BEGIN):len(raw) - len(CALL_END)]
    call_id, sep, args = body.partition(ARGS_BEGIN)
    call_id, args = call_id.strip(), args.strip()
    if not sep:
        return f"tool call {call_id[:60]!r} has no {ARGS_BEGIN}"
    name = tool_name_from_id(call_id)
    if name is None:
        return f"tool call id {call_id[:60]!r} is not of the form functions.NAME:N"
    try:
        json.loads(args)
    except ValueError as e:
        return f"arguments of tool call {call_id!r} are not valid JSON ({e})"
    return call_id, name, args


def _join_errors(errors: list[str]) -> str | None:
    return "; ".join(errors) if errors else None


UNTERMINATED = f"tool call section not terminated by {SECTION_END}"
_SECTION_MARKERS = (CALL_BEGIN, ARGS_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END)
_LONGEST_MARKER = max(map(len, _SECTION_MARKERS))


def _section_item(text: str, pos: int) -> tuple[int, ToolCall | None, str | None, str | None] | None:
    """Parse one item of the tool-call section at `text[pos]` (not whitespace, not the section end).

    Returns (end, call, content, error) or None when `text` does not hold the whole item yet. A
    well-formed call gives `call`; anything else gives the raw `content` to keep and an `error`."""
    if text.startswith(CALL_BEGIN, pos):
        stops = [(i, m) for m in (CALL_END, CALL_BEGIN, SECTION_END, SECTION_BEGIN)
                 if (i := text.find(m, pos + len(CALL_BEGIN))) >= 0]
        if not stops:
            return None
        stop, marker = min(stops)
        if marker != CALL_END:
            raw = text[pos:stop]
            return stop, None, raw, f"tool call {raw[:60]!r} not closed by {CALL_END}"
        end = stop + len(CALL_END)
        checked = _check_call(text[pos:end])
        if isinstance(checked, str):
            return end, None, text[pos:end], checked
        return end, ToolCall(*checked), None, None
    stops = [i for m in (CALL_BEGIN, SECTION_END) if (i := text.find(m, pos)) >= 0]
    if not stops:
        return None
    stop = min(stops)
    return stop, None, text[pos:stop], f"unexpected text {text[pos:stop][:60]!r} in the tool call section"


def parse_output(text: str, thinking: bool = False) -> ParsedOutput:
    """Split a complete model output into content, reasoning and tool calls. Never raises.

    Content is the text outside `<think>…</think>` and outside the tool-call section; reasoning is
    the text inside `<think>…</think>` (also ended by the section token; `thinking=True` means the
    prompt already opened `<think>`). Each call in the section is
    `<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>` with JSON ARGS and ID
    `functions.NAME:N` (or `NAME:N`). A malformed call, stray text in the section or an
    unterminated section is kept as content and described in `error`; the well-formed calls around
    it are still returned. After the section ends, text is content again."""
    out = ParsedOutput(reasoning="" if thinking else None)
    errors: list[str] = []
    state = "reasoning" if thinking else "content"
    pos, n = 0, len(text)
    item_end = 0  # in the section: where the text not yet consumed by an item starts
    while pos < n:
        if state != "section":
            opener = THINK_BEGIN if state == "content" else THINK_END
            hits = [(i, m) for m in (opener, SECTION_BEGIN) if (i := text.find(m, pos)) >= 0]
            end, marker = min(hits) if hits else (n, None)
            if state == "content":
                out.content += text[pos:end]
            else:
                out.reasoning += text[pos:end]
            if marker is None:
                break
            pos = end + len(marker)
            if marker == SECTION_BEGIN:
                state, item_end = "section", end
            elif marker == THINK_BEGIN:
                state, out.reasoning = "reasoning", out.reasoning or ""
            else:
                state = "content"
            continue
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        if text.startswith(SECTION_END, pos):
            pos, state = pos + len(SECTION_END), "content"
            continue
        item = _section_item(text, pos)
        if item is None:
            break
        pos, call, content, error = item
        item_end = pos
        if call is not None:
            out.tool_calls.append(call)
        else:
            out.content += content
            errors.append(error)
    if state == "section":
        out.content += text[item_end:]
        errors.append(UNTERMINATED)
    out.error = _join_errors(errors)
    return out


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of one of `markers`."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StreamingOutputParser:
    """Incremental `parse_output`: `feed(delta)` and `finish()` return events (ContentDelta,
    ReasoningDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd); `result()` gives the same
    ParsedOutput as `parse_output(full_text, thinking)` for any split of the text into deltas.

    Text that might be the start of a marker is held back until it is decided. A tool call is
    emitted whole (start, its arguments, end) once its `<|tool_call_end|>` arrives and it checks
    out, so a malformed call never produces tool events."""

    def __init__(self, thinking: bool = False):
        self._state = "reasoning" if thinking else "content"
        self._buf = ""
        self._pending = ""  # section text since the last item, returned as content if the section never ends
        self._waiting = 0  # length of the buffer already searched for the end of the current section item
        self._errors: list[str] = []
        self._finished = False
        self.content = ""
        self.reasoning: str | None = "" if thinking else None
        self.tool_calls: list[ToolCall] = []

    def feed(self, text_delta: str) -> list:
        if self._finished:
            raise RuntimeError("StreamingOutputParser.feed() called after finish()")
        self._buf += text_delta
        return self._drain(final=False)

    def finish(self) -> list:
        if self._finished:
            return []
        events = self._drain(final=True)
        if self._state == "section":
            events += self._content(self._pending + self._buf)
            self._pending = self._buf = ""
            self._errors.append(UNTERMINATED)
        self._finished = True
        return events

    @property
    def error(self) -> str | None:
        return _join_errors(self._errors)

    def result(self) -> ParsedOutput:
        return ParsedOutput(content=self.content, reasoning=self.reasoning, tool_calls=list(self.tool_calls),
                            error=self.error)

    def _content(self, text: str) -> list:
        if not text:
            return []
        self.content += text
        return [ContentDelta(text)]

    def _reasoning(self, text: str) -> list:
        if not text:
            return []
        self.reasoning = (self.reasoning or "") + text
        return [ReasoningDelta(text)]

    def _drain(self, final: bool) -> list:
        events: list = []
        while True:
            buf = self._buf
            if self._state != "section":
                markers = (THINK_BEGIN if self._state == "content" else THINK_END, SECTION_BEGIN)
                hits = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
                emit = self._content if self._state == "content" else self._reasoning
                if not hits:
                    keep = 0 if final else _held_back(buf, markers)
                    events += emit(buf[:len(buf) - keep])
                    self._buf = buf[len(buf) - keep:]
                    return events
                i, marker = min(hits)
                events += emit(buf[:i])
                self._buf = buf[i + len(marker):]
                if marker == SECTION_BEGIN:
                    self._state, self._pending = "section", marker
                elif marker == THINK_BEGIN:
                    self._state, self.reasoning = "reasoning", self.reasoning or ""
                else:
                    self._state = "content"
                continue
            stripped = buf.lstrip()
            self._pending += buf[:len(buf) - len(stripped)]
            self._buf = buf = stripped
            if not buf:
                return events
            if buf.startswith(SECTION_END):
                self._buf, self._pending, self._state = buf[len(SECTION_END):], "", "content"
                continue
            if self._waiting and not final:
                # only new text can complete the item: look at it alone, so long arguments stay linear
                tail = buf[max(0, self._waiting - _LONGEST_MARKER):]
                if not any(m in tail for m in _SECTION_MARKERS):
                    self._waiting = len(buf)
                    return events
            item = _section_item(buf, 0)
            if item is None:  # the item (or a marker) is still arriving
                self._waiting = len(buf)
                return events
            self._waiting = 0
            end, call, content, error = item
            self._buf, self._pending = buf[end:], ""
            if call is not None:
                index = len(self.tool_calls)
                self.tool_calls.append(call)
                events += [ToolCallStart(index, call.id, call.name), ToolCallArgsDelta(index, call.arguments),
                           ToolCallEnd(index)]
            else:
                events += self._content(content)
                self._errors.append(error)
