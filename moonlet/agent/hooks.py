"""Hooks: user-defined shell commands that run at points of an agent's life and can observe or steer it.

The configuration has the shape Claude Code uses, so hook scripts written for it carry over:

    {"hooks": {"PreToolUse": [{"matcher": "shell|write_file",
                               "hooks": [{"type": "command", "command": "...", "timeout": 30}]}]}}

Each command runs through bash (sh where there is no bash) in the work directory, in its own process
group, with the event as one JSON object on stdin. Its exit status and output decide what happens:
0 is success (stdout may hold a JSON object with decisions, see `_interpret`), 2 blocks the action
and passes stderr on as the reason, anything else is a non-blocking error. A hook that fails in any
way (crash, timeout, bad JSON) is recorded in the session's events and otherwise ignored: it never
ends the agent. The hooks of one event run in parallel; their effects are combined in config order.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import Agent

EVENTS = ("SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop", "SubagentStop", "PreCompact",
          "SessionEnd", "Notification")
MATCHER_EVENTS = {"PreToolUse": "tool name", "PostToolUse": "tool name", "SessionStart": "source (startup|resume)",
                  "PreCompact": "trigger (manual|auto)", "SessionEnd": "reason",
                  "Notification": "notification_type"}
CONTEXT_EVENTS = ("UserPromptSubmit", "SessionStart", "PreCompact")  # plain stdout is context (instructions)
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0
MAX_CAPTURE = 64 * 1024      # bytes kept of each of a hook's stdout and stderr; the rest is read and dropped
MAX_FEEDBACK = 10_000        # characters of one hook's text that reach the model
MAX_RECORDED = 4_000         # characters of stdout/stderr kept in the session's event record
HOOK_KEYS = {"type", "command", "timeout", "description"}
GROUP_KEYS = {"matcher", "hooks", "description"}
_PLAIN = re.compile(r"^[A-Za-z0-9_|]*$")


class HookConfigError(ValueError):
    """A hooks file that cannot be used; the message names the file, the key path and the fix."""


@dataclass
class HookCommand:
    command: str
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class HookGroup:
    matcher: str | None
    hooks: list[HookCommand]

    def matches(self, target: str | None) -> bool:
        """An empty, missing or "*" matcher matches everything. A matcher of only letters, digits, `_`
        and `|` is a list of exact names ("shell|write_file"); anything else is a regular expression
        searched in the name ("mcp__github__.*", "^read_")."""
        m = self.matcher
        if m in (None, "", "*") or target is None:
            return True
        if _PLAIN.match(m):
            return target in m.split("|")
        return re.search(m, target) is not None


@dataclass
class HooksConfig:
    """Parsed, validated hooks: event name -> groups. `sources` says which files they came from."""
    events: dict[str, list[HookGroup]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.events.values())

    def commands(self, event: str, target: str | None = None) -> list[HookCommand]:
        """The commands to run for `event` (on tool `target`, or SessionStart source), each command
        string once (the first occurrence's timeout), in config order."""
        seen: set[str] = set()
        out = []
        for group in self.events.get(event, []):
            if event in MATCHER_EVENTS and not group.matches(target):
                continue
            for h in group.hooks:
                if h.command not in seen:
                    seen.add(h.command)
                    out.append(h)
        return out

    def to_dict(self) -> dict:
        """The JSON shape (what `parse` reads), for the session config."""
        return {"hooks": {ev: [{**({"matcher": g.matcher} if g.matcher is not None else {}),
                                "hooks": [{"type": "command", "command": h.command, "timeout": h.timeout}
                                          for h in g.hooks]} for g in groups]
                          for ev, groups in self.events.items()},
                "sources": list(self.sources)}

    @classmethod
    def parse(cls, data, source: str = "hooks") -> "HooksConfig":
        """Validate `data` (the decoded JSON). Keys other than "hooks" at the top are ignored, so a
        Claude Code settings.json can be used as it is."""
        def fail(path: str, problem: str) -> HookConfigError:
            return HookConfigError(f"{source}: {path}: {problem}")

        if not isinstance(data, dict):
            raise fail("(top level)", f"expected a JSON object with a \"hooks\" key, got {type(data).__name__}")
        hooks = data.get("hooks", {})
        if not isinstance(hooks, dict):
            raise fail("hooks", f"expected an object mapping event names to lists, got {type(hooks).__name__}")
        config = cls(sources=list(data.get("sources") or [source]) if "sources" in data else [source])
        for event, groups in hooks.items():
            if event not in EVENTS:
                raise fail(f"hooks.{event}", f"moonlet runs no {event!r} hooks; the events are {', '.join(EVENTS)} "
                                             "(names are case-sensitive): rename or remove it")
            if not isinstance(groups, list):
                raise fail(f"hooks.{event}", f"expected a list of {{\"matcher\", \"hooks\"}} objects, "
                                             f"got {type(groups).__name__}")
            parsed = []
            for i, group in enumerate(groups):
                where = f"hooks.{event}[{i}]"
                if not isinstance(group, dict):
                    raise fail(where, f"expected an object with \"hooks\" (and \"matcher\"), got {type(group).__name__}")
                unknown = set(group) - GROUP_KEYS
                if unknown:
                    raise fail(where, f"unknown key(s) {', '.join(sorted(unknown))}; allowed: matcher, hooks")
                matcher = group.get("matcher")
                if matcher is not None:
                    if not isinstance(matcher, str):
                        raise fail(f"{where}.matcher", f"expected a string (a tool name, names joined by |, or a "
                                                       f"regular expression), got {type(matcher).__name__}")
                    if matcher not in ("", "*") and not _PLAIN.match(matcher):
                        try:
                            re.compile(matcher)
                        except re.error as e:
                            raise fail(f"{where}.matcher", f"{matcher!r} is not a valid regular expression ({e})")
                entries = group.get("hooks")
                if not isinstance(entries, list) or not entries:
                    raise fail(f"{where}.hooks", "expected a non-empty list of {\"type\": \"command\", \"command\": "
                                                 "...} objects")
                commands = []
                for j, h in enumerate(entries):
                    hw = f"{where}.hooks[{j}]"
                    if not isinstance(h, dict):
                        raise fail(hw, f"expected an object, got {type(h).__name__}")
                    unknown = set(h) - HOOK_KEYS
                    if unknown:
                        raise fail(hw, f"unknown key(s) {', '.join(sorted(unknown))}; allowed: type, command, timeout")
                    if h.get("type", "command") != "command":
                        raise fail(f"{hw}.type", f"{h.get('type')!r} is not supported; moonlet runs \"command\" hooks")
                    command = h.get("command")
                    if not isinstance(command, str) or not command.strip():
                        raise fail(f"{hw}.command", "expected a non-empty shell command string")
                    timeout = h.get("timeout", DEFAULT_TIMEOUT)
                    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                            or not 0 < timeout <= MAX_TIMEOUT:
                        raise fail(f"{hw}.timeout", f"expected seconds as a number in (0, {MAX_TIMEOUT:g}], "
                                                    f"got {timeout!r}")
                    commands.append(HookCommand(command, float(timeout)))
                parsed.append(HookGroup(matcher, commands))
            config.events[event] = parsed
        return config

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HooksConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HookConfigError(f"hooks file {p} does not exist") from None
        except OSError as e:
            raise HookConfigError(f"cannot read hooks file {p}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HookConfigError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return cls.parse(data, str(p))

    def merged(self, other: "HooksConfig") -> "HooksConfig":
        """Both configs: this one's groups first."""
        events = {ev: list(self.events.get(ev, [])) + list(other.events.get(ev, [])) for ev in EVENTS
                  if self.events.get(ev) or other.events.get(ev)}
        return HooksConfig(events, self.sources + other.sources)


def user_hooks_path() -> Path:
    home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
    return Path(home) / "agent" / "hooks.json"


def project_hooks_path(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / ".moonlet" / "hooks.json"


def discover_hooks(workdir: str | os.PathLike, explicit: str | None = None) -> HooksConfig:
    """`explicit` (--hooks FILE) alone when given; otherwise the work directory's .moonlet/hooks.json
    followed by $MOONLET_HOME/agent/hooks.json, both when both exist (project hooks run first)."""
    if explicit:
        return HooksConfig.load(explicit)
    config = HooksConfig()
    for path in (project_hooks_path(workdir), user_hooks_path()):
        if path.is_file():
            config = config.merged(HooksConfig.load(path))
    return config


# -- running ----------------------------------------------------------------------------------------
@dataclass
class HookRun:
    """One command's run: what it printed, how it ended, and what it asked for."""
    event: str
    command: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    timed_out: bool = False
    error: str | None = None          # why the run is ignored (crash, timeout, bad output)
    effect: str | None = None         # block | allow | deny | ask | update | context | halt (what it did)

    def record(self) -> dict:
        def cap(s: str) -> str:
            return s if len(s) <= MAX_RECORDED else s[:MAX_RECORDED] + f"\n[... {len(s) - MAX_RECORDED} more characters]"
        return {"event": self.event, "command": self.command, "exit_code": self.exit_code,
                "duration_s": round(self.duration_s, 3), "timed_out": self.timed_out, "error": self.error,
                "effect": self.effect, "stdout": cap(self.stdout), "stderr": cap(self.stderr)}


@dataclass
class HookOutcome:
    """The combined effect of an event's hooks."""
    blocked: bool = False
    reasons: list[str] = field(default_factory=list)      # why it was blocked (for the model or the user)
    permission: str | None = None                         # PreToolUse: allow | ask | deny (deny wins, then ask)
    context: list[str] = field(default_factory=list)      # text to add for the model
    halt: str | None = None                               # "continue": false: end the turn, with this reason
    updated_input: dict | None = None                     # PreToolUse "updatedInput": the input to run instead
    messages: list[str] = field(default_factory=list)     # systemMessage texts, for the user
    runs: list[HookRun] = field(default_factory=list)

    def reason(self) -> str:
        return "\n".join(r for r in self.reasons if r) or "(the hook gave no reason)"


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_FEEDBACK else text[:MAX_FEEDBACK] + f"\n[... {len(text) - MAX_FEEDBACK} more characters]"


async def _read_capped(stream, limit: int = MAX_CAPTURE) -> str:
    kept = bytearray()
    dropped = 0
    while chunk := await stream.read(65536):
        room = limit - len(kept)
        kept.extend(chunk[:max(room, 0)])
        dropped += max(0, len(chunk) - max(room, 0))
    text = kept.decode("utf-8", "replace")
    return text + (f"\n[... {dropped} more bytes dropped]" if dropped else "")


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_SHELL = shutil.which("bash") or "/bin/sh"


async def run_command(hook: HookCommand, payload: dict, cwd: str, env: dict) -> HookRun:
    """Run one hook command with `payload` on stdin; never raises (except on cancellation)."""
    run = HookRun(payload.get("hook_event_name", ""), hook.command)
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            _SHELL, "-c", hook.command, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as e:
        run.error = f"could not start: {e}"
        run.duration_s = time.monotonic() - t0
        return run

    async def feed() -> None:
        try:
            proc.stdin.write(json.dumps(payload, ensure_ascii=False).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # a hook need not read its input
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def whole() -> tuple[str, str]:
        _, out, err = await asyncio.gather(feed(), _read_capped(proc.stdout), _read_capped(proc.stderr))
        await proc.wait()
        return out, err

    task = asyncio.ensure_future(whole())
    try:
        run.stdout, run.stderr = await asyncio.wait_for(asyncio.shield(task), hook.timeout)
        run.exit_code = proc.returncode
    except asyncio.TimeoutError:
        _kill_group(proc)
        run.timed_out = True
        run.error = f"timed out after {hook.timeout:g}s (its process group was killed)"
        try:
            run.stdout, run.stderr = await asyncio.wait_for(task, 5)
        except (asyncio.TimeoutError, Exception):
            task.cancel()
        run.exit_code = proc.returncode
    except asyncio.CancelledError:
        _kill_group(proc)
        task.cancel()
        raise
    finally:
        run.duration_s = time.monotonic() - t0
    if run.exit_code is not None and run.exit_code not in (0, 2) and not run.timed_out:
        run.error = f"exited with status {run.exit_code} (not 0 or 2: ignored)"
    return run


def _interpret(event: str, run: HookRun, outcome: HookOutcome) -> None:
    """Fold one run into the outcome. Exit 2 blocks with stderr as the reason. Exit 0 with a JSON
    object on stdout may set: "continue": false (+ "stopReason") to end the turn; "decision": "block"
    with "reason" (PreToolUse also takes the older "approve"); "systemMessage" for the user;
    "hookSpecificOutput": {"permissionDecision": allow|deny|ask, "permissionDecisionReason",
    "updatedInput" (PreToolUse: the tool input to run instead), "additionalContext"}. Plain stdout of a
    UserPromptSubmit, SessionStart or PreCompact hook is context (for PreCompact: summary instructions)."""
    if run.error is not None:
        return
    if run.exit_code == 2:
        run.effect = "block"
        outcome.blocked = True
        outcome.reasons.append(_clip(run.stderr) or f"(a {event} hook exited with status 2 and printed no reason)")
        if event == "PreToolUse":
            outcome.permission = "deny"
        return
    out = run.stdout.strip()
    if not out:
        return
    if not out.startswith("{"):
        if event in CONTEXT_EVENTS:
            run.effect = "context"
            outcome.context.append(_clip(out))
        return
    try:
        data = json.loads(out)
    except json.JSONDecodeError as e:
        run.error = f"stdout starts with '{{' but is not valid JSON ({e.msg} at line {e.lineno}): ignored"
        return
    if not isinstance(data, dict):
        run.error = "stdout JSON is not an object: ignored"
        return
    problems = []
    specific = data.get("hookSpecificOutput") or {}
    if not isinstance(specific, dict):
        problems.append("hookSpecificOutput is not an object")
        specific = {}
    decision = data.get("decision")
    reason = data.get("reason")
    effects = []
    if decision is not None:
        if decision == "block":
            effects.append("block")
            outcome.blocked = True
            outcome.reasons.append(_clip(str(reason)) if reason else f"(a {event} hook blocked without a reason)")
            if event == "PreToolUse":
                _permission(outcome, "deny")
        elif decision == "approve" and event == "PreToolUse":
            effects.append("allow")
            _permission(outcome, "allow")
        else:
            problems.append(f"decision {decision!r} is not \"block\"" +
                            (" or \"approve\"" if event == "PreToolUse" else ""))
    perm = specific.get("permissionDecision")
    if perm is not None:
        if event != "PreToolUse" or perm not in ("allow", "deny", "ask"):
            problems.append(f"permissionDecision {perm!r} is not allow, deny or ask of a PreToolUse hook")
        else:
            effects.append(perm)
            _permission(outcome, perm)
            why = specific.get("permissionDecisionReason")
            if perm == "deny":
                outcome.blocked = True
                outcome.reasons.append(_clip(str(why)) if why else "(a PreToolUse hook denied the call)")
            elif why:
                outcome.messages.append(f"{perm}: {_clip(str(why))}")
    updated = specific.get("updatedInput")
    if updated is not None:
        if event != "PreToolUse" or not isinstance(updated, dict):
            problems.append("updatedInput must be an object, from a PreToolUse hook")
        else:
            effects.append("update")
            outcome.updated_input = updated  # several hooks: the last in config order wins
    extra = specific.get("additionalContext")
    if extra:
        effects.append("context")
        outcome.context.append(_clip(str(extra)))
    if data.get("continue") is False:
        effects.append("halt")
        outcome.halt = str(data.get("stopReason") or f"a {event} hook stopped the agent")
    if data.get("systemMessage"):
        outcome.messages.append(_clip(str(data["systemMessage"])))
    run.effect = ",".join(effects) or None
    if problems:
        run.error = "; ".join(problems) + " (those fields were ignored)"


def _permission(outcome: HookOutcome, value: str) -> None:
    rank = {None: 0, "allow": 1, "ask": 2, "deny": 3}
    if rank[value] > rank[outcome.permission]:
        outcome.permission = value


class HookRunner:
    """Runs the configured hooks for an agent (and its sub-agents) and records every run."""

    def __init__(self, config: HooksConfig):
        self.config = config

    def active(self, event: str, target: str | None = None) -> bool:
        return bool(self.config.commands(event, target))

    async def run(self, agent: "Agent", event: str, fields: dict, target: str | None = None) -> HookOutcome:
        outcome = HookOutcome()
        commands = self.config.commands(event, target)
        if not commands:
            return outcome
        root = str(agent.workspace.root)
        payload = {"session_id": agent.session_id, "cwd": root, "hook_event_name": event,
                   "approval_mode": agent.approval.mode, "agent_depth": agent.config.depth, **fields}
        if agent.label:
            payload["agent_label"] = agent.label
        env = dict(os.environ, MOONLET_PROJECT_DIR=root, CLAUDE_PROJECT_DIR=root,
                   MOONLET_SESSION_ID=agent.session_id, MOONLET_HOOK_EVENT=event)
        runs = await asyncio.gather(*(run_command(h, payload, root, env) for h in commands))
        for run in runs:
            _interpret(event, run, outcome)
            outcome.runs.append(run)
            data = run.record()
            if target is not None:
                data["target"] = target
            agent.store.event(agent.session_id, agent.state.steps, "hook", data)
            agent.events.hook(agent, run)
        for m in outcome.messages:
            agent.events.hook_message(agent, event, m)
        return outcome
