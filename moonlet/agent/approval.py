"""Approval policy for tool calls: `ask` (every call), `reads` (read-only tools run without asking,
the rest ask), `edits` (like `reads`, and calls confined to the work directory run too: the file
editing tools, and shell commands when the shell sandbox keeps them to the work directory and temp
with no network — see ``Tool.confined``), `yolo` (nothing asks) or `plan` (read-only tools run,
every other call is refused without asking: the agent investigates and answers with a plan; resume
with another mode to carry it out). Asking needs a prompt function; without one (no terminal) a call
that needs approval is rejected with a message saying how to allow it."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

MODES = ("ask", "reads", "edits", "yolo", "plan")
PLAN_REFUSAL = ("plan mode: this session may only read and investigate, not change anything or run commands. "
                "Put this step in your plan instead, and finish with the complete plan.")
PLAN_PROMPT = ("# Plan mode\nYou are in plan mode: use only the read-only tools to investigate, make no changes, and "
               "reply with a concrete step-by-step plan (files, changes, commands, how to verify). The user will "
               "review it and run the session again to carry it out.")


@dataclass
class Decision:
    approved: bool
    feedback: str | None = None
    remember: bool = False   # approve this tool for the rest of the session


Prompt = Callable[[str], Awaitable[Decision]]


class ApprovalPolicy:
    def __init__(self, mode: str = "reads", prompt: Prompt | None = None):
        if mode not in MODES:
            raise ValueError(f"approval mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.prompt = prompt
        self.always: set[str] = set()   # tools approved for the session
        self._lock = asyncio.Lock()     # one question at a time, even from concurrent sub-agents

    def needs_asking(self, tool, agent=None) -> bool:
        if self.mode == "yolo" or tool.name in self.always:
            return False
        if self.mode in ("reads", "edits", "plan") and tool.read_only:
            return False
        return not (self.mode == "edits" and tool.confined(agent))

    async def check(self, tool, args: dict, agent=None, force: bool = False) -> Decision:
        """`force` asks even where the policy would not (a PreToolUse hook answered "ask")."""
        if not force and not self.needs_asking(tool, agent):
            return Decision(True)
        if self.mode == "plan" and not tool.read_only:  # (a hook's "ask" on a read still asks)
            return Decision(False, PLAN_REFUSAL)
        if self.prompt is None:
            if force:
                return Decision(False, "a PreToolUse hook asked for the user's confirmation and there is no "
                                       "terminal to ask")
            return Decision(False, f"approval policy is {self.mode!r} and there is no terminal to ask; "
                                   "run with --yolo (or --approval reads for read-only tools) to allow it")
        async with self._lock:
            if tool.name in self.always and not force:
                return Decision(True)
            who = f"[{agent.label}] " if agent is not None and agent.label else ""
            if agent is not None and agent.hooks:  # Notification hooks: the user is about to be asked
                await agent.hooks.run(agent, "Notification", {
                    "message": f"{who}moonlet needs your permission to use {tool.name}",
                    "notification_type": "permission_prompt", "tool_name": tool.name}, target="permission_prompt")
            decision = await self.prompt(f"{who}{tool.summary(args)}")
            if decision.approved and decision.remember:
                self.always.add(tool.name)
            if agent is not None:
                agent.store.event(agent.session_id, agent.state.steps, "approval",
                                  {"tool": tool.name, "approved": decision.approved, "feedback": decision.feedback})
            return decision


async def terminal_prompt(summary: str) -> Decision:
    """Ask on the terminal: y (yes), a (always for this tool), n or Enter (no), or feedback to reject with."""
    def ask() -> str:
        sys.stderr.write(f"allow {summary}? [y]es / [a]lways / [n]o / or type feedback: ")
        sys.stderr.flush()
        return sys.stdin.readline()

    answer = (await asyncio.to_thread(ask)).strip()
    low = answer.lower()
    if low in ("y", "yes"):
        return Decision(True)
    if low in ("a", "always"):
        return Decision(True, remember=True)
    if low in ("n", "no", ""):
        return Decision(False)
    return Decision(False, feedback=answer)
