"""What an agent reports while it runs. The base class ignores everything (sub-agents, tests); the
terminal printer streams text to stdout and tool activity to stderr."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .client import RetryNotice
    from .hooks import HookRun
    from .loop import Agent, TurnResult
    from .tools.base import Tool, ToolResult


class AgentEvents:
    def step(self, agent: "Agent", n: int) -> None: ...
    def message_start(self, agent: "Agent") -> None: ...
    def text(self, agent: "Agent", delta: str) -> None: ...
    def thinking(self, agent: "Agent", delta: str) -> None: ...
    def tool_call(self, agent: "Agent", tool: "Tool", args: dict) -> None: ...
    def tool_result(self, agent: "Agent", name: str, result: "ToolResult") -> None: ...
    def retry(self, agent: "Agent", notice: "RetryNotice") -> None: ...
    def compaction(self, agent: "Agent", reason: str, before: int, after: int, result) -> None: ...
    def turn_end(self, agent: "Agent", result: "TurnResult") -> None: ...
    def subagent(self, agent: "Agent", label: str, status: str) -> None: ...
    def hook(self, agent: "Agent", run: "HookRun") -> None: ...
    def hook_message(self, agent: "Agent", event: str, text: str) -> None: ...

    def child(self, label: str) -> "AgentEvents":
        """Events for a sub-agent; by default sub-agents run quietly."""
        return AgentEvents()


class TerminalEvents(AgentEvents):
    """Streams the top agent's reply text to `out`; one line per tool call, retry, compaction and
    sub-agent to `err`. `show_thinking` also streams reasoning (dimmed)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, show_thinking: bool = False,
                 prefix: str = ""):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.show_thinking = show_thinking
        self.prefix = prefix
        self._at_line_start = True

    def _line(self, text: str) -> None:
        if not self._at_line_start:
            self.out.write("\n")
            self.out.flush()
            self._at_line_start = True
        self.err.write(f"{self.prefix}{text}\n")
        self.err.flush()

    def message_start(self, agent) -> None:
        self._thinking_open = False

    def text(self, agent, delta: str) -> None:
        self.out.write(delta)
        self.out.flush()
        if delta:
            self._at_line_start = delta.endswith("\n")

    def thinking(self, agent, delta: str) -> None:
        if self.show_thinking:
            self.err.write(f"\x1b[2m{delta}\x1b[0m" if self.err.isatty() else delta)
            self.err.flush()

    def tool_call(self, agent, tool, args) -> None:
        self._line(f"● {tool.summary(args)}")

    def tool_result(self, agent, name, result) -> None:
        text = result.text().strip().splitlines()
        first = text[0][:120] if text else ""
        more = f" (+{len(text) - 1} lines)" if len(text) > 1 else ""
        self._line(f"  {'✗' if result.is_error else '⎿'} {first}{more}")

    def retry(self, agent, notice) -> None:
        self._line(f"  retry {notice.attempt} in {notice.delay:.1f}s: {str(notice.error)[:160]}")

    def compaction(self, agent, reason, before, after, result) -> None:
        self._line(f"  compacted context: {before} → {after} tokens ({len(result.summarized)} messages "
                   f"summarized, {len(result.kept)} kept; {reason})")

    def subagent(self, agent, label, status) -> None:
        self._line(f"  sub-agent {label}: {status}")

    def hook(self, agent, run) -> None:
        """Quiet for hooks that just succeed; one line for a failure or an intervention."""
        if run.error is None and not run.effect:
            return
        what = f"failed: {run.error}" if run.error else run.effect
        detail = (run.stderr.strip().splitlines() or [""])[-1][:160] if run.error or run.effect == "block" else ""
        self._line(f"  hook {run.event} `{run.command[:60]}` {what}" + (f" — {detail}" if detail else ""))

    def hook_message(self, agent, event, text) -> None:
        self._line(f"  hook {event}: {text[:300]}")

    def turn_end(self, agent, result) -> None:
        if not self._at_line_start:
            self.out.write("\n")
            self.out.flush()
            self._at_line_start = True
        if result.stop_reason != "end_turn":
            self._line(f"[turn stopped: {result.stop_reason} after {result.steps} steps]")


class JsonEvents(AgentEvents):
    """``--output-format stream-json``: one JSON object per line on ``out`` as the run goes —
    ``assistant`` (a reply's text and thinking, when it is complete), ``tool_use``, ``tool_result``,
    ``retry``, ``compaction``, ``subagent``, ``hook`` (interventions and failures only) and
    ``hook_message``; the CLI writes ``init`` before and ``result`` after. Every object carries
    ``type`` and ``session_id``; see docs/agent.md for the fields."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self._text: list[str] = []
        self._thinking: list[str] = []

    def emit(self, agent, kind: str, **fields) -> None:
        import json

        record = {"type": kind, "session_id": agent.session_id if agent is not None else None, **fields}
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()

    def _flush_reply(self, agent) -> None:
        if self._text or self._thinking:
            self.emit(agent, "assistant", text="".join(self._text), thinking="".join(self._thinking))
        self._text, self._thinking = [], []

    def message_start(self, agent) -> None:
        self._flush_reply(agent)

    def text(self, agent, delta: str) -> None:
        self._text.append(delta)

    def thinking(self, agent, delta: str) -> None:
        self._thinking.append(delta)

    def tool_call(self, agent, tool, args) -> None:
        self._flush_reply(agent)
        self.emit(agent, "tool_use", name=tool.name, input=args)

    def tool_result(self, agent, name, result) -> None:
        content = result.content
        images = 0 if isinstance(content, str) else sum(1 for b in content if b.get("type") == "image")
        self.emit(agent, "tool_result", name=name, is_error=result.is_error, text=result.text(), images=images)

    def retry(self, agent, notice) -> None:
        self.emit(agent, "retry", attempt=notice.attempt, delay_s=round(notice.delay, 3), error=str(notice.error))

    def compaction(self, agent, reason, before, after, result) -> None:
        self.emit(agent, "compaction", reason=reason, tokens_before=before, tokens_after=after,
                  summarized=len(result.summarized), kept=len(result.kept))

    def subagent(self, agent, label, status) -> None:
        self.emit(agent, "subagent", label=label, status=status)

    def hook(self, agent, run) -> None:
        if run.error is None and not run.effect:
            return
        self.emit(agent, "hook", event=run.event, command=run.command, effect=run.effect, error=run.error)

    def hook_message(self, agent, event, text) -> None:
        self.emit(agent, "hook_message", event=event, text=text)

    def turn_end(self, agent, result) -> None:
        self._flush_reply(agent)
