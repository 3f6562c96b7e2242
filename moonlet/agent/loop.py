"""One agent: the step loop. Each step checks the budgets, compacts the context if it is getting full,
writes a checkpoint, makes one streamed model call, runs the tool calls of the reply (concurrently
where the tools allow it) and appends their results. A turn ends when the model replies without a
tool call, a budget runs out, or the repeated-call guard stops it. Hooks (hooks.py), when configured,
run at session start, on each user prompt, around each tool call and when the model would stop."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .approval import PLAN_PROMPT, ApprovalPolicy
from .client import AnthropicClient, APIError, RetryNotice
from .compress import CompactionConfig, Compressor
from .events import AgentEvents
from .hooks import HookOutcome, HookRunner
from .images import strip_image_data
from .agent_types import load_agent_types
from .instructions import Instructions, load_instructions
from .prompts import SUBAGENT_PROMPT, SYSTEM_PROMPT
from .sandbox import SandboxConfig, resolve_policy
from .store import SessionStore
from .stream import wire_message
from .tokens import TokenCounter
from .tools.base import ToolContext, ToolError, ToolRegistry, ToolResult, validate_args
from .tools.workspace import Workspace

MAX_RESULT_CHARS = 60_000  # a backstop; tools truncate their own output sooner, with a note


MIN_REPLY_TOKENS = 16  # a compacted context must leave at least this much of the window for a reply


class ContextTooSmall(ValueError):
    """The fixed part of the context (system prompt, tools, the user's messages) cannot fit the window."""


class CompactBlocked(Exception):
    """A PreCompact hook refused a manual compaction (the message is its reason)."""


@dataclass
class Budgets:
    """Limits over the whole session (resumed runs included); None means unlimited."""
    max_steps: int | None = 1000
    max_hours: float | None = None
    max_tokens: int | None = None  # input + output tokens of all model calls


@dataclass
class AgentConfig:
    model: str = "moonlet"
    system_prompt: str | None = None      # None: the built-in prompt for the work directory
    max_tokens: int = 8192                # per reply; clamped to what the window leaves
    context_window: int = 200_000
    temperature: float | None = None
    thinking: dict | None = None
    budgets: Budgets = field(default_factory=Budgets)
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    depth: int = 0                        # 0 for the top agent
    max_depth: int = 1                    # sub-agents at this depth cannot spawn more
    repeat_reminders: tuple[int, ...] = (3, 5, 8)
    repeat_stop: int = 12
    subagent_max_steps: int = 100
    subagent_timeout: float = 3600.0
    swarm_concurrency: int = 8
    max_stop_blocks: int = 5              # consecutive Stop-hook blocks honoured before a stop is let through
    vision: bool = False                  # the model takes images: tools return image blocks (else text notes)
    project_instructions: bool = True     # AGENTS.md files (moonlet.agent.instructions) join the system prompt
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # the shell's Landlock sandbox (sandbox.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AgentConfig":
        d = dict(d)
        d["budgets"] = Budgets(**d.get("budgets", {}))
        d["compaction"] = CompactionConfig(**d.get("compaction", {}))
        d["repeat_reminders"] = tuple(d.get("repeat_reminders", (3, 5, 8)))
        d["sandbox"] = SandboxConfig.from_dict(d.get("sandbox"))
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class AgentState:
    """What a checkpoint saves besides the transcript."""
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0
    compactions: int = 0
    summary: str | None = None
    todos: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    repeats: dict = field(default_factory=dict)   # call signature -> count, this turn
    stop_blocks: int = 0                          # consecutive stops blocked by Stop hooks, this turn
    status: str = "running"

    @classmethod
    def from_dict(cls, d: dict) -> "AgentState":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in (d or {}).items() if k in known})



MIN_THINKING_BUDGET = 1024  # the Messages API's smallest budget_tokens


