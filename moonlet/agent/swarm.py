"""Sub-agents and swarms. A sub-agent is a full agent with its own context, tools, budget and session
(a child of the caller's). The swarm tool fans one task template out over a list of items (or runs
a list of sub-tasks) with bounded concurrency; a rate-limit reply from the endpoint halves the
concurrency (it creeps back one slot at a time after a quiet period); each sub-agent has a timeout;
a failure is reported in the gathered reply instead of failing the swarm."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .client import APIError, RetryNotice
from .tools.base import Tool, ToolContext, ToolError, ToolResult

if TYPE_CHECKING:
    from .loop import Agent

MAX_CONCURRENCY = 1024
MAX_ITEMS = 10_000
REPLY_CHARS = 50_000  # the gathered reply is shared out between the results


class AdaptiveLimiter:
    """A concurrency limit that drops when the endpoint rate-limits and recovers slowly.

    `throttle()` halves the limit (at most once per `debounce` seconds, since one burst of 429s is one
    signal); once `recover_after` seconds pass without a throttle, each release raises it by one."""

    def __init__(self, limit: int, min_limit: int = 1, recover_after: float = 30.0, debounce: float = 1.0):
        if limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self.current = limit
        self.min_limit = min_limit
        self.recover_after = recover_after
        self.debounce = debounce
        self.active = 0
        self.max_active = 0
        self.lowest = limit
        self.throttles = 0
        self._last_change = float("-inf")
        self._cond = asyncio.Condition()

    def throttle(self) -> None:
        now = time.monotonic()
        if now - self._last_change < self.debounce:
            return
        self.current = max(self.min_limit, self.current // 2)
        self.lowest = min(self.lowest, self.current)
        self.throttles += 1
        self._last_change = now

    async def __aenter__(self) -> "AdaptiveLimiter":
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < self.current)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        return self

    async def __aexit__(self, *exc) -> None:
        async with self._cond:
            self.active -= 1
            now = time.monotonic()
            if self.current < self.limit and now - self._last_change >= self.recover_after:
                self.current += 1
                self._last_change = now
            self._cond.notify_all()


@dataclass
class SubResult:
    index: int
    label: str
    status: str          # done | stopped (<reason>) | timeout | failed
    text: str
    error: str | None
    session_id: str
    seconds: float


async def run_subagent(parent: "Agent", prompt: str, *, label: str, tool_use_id: str = "", index: int = 0,
                       item: str = "", timeout: float | None = None, max_steps: int | None = None,
                       agent_type=None) -> SubResult:
    """Run one sub-agent (of ``agent_type``, an ``agent_types.AgentType``, if given) to the end of its
    turn; never raises for the sub-agent's own failures."""
    child = parent.spawn(prompt, label, max_steps, agent_type=agent_type)
    parent.store.start_subagent(parent.session_id, child.session_id, tool_use_id, index, item)
    timeout = timeout or parent.config.subagent_timeout
    started = time.monotonic()
    text, error = "", None
    try:
        result = await asyncio.wait_for(child.run(prompt), timeout)
        text = result.text
        status = "done" if result.stop_reason == "end_turn" else f"stopped ({result.stop_reason})"
    except asyncio.TimeoutError:
        status, error, text = "timeout", f"timed out after {timeout:g}s", child._last_text()
        parent.store.set_status(child.session_id, "timeout", error=error)
    except APIError as e:
        status, error = "failed", f"model endpoint error: {e}"
    except Exception as e:  # isolate: one broken sub-agent must not take the swarm down
        status, error = "failed", f"{type(e).__name__}: {e}"
    finally:
        await child.close()
    parent.store.finish_subagent(child.session_id, status, text, error)
    parent.events.subagent(parent, label, status + (f": {error}" if error else ""))
    return SubResult(index, label, status, text, error, child.session_id, time.monotonic() - started)


AGENT_PARAM = {"type": "string", "description": "run it as this sub-agent type (listed in the tool description); "
                                               "default: a general sub-agent with the same tools"}


def agent_type_of(agent, args: dict):
    """The sub-agent type ``args`` names (``agent``), or None; ToolError for an unknown name."""
    name = args.get("agent")
    if not name:
        return None
    types = getattr(agent, "agent_types", {}) or {}
    if name not in types:
        known = ", ".join(sorted(types)) or "none are defined (.moonlet/agents/*.md)"
        raise ToolError(f"unknown sub-agent type {name!r}; the types here: {known}")
    return types[name]


def render_item(template: str, item, index: int) -> str:
    text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    if "{{item}}" not in template:
        return f"{template}\n\nItem: {text}"
    return template.replace("{{item}}", text).replace("{{index}}", str(index + 1))


