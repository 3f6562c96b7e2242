"""Server-sent events for the Anthropic Messages API: frame parsing and accumulation of a stream of
events into the final message (the same object a non-streaming call returns)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import AsyncIterator


@dataclass
class SSEEvent:
    event: str
    data: str
    id: str | None = None       # the stream's last event id when this event was dispatched (ids=True)
    retry: int | None = None    # a reconnection delay in milliseconds the server asked for (ids=True)


async def iter_sse(lines: AsyncIterator[str], ids: bool = False) -> AsyncIterator[SSEEvent]:
    """Yield one event per blank-line-terminated frame. Several `data:` lines are joined with newlines
    (the SSE rule); comment lines (starting with ':') are skipped.

    `ids=True` is for streams a client may resume (MCP's Streamable HTTP): each event carries the
    last event id set so far (an `id:` field holds until another replaces it), frames that only set
    an id or a `retry` are yielded too (with empty data), and a frame the end of the stream cut off
    is dropped, as the SSE rule says — a resumed stream sends it again."""
    event, data, last_id, retry, pending = "", [], None, None, False
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data or event or (ids and pending):
                yield SSEEvent(event or "message", "\n".join(data), last_id, retry)
            event, data, retry, pending = "", [], None, False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\x00" not in value:
            last_id, pending = value, True
        elif name == "retry" and value.isdigit():
            retry, pending = int(value), True
    if data and not ids:
        yield SSEEvent(event or "message", "\n".join(data))


class StreamProtocolError(ValueError):
    """The event sequence broke the Messages API streaming protocol."""


@dataclass
class MessageAccumulator:
    """Folds streaming events (already JSON-decoded) into a message dict.

    A tool_use block whose concatenated `partial_json` does not parse as a JSON object keeps
    `input: {}` and gets two private keys, `_input_error` and `_raw_input`, so the agent can answer
    it with an error tool_result instead of crashing. Private keys (leading underscore) are
    stripped before a message is sent back to a server."""

    message: dict | None = None
    done: bool = False
    _json: dict[int, list[str]] = field(default_factory=dict)

    def feed(self, data: dict) -> None:
        kind = data.get("type")
        if kind == "ping":
            return
        if kind == "error":
            return  # the caller turns it into an exception; nothing to accumulate
        if kind == "message_start":
            self.message = copy.deepcopy(data["message"])
            self.message.setdefault("content", [])
            self.message.setdefault("usage", {})
            return
        if self.message is None:
            raise StreamProtocolError(f"stream event {kind!r} arrived before message_start")
        content = self.message["content"]
        if kind == "content_block_start":
            index = data["index"]
            if index != len(content):
                raise StreamProtocolError(f"content_block_start index {index} but {len(content)} blocks so far")
            block = copy.deepcopy(data["content_block"])
            if block.get("type") in ("tool_use", "server_tool_use"):
                self._json[index] = []
            content.append(block)
        elif kind == "content_block_delta":
            block = self._block(data)
            delta = data["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif dtype == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif dtype == "signature_delta":
                block["signature"] = delta["signature"]
            elif dtype == "input_json_delta":
                self._json.setdefault(data["index"], []).append(delta.get("partial_json", ""))
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "content_block_stop":
            index = data["index"]
            block = self._block(data)
            if index in self._json:
                raw = "".join(self._json.pop(index))
                if raw.strip():
                    try:
                        parsed = json.loads(raw)
                    except json.JSONDecodeError as e:
                        parsed, err = None, f"arguments are not valid JSON ({e.msg} at position {e.pos})"
                    else:
                        err = None if isinstance(parsed, dict) else \
                            f"arguments must be a JSON object, got {type(parsed).__name__}"
                    if err:
                        block["input"] = {}
                        block["_input_error"] = err
                        block["_raw_input"] = raw
                    else:
                        block["input"] = parsed
                else:
                    block.setdefault("input", {})
        elif kind == "message_delta":
            delta = data.get("delta", {})
            for key in ("stop_reason", "stop_sequence"):
                if key in delta:
                    self.message[key] = delta[key]
            usage = data.get("usage") or {}
            # message_delta usage is cumulative: its values replace message_start's
            self.message["usage"].update({k: v for k, v in usage.items() if v is not None})
        elif kind == "message_stop":
            self.done = True

    def _block(self, data: dict) -> dict:
        index = data.get("index")
        content = self.message["content"]
        if not isinstance(index, int) or not 0 <= index < len(content):
            raise StreamProtocolError(f"{data.get('type')} for unknown block index {index!r}")
        return content[index]

    def result(self) -> dict:
        if self.message is None or not self.done:
            raise StreamProtocolError("stream ended before message_stop")
        for index in list(self._json):  # a block that never got its stop: treat like a truncated one
            block = self.message["content"][index]
            block["input"] = {}
            block["_input_error"] = "tool call was cut off before its arguments were complete"
            block["_raw_input"] = "".join(self._json.pop(index))
        return self.message


def wire_message(message: dict) -> dict:
    """The message as a server should see it: role and content only, private block keys dropped."""
    def clean(blocks: list) -> list:
        out = []
        for b in blocks:
            if isinstance(b, dict):
                b = {k: v for k, v in b.items() if not k.startswith("_")}
                if isinstance(b.get("content"), list):  # a tool_result's own blocks (images carry _source)
                    b["content"] = clean(b["content"])
            out.append(b)
        return out

    content = message["content"]
    if isinstance(content, list):
        content = clean(content)
    return {"role": message["role"], "content": content}
