"""What every chat API's reply builder shares: walking the output parser's events.

Each API turns the parser's events (text, reasoning, tool calls) into its own content blocks and
stream frames. ``ReplyBuilder.feed`` does the walk once: it stops at ``done`` (a ``single_call``
reply that has its call) and sends each event to a hook that returns the API's frames. A builder that
wants a tool call whole (Anthropic, Responses) implements ``on_tool_call``; one that streams a call
as it is written (OpenAI chat) overrides the three ``on_call_*`` hooks instead.
"""

from __future__ import annotations

from ..chat import ContentDelta, ReasoningDelta, StreamingOutputParser, ToolCallArgsDelta, ToolCallEnd, ToolCallStart


class ReplyBuilder:
    """Parser events -> an API's frames (a list of whatever the API sends: events, deltas, ...).

    ``done`` is set by a subclass once the reply is complete (a ``single_call`` reply after its first
    call); later events are ignored and the caller stops generating."""

    def __init__(self, single_call: bool = False):
        self.single_call = single_call
        self.done = False
        self._calls: dict[int, list] = {}  # parser index -> [raw id, name, arguments so far]

    def feed(self, events) -> list:
        frames: list = []
        for ev in events:
            if self.done:
                break
            if isinstance(ev, ContentDelta):
                frames += self.on_text(ev.text)
            elif isinstance(ev, ReasoningDelta):
                frames += self.on_reasoning(ev.text)
            elif isinstance(ev, ToolCallStart):
                frames += self.on_call_start(ev.index, ev.id, ev.name)
            elif isinstance(ev, ToolCallArgsDelta):
                frames += self.on_call_args(ev.index, ev.text)
            elif isinstance(ev, ToolCallEnd):
                frames += self.on_call_end(ev.index)
        return frames

    def feed_end(self, parser: StreamingOutputParser) -> list:
        """The frames of what the parser still holds at the end of generation (none once ``done``)."""
        return [] if self.done else self.feed(parser.finish())

    # ---- hooks: each returns the frames for its event ------------------------------------------------
    def on_text(self, text: str) -> list:
        raise NotImplementedError

    def on_reasoning(self, text: str) -> list:
        raise NotImplementedError

    def on_tool_call(self, raw_id: str, name: str, args: str) -> list:
        """A complete tool call (``raw_id`` as the model wrote it, ``args`` its JSON text)."""
        raise NotImplementedError

    def on_call_start(self, index: int, raw_id: str, name: str) -> list:
        self._calls[index] = [raw_id, name, ""]
        return []

    def on_call_args(self, index: int, text: str) -> list:
        self._calls[index][2] += text
        return []

    def on_call_end(self, index: int) -> list:
        return self.on_tool_call(*self._calls.pop(index))
