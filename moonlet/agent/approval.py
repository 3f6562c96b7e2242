"""Approval policy for tool calls: `ask` (every call), `reads` (read-only tools run without asking,
the rest ask), `edits` (like `reads`, and calls confined to the work directory run too: the file
editing tools, and shell commands when the shell sandbox keeps them to the work directory and temp
with no network — see ``Tool.confined``), `yolo` (nothing asks) or `plan` (read-only tools run,
every other call is refused without asking: the agent investigates and answers with a plan; resume
with another mode to carry it out). Asking needs a prompt function; without one (no terminal) a call
that needs approval is rejected with a message saying how to allow it.

Permission rules (``permissions.PermissionRules``) come before the mode: a deny rule refuses without
asking, an ask rule asks even under ``yolo`` (refused without a terminal), an allow rule runs the call
without asking; plan mode still refuses calls that are not read-only, whatever allows them."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

from .permissions import PermissionRules, persist_rules, remember_rules

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
    remember: bool = False   # approve this tool (for shell: this command's prefix) for the rest of the session
    persist: bool = False    # with remember: also save the allow rules to .moonlet/settings.local.json
    refusal: str | None = None  # refused by policy (a deny rule, plan mode), not by the user: the model's message


Prompt = Callable[[str], Awaitable[Decision]]


class ApprovalPolicy:
    def __init__(self, mode: str = "reads", prompt: Prompt | None = None, rules: PermissionRules | None = None):
        if mode not in MODES:
            raise ValueError(f"approval mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.prompt = prompt
        self.rules = rules if rules is not None else PermissionRules()
        self.always: set[str] = set()   # tools approved for the session
        self._lock = asyncio.Lock()     # one question at a time, even from concurrent sub-agents

    def needs_asking(self, tool, agent=None) -> bool:
        if self.mode == "yolo" or tool.name in self.always:
            return False
        if self.mode in ("reads", "edits", "plan") and tool.read_only:
            return False
        return not (self.mode == "edits" and tool.confined(agent))

    def _verdict(self, tool, args: dict, agent):
        if not self.rules:
            from .permissions import Verdict
            return Verdict(None)
        workdir = str(agent.workspace.root) if agent is not None else "."
        return self.rules.evaluate(tool.name, args, workdir)

    async def check(self, tool, args: dict, agent=None, force: bool = False, preapproved: bool = False) -> Decision:
        """`force` asks even where the policy would not (a PreToolUse hook answered "ask");
        `preapproved` approves unless a rule denies or asks (a PreToolUse hook answered "allow")."""
        verdict = self._verdict(tool, args, agent)
        if verdict.kind == "deny":
            return Decision(False, refusal=f"Denied by the {verdict.describe()}"
                                           f"{f' ({verdict.note})' if verdict.note else ''}; the call did not "
                                           "run. Do not retry it; find another way or ask the user to change the rule.")
        ask_rule = verdict.kind == "ask"
        if preapproved and not ask_rule:
            return Decision(True)
        if self.mode == "plan" and not tool.read_only and not preapproved:
            return Decision(False, refusal=PLAN_REFUSAL)
        force = force or ask_rule
        if not force and (verdict.kind == "allow" or not self.needs_asking(tool, agent)):
            return Decision(True)
        if self.prompt is None:
            if ask_rule:
                return Decision(False, f"the {verdict.describe()} requires the user's confirmation and there "
                                       "is no terminal to ask")
            if force:
                return Decision(False, "a PreToolUse hook asked for the user's confirmation and there is no "
                                       "terminal to ask")
            return Decision(False, f"approval policy is {self.mode!r} and there is no terminal to ask; "
                                   "run with --yolo (or --approval reads for read-only tools, or an allow rule: "
                                   "--allowed-tools) to allow it")
        async with self._lock:
            if not force and (tool.name in self.always or
                              self._verdict(tool, args, agent).kind == "allow"):  # an "always" given meanwhile
                return Decision(True)
            who = f"[{agent.label}] " if agent is not None and agent.label else ""
            if agent is not None and agent.hooks:  # Notification hooks: the user is about to be asked
                await agent.hooks.run(agent, "Notification", {
                    "message": f"{who}moonlet needs your permission to use {tool.name}",
                    "notification_type": "permission_prompt", "tool_name": tool.name}, target="permission_prompt")
            remember = remember_rules(tool.name, args)
            why = f" [{verdict.describe()}]" if ask_rule else ""
            scope = f" (always = {', '.join(remember)})" if remember and remember != [tool.name] else \
                (" (always: cannot be remembered for this command)" if not remember else "")
            decision = await self.prompt(f"{who}{tool.summary(args)}{why}{scope}")
            if decision.approved and decision.remember:
                self.remember(tool.name, remember, agent, persist=decision.persist)
            if agent is not None:
                agent.store.event(agent.session_id, agent.state.steps, "approval",
                                  {"tool": tool.name, "approved": decision.approved, "feedback": decision.feedback,
                                   "remembered": remember if decision.approved and decision.remember else None})
            return decision

    def remember(self, name: str, rules: list[str], agent=None, persist: bool = False) -> None:
        """An "always" answer: the bare tool for the session, or for shell the command prefixes as
        session allow rules (saved to .moonlet/settings.local.json too with ``persist``)."""
        if rules == [name]:
            self.always.add(name)
        elif rules:
            self.rules.add("allow", rules, "this session (always)")
        if persist and rules and agent is not None:
            path = persist_rules(str(agent.workspace.root), rules)
            sys.stderr.write(f"saved {', '.join(rules)} to {path}\n")


async def terminal_prompt(summary: str) -> Decision:
    """Ask on the terminal: y (yes), a (always: this tool, or for shell this command's prefix, for the
    session), s (always, and save the rule to .moonlet/settings.local.json), n or Enter (no), or
    feedback to reject with."""
    def ask() -> str:
        sys.stderr.write(f"allow {summary}? [y]es / [a]lways / [s]ave always / [n]o / or type feedback: ")
        sys.stderr.flush()
        return sys.stdin.readline()

    answer = (await asyncio.to_thread(ask)).strip()
    low = answer.lower()
    if low in ("y", "yes"):
        return Decision(True)
    if low in ("a", "always"):
        return Decision(True, remember=True)
    if low in ("s", "save"):
        return Decision(True, remember=True, persist=True)
    if low in ("n", "no", ""):
        return Decision(False)
    return Decision(False, feedback=answer)
