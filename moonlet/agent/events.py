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