def gather_reply(results: list[SubResult], limiter: AdaptiveLimiter) -> ToolResult:
    counts: dict[str, int] = {}
    for r in results:
        key = r.status.split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    head = (f"swarm finished: {len(results)} sub-agents — " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
            f"; concurrency {limiter.limit}" +
            (f" (lowered to {limiter.lowest} after {limiter.throttles} rate-limit signals)" if limiter.throttles else ""))
    per = max(200, REPLY_CHARS // max(1, len(results)))
    parts = [head]
    for r in results:
        body = r.text if len(r.text) <= per else r.text[:per] + f" [... {len(r.text) - per} more characters in " \
                                                                    f"session {r.session_id}]"
        err = f"\nerror: {r.error}" if r.error else ""
        parts.append(f"### {r.index + 1}. {r.label} [{r.status}]{err}\n{body}")
    failed = sum(1 for r in results if r.status != "done")
    return ToolResult("\n\n".join(parts), is_error=failed == len(results) and failed > 0)


class SwarmTool(Tool):
    name = "swarm"
    description = ("Run many sub-agents in parallel and gather their final replies. Either give `template` (a task "
                   "with an {{item}} placeholder) and `items`, or give `tasks` (a list of complete sub-task "
                   "descriptions). Each sub-agent has its own context and tools and sees only its own task, so "
                   "make each task self-contained. Results come back in order, failures included.")
    input_schema = {
        "type": "object",
        "properties": {
            "template": {"type": "string", "description": "task text with {{item}} (and optionally {{index}})"},
            "items": {"type": "array", "description": "values substituted for {{item}}"},
            "tasks": {"type": "array", "items": {"type": "string"}},
            "max_concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY},
            "timeout": {"type": "number", "minimum": 1, "description": "seconds per sub-agent"},
            "max_steps": {"type": "integer", "minimum": 1, "description": "step budget per sub-agent"},
            "agent": AGENT_PARAM,
        },
    }
    # starting sub-agents changes nothing by itself; each of their tool calls goes through approval
    read_only = True
    parallel_safe = True

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        agent = ctx.agent
        if agent is None:
            raise ToolError("swarm needs an agent")
        if agent.config.depth >= agent.config.max_depth:
            raise ToolError(f"sub-agents at depth {agent.config.depth} may not start swarms "
                            f"(max depth {agent.config.max_depth})")
        if args.get("tasks"):
            prompts = [str(t) for t in args["tasks"]]
            labels = [p.splitlines()[0][:60] for p in prompts]
            items = prompts
        elif args.get("template") and args.get("items"):
            items = args["items"]
            prompts = [render_item(args["template"], it, i) for i, it in enumerate(items)]
            labels = [(it if isinstance(it, str) else json.dumps(it, ensure_ascii=False))[:60] for it in items]
        else:
            raise ToolError("give either `tasks` (a non-empty list) or both `template` and `items`")
        if len(prompts) > MAX_ITEMS:
            raise ToolError(f"{len(prompts)} sub-tasks is more than the {MAX_ITEMS} a swarm runs; split the work")
        kind = agent_type_of(agent, args)
        if kind is not None:
            labels = [f"{kind.name}: {label}" for label in labels]
        limiter = AdaptiveLimiter(min(args.get("max_concurrency") or agent.config.swarm_concurrency, MAX_CONCURRENCY))
        self.last_limiter = limiter

        def on_retry(notice: RetryNotice) -> None:
            if notice.error.rate_limited:
                limiter.throttle()

        async def one(i: int) -> SubResult:
            async with limiter:
                return await run_subagent(agent, prompts[i], label=labels[i], tool_use_id=ctx.tool_use_id, index=i,
                                          item=items[i] if isinstance(items[i], str) else json.dumps(items[i]),
                                          timeout=args.get("timeout"), max_steps=args.get("max_steps"),
                                          agent_type=kind)

        agent.client.add_retry_listener(on_retry)
        try:
            results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            agent.client.remove_retry_listener(on_retry)
        agent.store.event(agent.session_id, agent.state.steps, "swarm",
                          {"n": len(results), "max_active": limiter.max_active, "limit": limiter.limit,
                           "lowest": limiter.lowest, "throttles": limiter.throttles})
        return gather_reply(results, limiter)


class TaskTool(Tool):
    name = "task"
    description = ("Hand a self-contained sub-task to a sub-agent with a fresh context and the same tools; returns "
                   "its final reply. Several task calls in one reply run in parallel.")
    input_schema = {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "description": "the complete sub-task"},
            "description": {"type": "string", "description": "a few words naming it"},
            "timeout": {"type": "number", "minimum": 1},
            "max_steps": {"type": "integer", "minimum": 1},
            "agent": AGENT_PARAM,
        },
        "required": ["prompt"],
    }
    read_only = True  # as for swarm: the sub-agent's own calls are approved one by one
    parallel_safe = True

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        agent = ctx.agent
        if agent is None or agent.config.depth >= agent.config.max_depth:
            raise ToolError("this agent is at the sub-agent depth limit and cannot start sub-agents")
        kind = agent_type_of(agent, args)
        label = args.get("description") or args["prompt"].splitlines()[0][:60]
        if kind is not None:
            label = f"{kind.name}: {label}"
        r = await run_subagent(agent, args["prompt"], label=label, tool_use_id=ctx.tool_use_id,
                               item=args["prompt"][:200], timeout=args.get("timeout"), max_steps=args.get("max_steps"),
                               agent_type=kind)
        if r.status == "done":
            return ToolResult(r.text or "[the sub-agent finished without a reply]")
        return ToolResult(f"sub-agent {r.status}" + (f": {r.error}" if r.error else "") +
                          (f"\nits last reply:\n{r.text}" if r.text else ""), is_error=True)