def fit_thinking(thinking: dict | None, max_tokens: int) -> dict | None:
    """The ``thinking`` field for a call with this ``max_tokens``. The API wants
    1024 <= budget_tokens < max_tokens; a call whose max_tokens was clamped (the context is nearly
    full) gets a smaller budget (half the reply, at least 1024), or no thinking when max_tokens
    leaves no room for 1024 thinking tokens and an answer."""
    if not thinking or thinking.get("type") != "enabled" or not isinstance(thinking.get("budget_tokens"), int):
        return thinking
    if thinking["budget_tokens"] < max_tokens:
        return thinking
    if max_tokens <= MIN_THINKING_BUDGET:
        return None
    return dict(thinking, budget_tokens=max(MIN_THINKING_BUDGET, max_tokens // 2))

@dataclass
class TurnResult:
    stop_reason: str   # end_turn | max_tokens | max_steps | max_hours | token_budget | repeat_guard | cancelled
    #                    | prompt_blocked (a UserPromptSubmit hook refused the prompt) | hook_stopped ("continue": false)
    text: str
    steps: int


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def _with_note(result: ToolResult, note: str) -> None:
    """Append text to a tool result (string or content blocks) in place."""
    if isinstance(result.content, str):
        result.content += note
    else:
        result.content = list(result.content) + [{"type": "text", "text": note.strip()}]


def _signature(name: str, args) -> str:
    return name + "\x00" + json.dumps(args, sort_keys=True, ensure_ascii=False)


class Agent:
    """Create with `Agent(...)` for a new session or `Agent.restore(...)` to continue one. `run(prompt)`
    runs one turn; `run(None)` continues an unfinished turn (after a restore)."""

    def __init__(self, client: AnthropicClient, config: AgentConfig, tools: ToolRegistry, workspace: Workspace,
                 store: SessionStore, *, task: str = "", events: AgentEvents | None = None,
                 approval: ApprovalPolicy | None = None, tool_factory: Callable[[int], ToolRegistry] | None = None,
                 parent: "Agent | None" = None, label: str | None = None, session_id: str | None = None,
                 hooks: HookRunner | None = None, _restored=None):
        self.client = client
        self.config = config
        self.tools = tools
        self.workspace = workspace
        self.store = store
        self.events = events or AgentEvents()
        self.approval = approval or ApprovalPolicy("yolo")
        self.tool_factory = tool_factory
        self.parent = parent
        self.label = label
        self.hooks = hooks if hooks is not None and hooks.config else None
        # the shell sandbox: `on` without Landlock, or an allowed path that does not exist, fails here
        self.sandbox = resolve_policy(config.sandbox, workspace.root) if parent is None else parent.sandbox
        self.session_context: list[str] = []     # from SessionStart hooks, added to the system prompt
        # AGENTS.md files for the work directory, read once per process (a resume reads them again)
        self.instructions = load_instructions(workspace.root) if config.project_instructions else Instructions([])
        # sub-agent types (.moonlet/agents/*.md); sub-agents share their parent's
        self.agent_types = parent.agent_types if parent is not None else \
            load_agent_types(workspace.root, known_tools=tools.names())
        self._started = False                    # SessionStart hooks ran in this process
        self._resumed = _restored is not None
        self._halt: str | None = None            # a hook's "continue": false, pending
        self.counter = TokenCounter(client)
        self.compressor = Compressor(client, self.counter, config)
        if _restored is None:
            self.session_id = store.create_session(task, self._session_config(), label=label, session_id=session_id,
                                                   parent_id=parent.session_id if parent else None)
            self.messages: list[dict] = []
            self.state = AgentState()
            self._checkpoint_seq = 0
        else:
            self.session_id = _restored.session["id"]
            self.messages = _restored.messages
            self.state = AgentState.from_dict(_restored.state)
            self._checkpoint_seq = max((m["_seq"] for m in self.messages), default=0)
        self._checkpoint_len = len(self.messages)
        self._run_started: float | None = None
        self._context: dict | None = None  # the system prompt and tools last recorded (see _record_context)
        self.last_tokens = 0
        self.last_message: dict | None = None

    def _session_config(self) -> dict:
        return {"agent": self.config.to_dict(), "workdir": str(self.workspace.root),
                "approval": self.approval.mode, "tools": self.tools.names(),
                "hooks": self.hooks.config.to_dict() if self.hooks else None}

    @classmethod
    def restore(cls, store: SessionStore, session_id: str, client: AnthropicClient, tools: ToolRegistry,
                workspace: Workspace, *, config: AgentConfig | None = None, **kwargs) -> "Agent":
        """Continue a session from its last checkpoint (the step that was in flight is dropped)."""
        restored = store.restore(session_id)
        for child in store.children(session_id):
            if child["status"] == "running":  # sub-agents of the dropped step
                store.set_status(child["id"], "abandoned", error="parent session was resumed from a checkpoint")
        if config is None:
            config = AgentConfig.from_dict(restored.session["config"]["agent"])
        agent = cls(client, config, tools, workspace, store, _restored=restored, **kwargs)
        store.event(agent.session_id, agent.state.steps, "resumed", {"discarded_messages": restored.discarded})
        store.set_status(agent.session_id, "running")
        return agent

    # context ---------------------------------------------------------------------------------
    @property
    def system(self) -> str:
        if self.config.system_prompt is not None:
            return self.config.system_prompt
        template = SUBAGENT_PROMPT if self.config.depth > 0 else SYSTEM_PROMPT
        return template.format(workdir=self.workspace.root)

    def tool_specs(self) -> list[dict]:
        """The tool declarations sent to the model: with sub-agent types defined, ``task`` and ``swarm``
        list them in their description and accept exactly their names as ``agent``."""
        specs = self.tools.specs()
        if not self.agent_types:
            return specs
        listing = "\n\nSub-agent types (pass `agent`):\n" + "\n".join(
            f"- {t.name}: {t.description}" for t in self.agent_types.values())
        out = []
        for spec in specs:
            if spec["name"] in ("task", "swarm") and "agent" in spec["input_schema"].get("properties", {}):
                schema = dict(spec["input_schema"])
                props = dict(schema["properties"])
                props["agent"] = dict(props["agent"], enum=list(self.agent_types))
                schema["properties"] = props
                spec = dict(spec, description=spec["description"] + listing, input_schema=schema)
            out.append(spec)
        return out

    def _system(self) -> str:
        """The system prompt as sent: with the project instructions and the SessionStart hooks'
        context, if any."""
        text = self.system
        if self.approval.mode == "plan":
            text += "\n\n" + PLAN_PROMPT
        if self.instructions:
            text += "\n\n" + self.instructions.render()
        if self.session_context:
            text += "\n\n# Session context (from SessionStart hooks)\n" + "\n\n".join(self.session_context)
        return text

    def prompts(self) -> list[dict]:
        """Every user prompt of the session still in force, verbatim, oldest first."""
        return [{"role": "user", "content": m["content"], "_seq": m["seq"], "_kind": "prompt"}
                for m in self.store.messages(self.session_id, include_discarded=False) if m["kind"] == "prompt"]

    def _append(self, message: dict, kind: str) -> dict:
        seq = self.store.append_message(self.session_id, message, self.state.steps, kind)
        entry = {"role": message["role"], "content": message["content"], "_seq": seq, "_kind": kind}
        self.messages.append(entry)
        return entry

    def request(self, max_tokens: int | None = None, messages: list[dict] | None = None) -> dict:
        req = {"model": self.config.model, "max_tokens": max_tokens or self.config.max_tokens,
               "system": self._system(), "messages": [wire_message(m) for m in (messages or self.messages)]}
        if self.tools.tools:
            req["tools"] = self.tool_specs()
        if self.config.temperature is not None:
            req["temperature"] = self.config.temperature
        thinking = fit_thinking(self.config.thinking, req["max_tokens"])
        if thinking:
            req["thinking"] = thinking
        return req

    def elapsed(self) -> float:
        """Seconds of running time over the session, the current run included."""
        running = time.monotonic() - self._run_started if self._run_started is not None else 0.0
        return self.state.elapsed_s + running

    def checkpoint(self) -> None:
        last = max((m["_seq"] for m in self.messages if "_seq" in m), default=0)
        last = max(last, self._checkpoint_seq)
        state = asdict(self.state)
        state["elapsed_s"] = self.elapsed()  # so a killed run still counts against --max-hours
        self.store.checkpoint(self.session_id, self.state.steps, last, state)
        self._checkpoint_seq = last
        self._checkpoint_len = len(self.messages)

    def _rollback(self) -> None:
        """Forget the step in flight (after a cancel): memory and store back to the last checkpoint."""
        # rebuilt from the store: a compaction in flight may already have replaced self.messages
        restored = self.store.restore(self.session_id)
        spent = (self.state.steps, self.state.input_tokens, self.state.output_tokens, self.state.elapsed_s)
        self.messages = restored.messages
        self.state = AgentState.from_dict(restored.state)
        # what the lost step cost still counts against the budgets
        self.state.steps, self.state.input_tokens, self.state.output_tokens, self.state.elapsed_s = spent
        self._checkpoint_len = len(self.messages)

    # the loop --------------------------------------------------------------------------------
    async def run(self, prompt: str | list | None) -> TurnResult:
        self._run_started = time.monotonic()
        self.store.set_status(self.session_id, "running")
        self._halt = None
        try:
            result = await self._begin(prompt)
            if result is None:
                result = await self._loop()
        except asyncio.CancelledError:
            self._rollback()
            self._stop_clock()
            self.store.set_status(self.session_id, "interrupted")
            raise
        except BaseException as e:
            self._stop_clock()
            self.store.set_status(self.session_id, "failed", error=f"{type(e).__name__}: {e}")
            raise
        self.state.status = "done" if result.stop_reason == "end_turn" else result.stop_reason
        self.checkpoint()
        self._stop_clock()
        self.store.set_status(self.session_id, self.state.status, result=result.text)
        self.events.turn_end(self, result)
        return result

    async def _begin(self, prompt: str | list | None) -> TurnResult | None:
        """SessionStart hooks (once per process, top agent only), then the prompt through the
        UserPromptSubmit hooks: a TurnResult when a hook refuses it, else None (the loop runs)."""
        if not self._started:
            self._started = True
            if self.hooks and self.config.depth == 0:
                source = "resume" if self._resumed else "startup"
                out = await self.hooks.run(self, "SessionStart", {"source": source}, target=source)
                self.session_context = out.context
        if prompt is None:
            return None
        self.state.repeats = {}
        self.state.stop_blocks = 0
        if self.hooks:
            text = prompt if isinstance(prompt, str) else message_text({"content": prompt})
            out = await self.hooks.run(self, "UserPromptSubmit", {"prompt": text})
            if out.blocked or out.halt:
                reason = out.reason() if out.blocked else out.halt
                self.store.event(self.session_id, self.state.steps, "prompt_blocked", {"reason": reason})
                return TurnResult("prompt_blocked", reason, self.state.steps)
            if out.context:
                blocks = [{"type": "text", "text": prompt}] if isinstance(prompt, str) else list(prompt)
                prompt = blocks + [{"type": "text", "text": "[context from UserPromptSubmit hooks]\n" +
                                                            "\n\n".join(out.context)}]
        self._append({"role": "user", "content": prompt}, "prompt")
        return None

    async def _stop_hooks(self, message: dict) -> bool:
        """Run the Stop (SubagentStop for a sub-agent) hooks when the model would end its turn. True
        when a hook blocks the stop: its reason went into the transcript as a user message and the
        loop goes on. At most `max_stop_blocks` blocks in a row are honoured."""
        event = "Stop" if self.config.depth == 0 else "SubagentStop"
        if not self.hooks or not self.hooks.active(event):
            return False
        out = await self.hooks.run(self, event, {"stop_hook_active": self.state.stop_blocks > 0,
                                                 "last_assistant_message": message_text(message)})
        if not out.blocked or out.halt:
            self.state.stop_blocks = 0
            return False
        if self.state.stop_blocks >= self.config.max_stop_blocks:
            self.store.event(self.session_id, self.state.steps, "stop_hook_limit",
                             {"blocks": self.state.stop_blocks, "reason": out.reason()})
            self.state.stop_blocks = 0
            return False
        self.state.stop_blocks += 1
        self._append({"role": "user", "content": [{"type": "text", "text": f"[{event} hook: you cannot stop yet]\n"
                                                                          f"{out.reason()}"}]}, "hook")
        return True

    def _stop_clock(self) -> None:
        self.state.elapsed_s = self.elapsed()
        self._run_started = None

    def _budget_stop(self) -> str | None:
        b = self.config.budgets
        if b.max_steps is not None and self.state.steps >= b.max_steps:
            return "max_steps"
        if b.max_hours is not None and self.elapsed() >= b.max_hours * 3600:
            return "max_hours"
        if b.max_tokens is not None and self.state.input_tokens + self.state.output_tokens >= b.max_tokens:
            return "token_budget"
        return None

    async def _loop(self) -> TurnResult:
        while True:
            stop = self._budget_stop()
            if stop:
                self.store.event(self.session_id, self.state.steps, "budget_stop", {"budget": stop})
                return TurnResult(stop, self._last_text(), self.state.steps)
            await self._sync_tools()
            await self.maybe_compact()
            self.checkpoint()
            self.state.steps += 1
            self.events.step(self, self.state.steps)
            message = await self._model_call()
            uses = [b for b in message["content"] if b.get("type") == "tool_use"]
            if not uses:
                reason = message.get("stop_reason") or "end_turn"
                if reason != "max_tokens" and await self._stop_hooks(message):
                    continue
                return TurnResult("max_tokens" if reason == "max_tokens" else "end_turn", self._last_text(),
                                  self.state.steps)
            results, stop_turn = await self._run_tools(uses)
            self._append({"role": "user", "content": results}, "results")
            if self._halt is not None:
                self.store.event(self.session_id, self.state.steps, "hook_stopped", {"reason": self._halt})
                return TurnResult("hook_stopped", self._last_text(), self.state.steps)
            if stop_turn:
                self.store.event(self.session_id, self.state.steps, "repeat_guard", {})
                return TurnResult("repeat_guard", self._last_text(), self.state.steps)

    async def _sync_tools(self) -> None:
        """Take in the changes of tools that may change during a session (an MCP server that sent
        `notifications/tools/list_changed`), so this step's request offers the current list, and
        record them and the servers' log messages in the session's events."""
        changes = await self.tools.refresh()
        if changes.added or changes.removed:
            self.store.event(self.session_id, self.state.steps, "tools_changed",
                             {"added": changes.added, "removed": changes.removed})
        for notice in changes.notices:
            self.store.event(self.session_id, self.state.steps, "mcp_notification", notice)

    def _last_text(self) -> str:
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return message_text(m)
        return ""

    async def end_session(self, reason: str = "other") -> None:
        """Run the SessionEnd hooks (top agent only; they cannot block). `reason`: prompt_input_exit
        (the user left interactive mode), interrupted, error or other."""
        if self.hooks and self.config.depth == 0:
            await self.hooks.run(self, "SessionEnd", {"reason": reason}, target=reason)

    async def maybe_compact(self) -> None:
        req = self.request()
        window = self.config.context_window
        threshold = int(self.config.compaction.threshold * window)
        limit = min(threshold, window - self._reserve())
        tokens, _ = await self.counter.count(req, exact_above=limit)
        self.last_tokens = tokens
        if tokens >= threshold:
            await self.compact(reason=f"context at {tokens} tokens >= {self.config.compaction.threshold:.0%} of {window}",
                               trigger="auto")
        elif tokens + self._reserve() > window:
            await self.compact(reason=f"{tokens} tokens + {self._reserve()} for the reply would not fit in {window}",
                               trigger="auto")

    def _reserve(self) -> int:
        return min(self.config.max_tokens, self.config.context_window // 4)

    async def compact(self, instructions: str | None = None, reason: str = "manual", trigger: str = "manual") -> None:
        """Summarize the older part of the context (see compress.py) and record what was kept.
        PreCompact hooks run first (`trigger` manual or auto): what they print is added to the summary
        instructions; a block stops a manual compaction (CompactBlocked) and is ignored for an
        automatic one, which the window needs."""
        if not any(m["_kind"] != "head" for m in self.messages):
            return
        if self.hooks:
            pre = await self.hooks.run(self, "PreCompact", {"trigger": trigger, "custom_instructions": instructions or ""},
                                       target=trigger)
            if trigger == "manual" and (pre.blocked or pre.halt):
                why = pre.reason() if pre.blocked else pre.halt
                self.store.event(self.session_id, self.state.steps, "compact_blocked", {"reason": why})
                raise CompactBlocked(why)
            if pre.context:
                instructions = "\n\n".join([instructions] + pre.context if instructions else pre.context)
        before = self.last_tokens or (await self.counter.count(self.request(), exact_above=None))[0]
        fixed, _ = await self.counter.count(self.request(messages=[{"role": "user", "content": "."}]),
                                            exact_above=0)
        if fixed + MIN_REPLY_TOKENS > self.config.context_window:
            self._too_small(before, None, fixed)  # no summary could help: do not spend a model call on one
        result = await self.compressor.compact(self, instructions)
        for usage in result.usages:
            self._add_usage(usage, "compaction", result.started_at, 0.0, None)
        after, _ = await self.counter.count(self.request(messages=[dict(result.head, _kind="head")] + result.tail),
                                            exact_above=0)
        if after + MIN_REPLY_TOKENS > self.config.context_window:
            self._too_small(before, after, fixed)
        head = self._append(result.head, "head")
        self.messages.pop()  # _append put it last; it belongs first
        self.messages = [head] + result.tail
        after, _ = await self.counter.count(self.request(), exact_above=0)
        self.last_tokens = after
        self.state.summary = result.summary
        self.state.compactions += 1
        self.store.record_compaction(self.session_id, self.state.steps, marker_seq=head["_seq"], reason=reason,
                                     tokens_before=before, tokens_after=after, kept=result.kept,
                                     summarized=result.summarized, summary=result.summary,
                                     context=[m["_seq"] for m in self.messages])
        if result.images_dropped:
            self.store.event(self.session_id, self.state.steps, "images_dropped",
                             {"images": result.images_dropped, "reason": "the kept turns did not fit the window"})
        self.events.compaction(self, reason, before, after, result)

    def _too_small(self, before: int, after: int | None, fixed: int) -> None:
        """The compacted context would leave no room for a reply: the system prompt, the tool
        definitions and the user's own messages (kept verbatim) fill the window. Nothing is changed;
        compacting again would only grow the context."""
        raise ContextTooSmall(
            f"the context does not fit the model's {self.config.context_window}-token window even after "
            f"compaction ({before} tokens{'' if after is None else f', {after} after compacting'}): the system "
            f"prompt and {len(self.tools.tools)} tool definitions alone take {fixed}. Offer fewer tools (--tools), "
            f"shorten the system prompt or the task, or use a model with a larger window (--context-window if "
            f"the server's window is larger than assumed)")

    def _add_usage(self, usage: dict, purpose: str, t0: float, duration: float, stop_reason) -> None:
        self.state.input_tokens += int(usage.get("input_tokens") or 0)
        self.state.output_tokens += int(usage.get("output_tokens") or 0)
        self.store.record_usage(self.session_id, self.state.steps, purpose, self.config.model, usage, stop_reason,
                                t0, duration)

    async def _model_call(self) -> dict:
        overflowed = False
        while True:
            max_tokens = max(1, min(self.config.max_tokens, self.config.context_window - self.last_tokens))
            req = self.request(max_tokens)

            def on_event(ev: dict) -> None:
                if ev.get("type") == "content_block_delta":
                    d = ev["delta"]
                    if d.get("type") == "text_delta":
                        self.events.text(self, d["text"])
                    elif d.get("type") == "thinking_delta":
                        self.events.thinking(self, d["thinking"])
                elif ev.get("type") == "message_start":
                    self.events.message_start(self)

            def on_retry(notice: RetryNotice) -> None:
                self.events.retry(self, notice)
                self.store.event(self.session_id, self.state.steps, "retry",
                                 {"attempt": notice.attempt, "delay": notice.delay, "status": notice.error.status,
                                  "error": str(notice.error)[:500]})

            self._record_context(req)
            t0, m0 = time.time(), time.monotonic()
            try:
                message = await self.client.stream_message(req, on_event, on_retry)
            except APIError as e:
                if e.context_overflow and not overflowed:
                    overflowed = True  # the estimate was too low: compact for real, then try once more
                    await self.compact(reason=f"server rejected the request as too long: {e}", trigger="auto")
                    continue
                raise
            self._add_usage(message.get("usage") or {}, "step", t0, time.monotonic() - m0, message.get("stop_reason"))
            if message.get("stop_reason") == "model_context_window_exceeded" and not overflowed:
                overflowed = True  # drop the cut-off reply and retry the step from a compacted context
                await self.compact(reason="the model reported its context window exceeded", trigger="auto")
                continue
            self._append({"role": "assistant", "content": message["content"]}, "assistant")
            self.last_message = message
            return message

    def _record_context(self, req: dict) -> None:
        """Record the system prompt and tool declarations a step's model call is sent with (an event of
        kind "context") when they differ from the last ones this process recorded, so that the session
        can later be written out as a conversation with the tools it had (`moonlet agent export-chat`)."""
        context = {"system": req.get("system"), "tools": req.get("tools") or []}
        if context != self._context:
            self.store.event(self.session_id, self.state.steps, "context", context)
            self._context = context

    async def _run_tools(self, uses: list[dict]) -> tuple[list[dict], bool]:
        """Results in the order of the calls. Neighbouring calls whose tools are parallel-safe run
        together; any other call runs alone, after the ones before it."""
        results: list[dict | None] = [None] * len(uses)
        stop = False
        i = 0
        while i < len(uses):
            tool = self.tools.get(uses[i].get("name", ""))
            if tool is not None and tool.concurrent:
                j = i
                while j < len(uses) and (t := self.tools.get(uses[j].get("name", ""))) is not None and t.concurrent:
                    j += 1
                batch = await asyncio.gather(*(self._execute(u) for u in uses[i:j]))
                for k, (block, s) in enumerate(batch):
                    results[i + k] = block
                    stop = stop or s
                i = j
            else:
                results[i], s = await self._execute(uses[i])
                stop = stop or s
                i += 1
        return results, stop

    async def _execute(self, use: dict) -> tuple[dict, bool]:
        name, args, use_id = use.get("name", ""), use.get("input") or {}, use.get("id", "")
        sig = _signature(name, use.get("_raw_input", args))
        count = self.state.repeats[sig] = self.state.repeats.get(sig, 0) + 1
        tool = self.tools.get(name)
        stop = False
        notes: list[str] = []

        def error(text: str) -> ToolResult:
            return ToolResult(text, is_error=True)

        if count >= self.config.repeat_stop:
            result, stop = error(f"Stopped: this exact call was made {count} times in this turn. The turn ends "
                                 "here; the user will decide how to continue."), True
            approved = False
        elif tool is None:
            result, approved = error(self.tools.missing(name)), False
        elif "_input_error" in use:
            raw = use.get("_raw_input", "")
            result, approved = error(f"Invalid arguments for {name}: {use['_input_error']}. "
                                     f"Received: {raw[:500]!r}. Call the tool again with a JSON object matching its "
                                     "input schema."), False
        elif problems := validate_args(args, tool.input_schema):
            result, approved = error(f"Invalid arguments for {name}: " + "; ".join(problems[:10]) +
                                     f". Input schema: {json.dumps(tool.input_schema)[:1500]}"), False
        else:
            pre = await self.hooks.run(self, "PreToolUse", {"tool_name": name, "tool_input": args,
                                                            "tool_use_id": use_id}, target=name) \
                if self.hooks else HookOutcome()
            if pre.halt is not None:
                self._halt = pre.halt
                result, approved = error(f"A PreToolUse hook stopped the agent: {pre.halt}"), False
            elif pre.blocked or pre.permission == "deny":
                result, approved = error(f"A PreToolUse hook blocked this call: {pre.reason()}"), False
            elif pre.updated_input is not None and (bad := validate_args(pre.updated_input, tool.input_schema)):
                result, approved = error(f"A PreToolUse hook rewrote this call's input into one that breaks the "
                                         f"tool's schema ({'; '.join(bad[:5])}); the call did not run"), False
                self.store.event(self.session_id, self.state.steps, "input_updated",
                                 {"tool": name, "tool_use_id": use_id, "original": args,
                                  "updated": pre.updated_input, "invalid": bad[:10]})
            else:
                # a hook's "allow" answers for the user (recorded like an approval), except where a
                # permission rule denies the call or asks for it
                hook_allow = pre.permission == "allow"
                decision = await self.approval.check(tool, pre.updated_input if pre.updated_input is not None
                                                     else args, self, force=pre.permission == "ask",
                                                     preapproved=hook_allow)
                approved = decision.approved
                if approved and hook_allow:
                    self.store.event(self.session_id, self.state.steps, "approval",
                                     {"tool": name, "approved": True, "by": "PreToolUse hook"})
                if not approved and decision.refusal:
                    result = error(decision.refusal)  # refused by a rule or the mode, not by the user
                    self.store.event(self.session_id, self.state.steps, "permission_denied",
                                     {"tool": name, "reason": decision.refusal})
                elif not approved:
                    result = error("The user did not approve this call." +
                                   (f" Their feedback: {decision.feedback}" if decision.feedback else ""))
            notes = ["[context from PreToolUse hooks]\n" + "\n\n".join(pre.context)] if pre.context else []
            if approved and pre.updated_input is not None and pre.updated_input != args:
                # what runs is the hook's input: it is recorded as the call's input, the original is kept
                # in an event, and the model is told what ran
                self.store.event(self.session_id, self.state.steps, "input_updated",
                                 {"tool": name, "tool_use_id": use_id, "original": args, "updated": pre.updated_input})
                args = pre.updated_input
                notes.insert(0, "[a PreToolUse hook changed this call's input; what ran: "
                                f"{json.dumps(args, ensure_ascii=False)[:2000]}]")
        self.store.record_tool_call(self.session_id, self.state.steps, use_id, name, args, approved)
        if approved:
            self.events.tool_call(self, tool, args)
            try:
                out = await tool.run(args, ToolContext(self.workspace, self, use_id))
                result = out if isinstance(out, ToolResult) else ToolResult(str(out))
            except ToolError as e:
                result = error(str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a tool bug must not end the run; the model sees what happened
                result = error(f"Tool {name} failed: {type(e).__name__}: {e}")
            if self.hooks:
                post = await self.hooks.run(self, "PostToolUse", {
                    "tool_name": name, "tool_input": args, "tool_use_id": use_id,
                    "tool_response": {"content": strip_image_data(result.content), "is_error": result.is_error}},
                    target=name)
                feedback = ([post.reason()] if post.blocked else []) + post.context
                if feedback:
                    notes.append("[feedback from PostToolUse hooks]\n" + "\n\n".join(feedback))
                if post.halt is not None:
                    self._halt = post.halt
        if count in self.config.repeat_reminders and not stop:
            _with_note(result, f"\n\n[Reminder: you have made this exact call {count} times in this turn with the "
                               "same arguments. If it is not making progress, change your approach.]")
        if isinstance(result.content, str) and len(result.content) > MAX_RESULT_CHARS:
            cut = len(result.content) - MAX_RESULT_CHARS
            result.content = result.content[:MAX_RESULT_CHARS] + f"\n[... {cut} more characters truncated]"
        for note in notes:  # after the cut, so hook feedback always reaches the model
            _with_note(result, "\n\n" + note)
        # the image bytes live in the transcript message; the call record keeps their size only
        self.store.finish_tool_call(self.session_id, use_id, strip_image_data(result.content), result.is_error)
        self.events.tool_result(self, name, result)
        block = {"type": "tool_result", "tool_use_id": use_id, "content": result.content}
        if result.is_error:
            block["is_error"] = True
        return block, stop

    # sub-agents ------------------------------------------------------------------------------
    def child_config(self, max_steps: int | None = None) -> AgentConfig:
        d = self.config.to_dict()
        d.update(depth=self.config.depth + 1, system_prompt=None)
        d["budgets"] = dict(d["budgets"], max_steps=max_steps or self.config.subagent_max_steps)
        return AgentConfig.from_dict(d)

    def spawn(self, prompt: str, label: str, max_steps: int | None = None, events: AgentEvents | None = None,
              agent_type=None) -> "Agent":
        """A sub-agent for ``prompt``; with ``agent_type`` (an ``agent_types.AgentType``) its system
        prompt is the type's and its tools are the type's (of those a sub-agent at its depth has)."""
        if self.tool_factory is None:
            raise ToolError("this agent cannot start sub-agents (no tool factory configured)")
        config = self.child_config(max_steps or (agent_type.max_steps if agent_type is not None else None))
        tools = self.tool_factory(config.depth)
        if agent_type is not None:
            config.system_prompt = agent_type.prompt
            if agent_type.tools is not None:
                tools.restrict(agent_type.tools)
        return Agent(self.client, config, tools, self.workspace, self.store,
                     task=prompt, events=events or self.events.child(label), approval=self.approval,
                     tool_factory=self.tool_factory, parent=self, label=label, hooks=self.hooks)

    async def close(self) -> None:
        await self.tools.close()
