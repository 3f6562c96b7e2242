"""`moonlet agent run|resume|show|export|export-chat|list`: the agent from the command line.

Exit codes: 0 the task finished (the model ended its turn), 3 a budget, the repeated-call guard or a
hook's "continue": false stopped it (resume to continue), 1 an error or a prompt refused by a
UserPromptSubmit hook, 130 interrupted."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("agent", help="run an agent with tools against moonlet or any Anthropic-compatible endpoint",
                       description="An autonomous agent with tools, context compression, sub-agent swarms and "
                                   "resumable sessions; it speaks the Anthropic Messages API.")
    asub = p.add_subparsers(dest="agent_command", metavar="ACTION")

    run = asub.add_parser("run", help="run a task (no TASK: interactive mode)")
    run.add_argument("task", nargs="?", help="the task; omit it for an interactive session")
    _connection_args(run)
    _agent_args(run)
    run.add_argument("--session-id", help="id for the new session (default: random)")
    run.add_argument("-i", "--interactive", action="store_true", help="stay in interactive mode after TASK")
    run.set_defaults(func=cmd_run)

    res = asub.add_parser("resume", help="continue a session after a stop, crash or kill")
    res.add_argument("session", help="session id (or a unique prefix)")
    res.add_argument("message", nargs="?", help="a new user message to continue with")
    _connection_args(res, resume=True)
    _agent_args(res, resume=True)
    res.add_argument("-i", "--interactive", action="store_true", help="stay in interactive mode afterwards")
    res.set_defaults(func=cmd_resume)

    show = asub.add_parser("show", help="print a session's plan tree, timeline and usage")
    show.add_argument("session")
    show.add_argument("--db", help="session database (default: $MOONLET_HOME/agent/sessions.db)")
    show.set_defaults(func=cmd_show)

    fk = asub.add_parser("fork", help="copy a session as it was at a checkpoint, to continue it another way",
                         description="Create a new session holding SESSION's task, settings and transcript up to "
                                     "its checkpoint of STEP (default: the latest); continue it with `moonlet agent "
                                     "resume NEW MESSAGE`. The original is not changed. Files are shared, not copied.")
    fk.add_argument("session")
    fk.add_argument("--step", type=int, default=None, help="fork from the checkpoint of this step (or the one before)")
    fk.add_argument("--session-id", help="id for the new session (default: random)")
    fk.add_argument("--db")
    fk.set_defaults(func=cmd_fork)

    rw = asub.add_parser("rewind", help="undo the file changes a session's file tools made since a step",
                         description="Restore every file that write_file / str_replace changed (in the session and "
                                     "its sub-agents) since the start of step STEP to what it held before; files "
                                     "they created are deleted. Changes made by shell commands are not tracked. The "
                                     "conversation is kept: tell the agent what was undone when you resume.")
    rw.add_argument("session")
    rw.add_argument("--step", type=int, default=None,
                    help="undo the changes of this step and later ones (default: the last step that changed files)")
    rw.add_argument("--dry-run", action="store_true", help="only list what would be restored")
    rw.add_argument("--db")
    rw.set_defaults(func=cmd_rewind)

    exp = asub.add_parser("export", help="write a session's full trace (sub-agents included) as JSONL")
    exp.add_argument("session")
    exp.add_argument("-o", "--output", help="file to write (default: stdout)")
    exp.add_argument("--db")
    exp.set_defaults(func=cmd_export)

    from .export import register as register_export_chat

    register_export_chat(asub)  # export-chat: sessions as training conversations

    rm = asub.add_parser("rm", help="delete sessions (with their sub-agents) from the session database")
    rm.add_argument("sessions", nargs="+", metavar="SESSION", help="session ids (or unique prefixes)")
    rm.add_argument("--force", action="store_true", help="also delete a session whose status is still 'running' "
                                                         "(one that crashed; never one that is in fact running)")
    rm.add_argument("--db")
    rm.set_defaults(func=cmd_rm)

    pr = asub.add_parser("prune", help="delete sessions inactive for longer than a number of days",
                         description="Delete every top-level session (with its sub-agents, transcripts, traces and "
                                     "file snapshots) whose last activity is older than --older-than days, then "
                                     "compact the database file.")
    pr.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="inactivity in days (> 0)")
    pr.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    pr.add_argument("--db")
    pr.set_defaults(func=cmd_prune)

    pm = asub.add_parser("permissions", help="print the effective permission rules with their sources",
                         description="The allow / ask / deny rules a run in the work directory would use: "
                                     ".moonlet/settings.json, .moonlet/settings.local.json, "
                                     "$MOONLET_HOME/settings.json and the flags given here (or, with --session, "
                                     "the rules saved with that session's flags).")
    pm.add_argument("--workdir", help="work directory (default: current directory, or the session's)")
    pm.add_argument("--session", help="include the --allowed-tools / --disallowed-tools saved with this session")
    pm.add_argument("--db")
    _permission_args(pm)
    pm.set_defaults(func=cmd_permissions)

    ls = asub.add_parser("list", help="list recent sessions")
    ls.add_argument("--db")
    ls.add_argument("-n", type=int, default=20)
    ls.set_defaults(func=cmd_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _connection_args(p, resume: bool = False) -> None:
    g = p.add_argument_group("model endpoint")
    g.add_argument("--model", dest="model_path", help="checkpoint directory to serve in-process (default: the "
                                                      "bundled moonlet-tiny) — ignored with --base-url")
    g.add_argument("--base-url", help="an Anthropic-compatible endpoint (key from ANTHROPIC_API_KEY or MOONLET_API_KEY)")
    g.add_argument("--model-name", help="model name to request (default: the endpoint's first listed model)")
    g.add_argument("--context-window", type=int, help="model context window in tokens (default: asked from the "
                                                      "endpoint, else 200000)")
    g.add_argument("--max-reply-tokens", type=int, help="max_tokens of each model call (default 8192)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--thinking", type=int, metavar="BUDGET", help="enable extended thinking with this token budget")
    g.add_argument("--vision", action=argparse.BooleanOptionalAction, default=None,
                   help="the model takes images: read_file and MCP tools return image blocks (default: from the "
                        "checkpoint's vision_config when served in-process, from the endpoint's model info if it "
                        "says, else off — images are then described in text)")
    g.add_argument("--db", help="session database (default: $MOONLET_HOME/agent/sessions.db)")


def _agent_args(p, resume: bool = False) -> None:
    g = p.add_argument_group("agent")
    g.add_argument("--workdir", help="directory the file tools are confined to (default: current directory)")
    g.add_argument("--yolo", action="store_true", help="approve every tool call without asking")
    g.add_argument("--approval", choices=("ask", "reads", "edits", "yolo", "plan"),
                   help="ask for every call, auto-approve reads (default), edits: reads plus file edits and "
                        "sandboxed shell commands (with --sandbox and no network), approve everything, or plan: "
                        "read-only tools only, the agent answers with a plan (resume with another mode to carry it out)")
    g.add_argument("--sandbox", choices=("on", "off", "auto"),
                   help="run shell commands in a Landlock sandbox: writes only in the work directory, the temp "
                        "directory and --sandbox-allow-write paths, no TCP unless --sandbox-network allows it "
                        "(default off; auto: on where the kernel supports it; on: an error where it does not)")
    g.add_argument("--sandbox-network", metavar="allow|deny|PORTS",
                   help="TCP for sandboxed commands: deny (default), allow, or comma-separated ports they may "
                        "connect to (e.g. 443,8000)")
    g.add_argument("--sandbox-allow-write", action="append", metavar="PATH",
                   help="another path sandboxed commands may write in (repeatable)")
    g.add_argument("--sandbox-allow-read", action="append", metavar="PATH",
                   help="confine sandboxed commands' reads to these paths (repeatable), the writable ones and "
                        "the system directories (default: read everywhere)")
    _permission_args(g, resume)
    g.add_argument("--max-steps", type=int, help="step budget for the session (default 1000)")
    g.add_argument("--max-hours", type=float, help="wall-clock budget for the session in hours")
    g.add_argument("--max-tokens", type=int, help="token budget (input + output of all model calls)")
    g.add_argument("--concurrency", type=int, help="sub-agents a swarm runs at once (default 8)")
    g.add_argument("--compact-at", type=float, help="compact at this fraction of the window (default 0.85)")
    g.add_argument("--keep-turns", type=int, help="recent turns kept verbatim by compaction (default 2)")
    g.add_argument("--max-depth", type=int, help="sub-agent depth limit (default 1: sub-agents start no more)")
    g.add_argument("--tools", help="comma-separated tools to offer (default: all; with the bundled moonlet-tiny: "
                                   "the calculator and read_file it was trained with)")
    g.add_argument("--system-prompt", help="replace the built-in system prompt")
    g.add_argument("--project-instructions", action=argparse.BooleanOptionalAction, default=None,
                   help="add the AGENTS.md files of the project (root down to the work directory) and "
                        "$MOONLET_HOME/agent/AGENTS.md to the system prompt (default: on, except with a "
                        "checkpoint's trained system prompt)")
    g.add_argument("--mcp", action="append", default=[], metavar="NAME=COMMAND|URL",
                   help="an MCP server: a command line (stdio) or an http(s):// URL (Streamable HTTP)")
    g.add_argument("--mcp-config", help="JSON file with {\"mcpServers\": {...}} (stdio, \"type\": \"http\" or "
                                        "\"sse\" servers)")
    g.add_argument("--hooks", metavar="FILE", help="hooks JSON file ({\"hooks\": {EVENT: [...]}}); replaces the "
                                                   "default files" + ("" if not resume else " and the session's saved hooks"))
    g.add_argument("--no-hooks", action="store_true", help="run no hooks")
    g.add_argument("--max-stop-blocks", type=int, help="consecutive Stop-hook blocks honoured before the agent is "
                                                       "let stop anyway (default 5)")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the final reply")
    g.add_argument("--output-format", choices=("text", "json", "stream-json"), default="text",
                   help="text (default): the reply streamed as it comes; json: one JSON object with the result, "
                        "session id, stop reason and usage at the end; stream-json: one JSON object per line for "
                        "every reply, tool call and result, then the result object (needs a task, not interactive)")
    g.add_argument("--show-thinking", action="store_true")


def _permission_args(g, resume: bool = False) -> None:
    again = " (replaces the session's saved ones)" if resume else ""
    g.add_argument("--allowed-tools", nargs="+", action="append", metavar="RULE",
                   help="allow rules for this session, e.g. read_file 'shell(git diff:*)' 'write_file(src/**)': "
                        "matching calls run without asking" + again)
    g.add_argument("--disallowed-tools", nargs="+", action="append", metavar="RULE",
                   help="deny rules for this session: matching calls are refused without asking" + again)


def _cli_rules(args, saved: dict | None) -> dict:
    """The --allowed-tools / --disallowed-tools rules of this run: the flags given now, else (on
    resume) the ones saved with the session. Each list is replaced separately."""
    from .permissions import split_rule_args
    kept = dict((saved or {}).get("permissions") or {})
    out = {}
    for kind, flag in (("allow", "allowed_tools"), ("deny", "disallowed_tools")):
        given = split_rule_args(getattr(args, flag, None))
        out[kind] = given if given else list(kept.get(kind) or [])
    return out


def _store(args):
    from .store import SessionStore, default_db_path
    return SessionStore(args.db or os.environ.get("MOONLET_AGENT_DB") or default_db_path())


class Session:
    """Everything a run needs, opened together and closed together."""

    def __init__(self, args, saved: dict | None = None):
        self.args = args
        self.saved = saved or {}
        self.local = None
        self.client = None
        self.mcp_clients = []
        self.mcp_tools = []
        self.roots: list[str] = []  # directories MCP servers get for roots/list: the work directory first
        self.vision: bool | None = None  # what the model says about itself (None: it does not say)

    def launch(self) -> dict:
        a, s = self.args, self.saved.get("launch", {})
        tools = [t.strip() for t in a.tools.split(",") if t.strip()] if a.tools else s.get("tools")
        return {"base_url": a.base_url or s.get("base_url"), "model_path": a.model_path or s.get("model_path"),
                "model_name": a.model_name or s.get("model_name"), "tools": tools,
                "tool_overrides": s.get("tool_overrides"), "system_prompt": s.get("system_prompt"),
                "mcp": a.mcp or s.get("mcp", []), "mcp_config": a.mcp_config or s.get("mcp_config")}

    async def open(self):
        from .client import AnthropicClient, api_key_from_env
        from .tools.mcp import McpServerConfig, load_mcp_config, start_mcp_servers

        launch = self.launch()
        configs = [McpServerConfig.parse(s) for s in launch["mcp"]]  # a bad MCP config fails before anything starts
        if launch["mcp_config"]:
            configs += load_mcp_config(launch["mcp_config"])
        window = self.args.context_window
        if launch["base_url"]:
            url = launch["base_url"]
        else:
            if not self.saved:
                from .profiles import model_profile
                # a small trained model (the bundled one included) only knows the tools it was trained with
                profile = model_profile(launch["model_path"])
                if profile:
                    launch["tools"] = launch["tools"] or profile["tools"]
                    launch["tool_overrides"] = profile["overrides"]
                    launch["system_prompt"] = profile["system_prompt"]
                    launch["temperature"] = profile["temperature"]
            from .local import LocalServer
            self.local = LocalServer(launch["model_path"])
            if not self.args.quiet:
                print(f"starting moonlet's server for {launch['model_path'] or 'the bundled moonlet-tiny'}...",
                      file=sys.stderr)
            url = await asyncio.to_thread(self.local.start)
            window = window or self.local.context_window
        self.client = AnthropicClient(url, api_key_from_env())
        model = launch["model_name"] or (self.local.model_name if self.local else None)
        if not model:
            try:
                models = await self.client.list_models()
                model = models[0]["id"] if models else None
            except Exception:
                model = None
            if not model:
                raise ValueError(f"could not list the models of {url}; pass --model-name")
        info = None
        if not window:
            info = await self.client.model_info(model) or {}
            window = next((int(info[k]) for k in ("max_input_tokens", "context_window", "max_model_len")
                           if isinstance(info.get(k), int)), None)
        if self.local is not None:
            self.vision = self.local.vision
        elif launch["base_url"] and self.args.vision is None and not self.saved:
            if info is None:
                info = await self.client.model_info(model) or {}
            self.vision = vision_from_model_info(info)
        if configs:
            self.mcp_clients, self.mcp_tools = await start_mcp_servers(configs, roots=self.roots)
        launch["model_name"] = model
        return launch, model, window

    async def close(self):
        for c in self.mcp_clients:
            await c.close()
        if self.client is not None:
            await self.client.aclose()
        if self.local is not None:
            await asyncio.to_thread(self.local.stop)


def vision_from_model_info(info: dict) -> bool | None:
    """Whether a `GET /v1/models/{id}` answer says the model takes images: a boolean `vision`, a
    `capabilities` object or list naming vision/image input, or `input_modalities` holding "image".
    None when it says nothing (moonlet's own server and Anthropic's do not): the agent then
    stays text-only unless --vision is given."""
    if not isinstance(info, dict):
        return None
    if isinstance(info.get("vision"), bool):
        return info["vision"]
    caps = info.get("capabilities")
    if isinstance(caps, dict):
        for key in ("vision", "image_input", "images"):
            value = caps.get(key)
            if isinstance(value, bool):
                return value
            if isinstance(value, dict) and isinstance(value.get("supported"), bool):
                return value["supported"]
    if isinstance(caps, list) and all(isinstance(c, str) for c in caps):
        return any(c.lower() in ("vision", "image", "image_input") for c in caps)
    modalities = info.get("input_modalities")
    if modalities is None and isinstance(info.get("modalities"), dict):
        modalities = info["modalities"].get("input")
    if isinstance(modalities, list):
        return "image" in modalities
    return None


def _apply_overrides(config, args) -> None:
    b, c = config.budgets, config.compaction
    for name, target, attr in (("max_steps", b, "max_steps"), ("max_hours", b, "max_hours"),
                               ("max_tokens", b, "max_tokens"), ("compact_at", c, "threshold"),
                               ("keep_turns", c, "keep_turns"), ("concurrency", config, "swarm_concurrency"),
                               ("max_depth", config, "max_depth"), ("max_reply_tokens", config, "max_tokens"),
                               ("temperature", config, "temperature"), ("context_window", config, "context_window"),
                               ("max_stop_blocks", config, "max_stop_blocks")):
        value = getattr(args, name, None)
        if value is not None:
            setattr(target, attr, value)
    if getattr(args, "thinking", None) is not None:
        from .loop import MIN_THINKING_BUDGET
        if args.thinking < MIN_THINKING_BUDGET or args.thinking >= config.max_tokens:
            raise ValueError(f"--thinking {args.thinking}: the thinking budget must be at least {MIN_THINKING_BUDGET} "
                             f"and below the reply limit ({config.max_tokens} tokens); lower --thinking or raise "
                             f"--max-reply-tokens")
        config.thinking = {"type": "enabled", "budget_tokens": args.thinking}


def _hooks(args, workdir: str, saved: dict | None):
    """The hooks for this run: none with --no-hooks; --hooks FILE alone; on resume the hooks saved in
    the session; else .moonlet/hooks.json in the work directory then $MOONLET_HOME/agent/hooks.json."""
    from .hooks import HookRunner, HooksConfig, discover_hooks
    if args.no_hooks:
        return None
    if args.hooks:
        config = HooksConfig.load(args.hooks)
    elif saved is not None and "hooks" in saved:
        config = HooksConfig.parse(saved["hooks"] or {}, "the session's saved hooks")
    else:
        config = discover_hooks(workdir)
    return HookRunner(config) if config else None


def _sandbox(args, saved: dict | None, workdir: str):
    """The sandbox setting for this run: the saved session's, with the flags given now replacing its
    parts (paths made absolute against the current directory). Checked here, before the model
    starts: ``on`` without Landlock and allowed paths that do not exist are errors."""
    from .sandbox import SandboxConfig, resolve_policy
    config = SandboxConfig.from_dict(((saved or {}).get("agent") or {}).get("sandbox"))
    if args.sandbox is not None:
        config.mode = args.sandbox
    if args.sandbox_network is not None:
        config.network = args.sandbox_network
    if args.sandbox_allow_write:
        config.allow_write = [os.path.abspath(p) for p in args.sandbox_allow_write]
    if args.sandbox_allow_read:
        config.allow_read = [os.path.abspath(p) for p in args.sandbox_allow_read]
    config.__post_init__()  # (a bad --sandbox-network)
    given = [f for f, v in (("--sandbox-network", args.sandbox_network), ("--sandbox-allow-write",
             args.sandbox_allow_write), ("--sandbox-allow-read", args.sandbox_allow_read)) if v]
    if config.mode == "off" and given:
        raise ValueError(f"{', '.join(given)} set the shell sandbox's policy, and the sandbox is off; add "
                         "--sandbox on (or auto), or leave them out")
    resolve_policy(config, workdir)
    return config


def _approval(args, saved_mode: str | None, rules=None, workdir: str | None = None):
    from .approval import ApprovalPolicy, terminal_prompt
    settings_mode = rules.default_mode(workdir) if rules is not None and workdir is not None else None
    mode = "yolo" if args.yolo else (args.approval or saved_mode or settings_mode or "reads")
    return ApprovalPolicy(mode, terminal_prompt if sys.stdin.isatty() else None, rules)


def _events(args):
    from .events import AgentEvents, JsonEvents, TerminalEvents
    fmt = getattr(args, "output_format", "text")
    if fmt == "stream-json":
        return JsonEvents()
    return AgentEvents() if args.quiet or fmt == "json" else TerminalEvents(show_thinking=args.show_thinking)


def _json_output(args) -> bool:
    return getattr(args, "output_format", "text") in ("json", "stream-json")


def _print_result(agent, result, code: int, started: float) -> None:
    """The ``result`` object of --output-format json / stream-json (one line on stdout)."""
    s = agent.state
    record = {"type": "result", "session_id": agent.session_id, "exit_code": code, "is_error": code != 0,
              "stop_reason": "interrupted" if result is None else result.stop_reason,
              "result": None if result is None else result.text, "steps": s.steps,
              "duration_s": round(time.time() - started, 3),
              "usage": {"input_tokens": s.input_tokens, "output_tokens": s.output_tokens},
              "compactions": s.compactions}
    if code == 3:
        record["resume"] = f"moonlet agent resume {agent.session_id}"
    print(json.dumps(record, ensure_ascii=False), flush=True)


async def _turn(agent, prompt):
    """Run one turn; Ctrl-C cancels it (the agent rolls back to its last checkpoint)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(agent.run(prompt))
    try:
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):
        pass  # no signal handlers off the main thread or on Windows; Ctrl-C then ends the process as usual
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return None
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass


async def _interactive(agent, args, commands: dict) -> int:
    from .commands import expand_prompt
    from .tools.notes import render_todos
    print(f"interactive session {agent.session_id} — /help for commands, /exit or Ctrl-D to leave", file=sys.stderr)
    while True:
        sys.stderr.write("\n> ")
        sys.stderr.flush()
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        custom = expand_prompt(line, commands)
        if custom is not None:
            line = custom
        elif line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/help":
                print("/compact [instructions]  summarize the older context now\n/todo  show the to-do list\n"
                      "/pin NOTE  pin a note that survives compaction\n/usage  tokens and steps so far\n"
                      "/exit  leave (the session can be resumed)", file=sys.stderr)
                for c in commands.values():
                    print(f"/{c.name} ARGS  {c.description or '(custom command)'}", file=sys.stderr)
            elif cmd == "/compact":
                from .loop import CompactBlocked
                try:
                    await agent.compact(rest.strip() or None, reason="/compact")
                except CompactBlocked as e:
                    print(f"[compaction refused by a PreCompact hook: {e}]", file=sys.stderr)
                agent.checkpoint()
            elif cmd == "/todo":
                print(render_todos(agent.state.todos), file=sys.stderr)
            elif cmd == "/pin":
                if rest.strip():
                    agent.state.notes.append(rest.strip())
                    agent.checkpoint()
            elif cmd == "/usage":
                s = agent.state
                print(f"steps {s.steps}, input tokens {s.input_tokens}, output tokens {s.output_tokens}, "
                      f"compactions {s.compactions}, context ~{agent.last_tokens} of {agent.config.context_window}",
                      file=sys.stderr)
            else:
                print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
            continue
        result = await _turn(agent, line)
        if result is None:
            print("\n[interrupted; the turn was rolled back]", file=sys.stderr)
        elif args.quiet:
            print(result.text, flush=True)
        elif result.stop_reason != "end_turn":
            print(f"[stopped: {result.stop_reason}]", file=sys.stderr)


def _finish(agent, result, args) -> int:
    if result is None:
        print(f"\n[interrupted — continue with: moonlet agent resume {agent.session_id}]", file=sys.stderr)
        return 130
    if result.stop_reason == "prompt_blocked":
        print(f"[prompt refused by a UserPromptSubmit hook: {result.text}]", file=sys.stderr)
        return 1
    if args.quiet and not _json_output(args):
        print(result.text)
    if result.stop_reason == "end_turn":
        return 0
    print(f"[stopped: {result.stop_reason} — continue with: moonlet agent resume {agent.session_id}]",
          file=sys.stderr)
    return 3


async def _run_async(args, resume: bool) -> int:
    from .loop import Agent, AgentConfig
    from .profiles import apply_profile
    from .tools import Workspace, make_tools

    if _json_output(args) and (args.interactive or (not resume and not args.task)):
        raise ValueError(f"--output-format {args.output_format} is for runs without a terminal conversation: give "
                         "the TASK and leave out -i (or use --output-format text)")
    store = _store(args)
    saved = None
    if resume:
        session = store.find_session(args.session)
        if session["parent_id"]:
            raise ValueError(f"session {session['id']} is a sub-agent of {session['parent_id']}; resume the parent")
        saved = session["config"]
    workdir = args.workdir or (saved or {}).get("workdir") or os.getcwd()
    hooks = _hooks(args, workdir, saved)  # a bad hooks file fails here, before anything starts
    sandbox = _sandbox(args, saved, workdir)  # so does an impossible sandbox
    from .permissions import load_rules

    cli_rules = _cli_rules(args, saved)
    rules = load_rules(workdir, cli_rules)  # and a bad settings file or rule
    from .commands import expand_prompt, load_commands

    commands = load_commands(workdir)  # custom /commands (a bad file fails here too)
    task = getattr(args, "task", None)  # (resume has a MESSAGE instead)
    task = task and (expand_prompt(task, commands) or task)
    message = getattr(args, "message", None)
    message = message and (expand_prompt(message, commands) or message)
    sess = Session(args, saved)
    sess.roots = [os.path.realpath(workdir)]
    try:
        launch, model, window = await sess.open()
        if resume:
            config = AgentConfig.from_dict(saved["agent"])
        else:
            config = AgentConfig()
        config.model = model
        if window and not args.context_window:
            config.context_window = window
        _apply_overrides(config, args)
        workspace = Workspace(workdir)
        if args.system_prompt:
            config.system_prompt = args.system_prompt
        elif launch.get("system_prompt") and not resume:
            config.system_prompt = launch["system_prompt"]
        if args.temperature is None and launch.get("temperature") is not None and not resume:
            config.temperature = launch["temperature"]  # the checkpoint's evaluated sampling
        if getattr(args, "project_instructions", None) is not None:
            config.project_instructions = args.project_instructions
        elif launch.get("system_prompt") and not resume and not args.system_prompt:
            config.project_instructions = False  # a small model's trained prompt: keep it as trained
        config.sandbox = sandbox
        if args.vision is not None:
            config.vision = args.vision
        elif sess.vision is not None:  # (a resumed remote session keeps what it was started with)
            config.vision = sess.vision

        def factory(depth):
            return apply_profile(make_tools(depth, config.max_depth, sources=sess.mcp_clients), launch.get("tools"),
                                 launch.get("tool_overrides"))

        approval = _approval(args, (saved or {}).get("approval"), rules, workdir)
        kwargs = dict(events=_events(args), approval=approval, tool_factory=factory, hooks=hooks)
        if resume:
            agent = Agent.restore(store, session["id"], sess.client, factory(0), workspace, config=config, **kwargs)
        else:
            agent = Agent(sess.client, config, factory(0), workspace, store, task=task or "(interactive)",
                          session_id=args.session_id, **kwargs)
        full = dict(agent._session_config(), launch={k: v for k, v in launch.items()}, permissions=cli_rules)
        store.update_config(agent.session_id, full)
        if getattr(args, "output_format", "text") == "stream-json":
            agent.events.emit(agent, "init", model=model, workdir=str(workspace.root), tools=agent.tools.names(),
                              approval=approval.mode, context_window=config.context_window, resumed=resume,
                              sandbox=agent.sandbox.describe() if agent.sandbox else "off",
                              instructions=[path for path, _ in agent.instructions.files])
        if not args.quiet:
            print(f"session {agent.session_id} · model {model} · window {config.context_window} · workdir "
                  f"{workspace.root} · approval {approval.mode}", file=sys.stderr)
            if agent.sandbox is not None:
                print(f"sandbox: {agent.sandbox.describe()}", file=sys.stderr)
            elif config.sandbox.mode == "auto":
                from .sandbox import probe
                print(f"sandbox: off (auto: {probe()[1]})", file=sys.stderr)
            if agent.instructions:
                print(f"instructions: {', '.join(path for path, _ in agent.instructions.files)}", file=sys.stderr)
            if agent.agent_types:
                print(f"sub-agent types: {', '.join(agent.agent_types)}", file=sys.stderr)
            if rules:
                counts = {k: sum(r.kind == k for r in rules.rules) for k in ("allow", "ask", "deny")}
                print("permission rules: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) +
                      " (moonlet agent permissions lists them)", file=sys.stderr)
            if agent.hooks:
                n = sum(len(g.hooks) for groups in agent.hooks.config.events.values() for g in groups)
                print(f"hooks: {n} from {', '.join(agent.hooks.config.sources)}", file=sys.stderr)
        end_reason = "other"
        try:
            code = 0
            if resume:
                pending = agent.messages and agent.messages[-1]["role"] == "user"
                if message or pending:
                    started = time.time()
                    result = await _turn(agent, message if message else None)
                    code = _finish(agent, result, args)
                    if _json_output(args):
                        _print_result(agent, result, code, started)
                elif not args.interactive:
                    print(f"session {agent.session_id} has no unfinished turn; give a MESSAGE or -i to continue it",
                          file=sys.stderr)
            elif args.task:
                started = time.time()
                result = await _turn(agent, task)
                code = _finish(agent, result, args)
                if _json_output(args):
                    _print_result(agent, result, code, started)
            if (args.interactive or not (args.task if not resume else True)) and code in (0, 3):
                code = await _interactive(agent, args, commands)
                end_reason = "prompt_input_exit"
            if code == 130:
                end_reason = "interrupted"
            return code
        except BaseException:
            end_reason = "error"
            raise
        finally:
            try:
                await agent.end_session(end_reason)
            finally:
                await agent.close()
    finally:
        await sess.close()
        store.close()


def _main(args, resume: bool) -> int:
    from .client import APIError
    from .loop import ContextTooSmall
    from .tools.base import ToolError
    from .tools.mcp import McpError
    try:
        return asyncio.run(_run_async(args, resume))
    except (APIError, ContextTooSmall, McpError, RuntimeError, ToolError) as e:
        # the session (if one started) is saved; say what failed and how to go on
        print(f"moonlet agent: error: {e}", file=sys.stderr)
        return 1


def cmd_run(args) -> int:
    return _main(args, resume=False)


def cmd_resume(args) -> int:
    return _main(args, resume=True)


# -- inspection ------------------------------------------------------------------------------------
def _ts(t: float, t0: float) -> str:
    d = max(0.0, t - t0)
    return f"{int(d // 3600):02d}:{int(d % 3600 // 60):02d}:{d % 60:04.1f}"


def _plan_tree(store, sid: str, depth: int = 0, out=None) -> list[str]:
    out = out if out is not None else []
    s = store.get_session(sid)
    steps = sum(1 for u in store.usage(sid) if u["purpose"] == "step")
    label = s["label"] or (s["task"] or "")[:70].replace("\n", " ")
    out.append(f"{'  ' * depth}{'└─ ' if depth else ''}{sid} [{s['status']}] {label} ({steps} steps)")
    cps = store.checkpoints(sid)
    todos = cps[-1]["state"].get("todos", []) if cps else []
    for t in todos:
        mark = {"done": "x", "in_progress": "~"}.get(t.get("status"), " ")
        out.append(f"{'  ' * (depth + 1)}[{mark}] {t.get('title')}")
    children = store.children(sid)
    if len(children) > 20:
        counts: dict[str, int] = {}
        for c in children:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        out.append(f"{'  ' * (depth + 1)}└─ {len(children)} sub-agents: " +
                   ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        for c in children:
            if c["status"] not in ("done",):
                _plan_tree(store, c["id"], depth + 1, out)
    else:
        for c in children:
            _plan_tree(store, c["id"], depth + 1, out)
    return out


def show_session(store, sid: str) -> str:
    s = store.get_session(sid)
    t0 = s["created_at"]
    cfg = s["config"] or {}
    lines = [f"session {sid}  status {s['status']}  model {cfg.get('agent', {}).get('model')}  "
             f"workdir {cfg.get('workdir')}",
             f"created {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))}, last update "
             f"{_ts(s['updated_at'], t0)} later", f"task: {s['task']}"]
    if s["error"]:
        lines.append(f"error: {s['error']}")
    lines += ["", "plan:"] + ["  " + l for l in _plan_tree(store, sid)]
    lines += ["", "timeline:"]
    rows = []
    for u in store.usage(sid):
        rows.append((u["started_at"], f"step {u['step']:<4} model call {u['duration_s']:.1f}s  in {u['input_tokens']} "
                                      f"out {u['output_tokens']}  {u['purpose']} → {u['stop_reason']}"))
    for t in store.tool_calls(sid):
        dur = f"{t['finished_at'] - t['started_at']:.1f}s" if t["finished_at"] else "unfinished"
        arg = json.dumps(t["input"], ensure_ascii=False)[:80]
        status = "rejected" if not t["approved"] else ("error" if t["is_error"] else "ok")
        rows.append((t["started_at"], f"step {t['step']:<4} tool {t['name']} {arg} {dur} {status}"))
    for c in store.compactions(sid):
        rows.append((c["created_at"], f"step {c['step']:<4} compaction {c['tokens_before']} → {c['tokens_after']} "
                                      f"tokens: kept {len(c['kept'])} messages, summarized {len(c['summarized'])} "
                                      f"({c['reason']})"))
    for e in store.events(sid):
        if e["kind"] == "hook":
            d = e["data"]
            how = "timed out" if d.get("timed_out") else f"exit {d.get('exit_code')}"
            what = f" {d['effect']}" if d.get("effect") else ""
            err = f" (ignored: {d['error']})" if d.get("error") else ""
            target = f" {d['target']}" if d.get("target") else ""
            rows.append((e["created_at"], f"step {e['step']:<4} hook {d.get('event')}{target} "
                                          f"`{str(d.get('command'))[:60]}` {how} {d.get('duration_s', 0):.1f}s"
                                          f"{what}{err}"))
        elif e["kind"] in ("retry", "budget_stop", "repeat_guard", "resumed", "swarm", "prompt_blocked",
                           "hook_stopped", "stop_hook_limit", "permission_denied"):
            rows.append((e["created_at"], f"{'':10}{e['kind']} {json.dumps(e['data'])[:120]}"))
    for t, text in sorted(rows, key=lambda r: r[0]):
        lines.append(f"  {_ts(t, t0)}  {text}")

    def totals(session_id):
        u = store.usage(session_id)
        tin, tout = sum(x["input_tokens"] for x in u), sum(x["output_tokens"] for x in u)
        calls, secs = len(u), sum(x["duration_s"] for x in u)
        for c in store.children(session_id):
            a, b, n, d = totals(c["id"])
            tin, tout, calls, secs = tin + a, tout + b, calls + n, secs + d
        return tin, tout, calls, secs

    own = store.usage(sid)
    tin, tout, calls, secs = totals(sid)
    lines += ["", "usage:",
              f"  this agent: {len(own)} model calls, {sum(x['input_tokens'] for x in own)} input + "
              f"{sum(x['output_tokens'] for x in own)} output tokens",
              f"  with sub-agents: {calls} model calls, {tin} input + {tout} output tokens, {secs:.1f}s in model calls",
              f"  tool calls: {len(store.tool_calls(sid))}, compactions: {len(store.compactions(sid))}, "
              f"checkpoints: {len(store.checkpoints(sid))}"]
    return "\n".join(lines)


def cmd_show(args) -> int:
    store = _store(args)
    try:
        print(show_session(store, store.find_session(args.session)["id"]))
    finally:
        store.close()
    return 0


def rewind_plan(store, sid: str, step: int | None) -> tuple[int | None, dict[str, bytes | None], dict[str, str]]:
    """(the step undone from, {path: content to restore, None to delete}, {path: why it cannot be
    restored}) for rewinding ``sid``: the earliest snapshot of each path taken since that step began,
    in the session or any sub-agent of it (sub-agents are matched by time: their changes after the
    step's first record count)."""
    sessions = store.session_tree(sid)
    own = store.file_snapshots(sid)
    if step is None:
        if own:
            step = own[-1]["step"]
        else:  # only sub-agents changed files: undo the step that started the last of them
            child = [r for s in sessions[1:] for r in store.file_snapshots(s)]
            if not child:
                return None, {}, {}
            step = max((m["step"] for m in store.messages(sid) if m["created_at"] <= max(r["created_at"] for r in child)),
                       default=0)
    started = min((m["created_at"] for m in store.messages(sid) if m["step"] >= step), default=None)
    rows = [r for r in own if r["step"] >= step]
    if started is not None:
        rows += [r for s in sessions[1:] for r in store.file_snapshots(s) if r["created_at"] >= started]
    rows.sort(key=lambda r: r["created_at"])
    plan: dict[str, bytes | None] = {}
    lost: dict[str, str] = {}
    for r in rows:
        if r["path"] in plan or r["path"] in lost:
            continue
        try:
            plan[r["path"]] = store.snapshot_content(r)
        except ValueError as e:
            lost[r["path"]] = str(e)
    return step, plan, lost


def cmd_fork(args) -> int:
    store = _store(args)
    try:
        new = store.fork(args.session, args.step, args.session_id)
        print(new)
        print(f"forked {args.session} into {new}; continue it with: moonlet agent resume {new} \"MESSAGE\"",
              file=sys.stderr)
        return 0
    finally:
        store.close()


def cmd_rewind(args) -> int:
    store = _store(args)
    try:
        sid = store.find_session(args.session)["id"]
        step, plan, lost = rewind_plan(store, sid, args.step)
        for path, why in sorted(lost.items()):
            print(f"cannot restore {path}: {why}", file=sys.stderr)
        if not plan:
            if not lost:
                print(f"session {sid}: its file tools changed nothing" + (f" since step {step}" if step is not None
                                                                           else ""), file=sys.stderr)
            return 1 if lost else 0
        for path, content in sorted(plan.items()):
            what = "delete (created by the agent)" if content is None else f"restore {len(content)} bytes"
            print(f"{'would ' if args.dry_run else ''}{what}: {path}")
            if args.dry_run:
                continue
            if content is None:
                if os.path.exists(path):
                    os.remove(path)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(content)
        if not args.dry_run:
            store.event(sid, step, "rewind", {"step": step, "files": sorted(plan)})
            print(f"session {sid}: file changes since step {step} undone ({len(plan)} files)", file=sys.stderr)
        return 1 if lost else 0
    finally:
        store.close()


def cmd_export(args) -> int:
    store = _store(args)
    try:
        sid = store.find_session(args.session)["id"]
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            n = 0
            for row in store.trace(sid):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        finally:
            if args.output:
                out.close()
        if args.output:
            print(f"wrote {n} records to {args.output}", file=sys.stderr)
    finally:
        store.close()
    return 0


def cmd_rm(args) -> int:
    store = _store(args)
    try:
        found = []
        for prefix in args.sessions:
            session = store.find_session(prefix)
            if session["parent_id"]:
                raise SystemExit(f"moonlet agent rm: {session['id']} is a sub-agent of {session['parent_id']}; "
                                 "delete the top session")
            if session["status"] == "running" and not args.force:
                raise SystemExit(f"moonlet agent rm: session {session['id']} is 'running' (in flight, or crashed "
                                 "without a stop); pass --force if no process is running it")
            found.append(session["id"])
        for sid in found:
            ids = store.delete_session(sid)
            extra = f" and {len(ids) - 1} sub-agent sessions" if len(ids) > 1 else ""
            print(f"deleted {sid}{extra}", file=sys.stderr)
        store.vacuum()
        return 0
    except ValueError as e:
        raise SystemExit(f"moonlet agent rm: {e}") from None
    finally:
        store.close()


def cmd_prune(args) -> int:
    if not args.older_than > 0:
        raise SystemExit(f"moonlet agent prune: --older-than {args.older_than} must be more than 0 days")
    store = _store(args)
    try:
        stale = store.stale_sessions(args.older_than * 86400)
        for s in stale:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["last_active"]))
            print(f"{'would delete' if args.dry_run else 'delete'} {s['id']}  last active {when}  "
                  f"{(s['task'] or '')[:60]!r}")
            if not args.dry_run:
                store.delete_session(s["id"])
        if stale and not args.dry_run:
            store.vacuum()
        print(f"{len(stale)} sessions {'would be ' if args.dry_run else ''}deleted", file=sys.stderr)
        return 0
    finally:
        store.close()


def cmd_permissions(args) -> int:
    from .permissions import load_rules, settings_files
    saved = None
    if args.session:
        store = _store(args)
        try:
            saved = store.find_session(args.session)["config"] or {}
        finally:
            store.close()
    workdir = os.path.realpath(args.workdir or (saved or {}).get("workdir") or os.getcwd())
    rules = load_rules(workdir, _cli_rules(args, saved))
    print(f"work directory: {workdir}")
    print("settings files: " + ", ".join(f"{p}{'' if os.path.isfile(p) else ' (absent)'}"
                                         for p in settings_files(workdir)))
    if not rules:
        print("no permission rules: the approval mode decides every call")
        return 0
    for kind in ("deny", "ask", "allow"):
        for r in rules.rules:
            if r.kind == kind:
                print(f"{kind:<6} {r.text:<40} {r.source}")
    return 0


def cmd_list(args) -> int:
    store = _store(args)
    try:
        for s in store.list_sessions(args.n):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created_at"]))
            print(f"{s['id']}  {when}  {s['status']:<12} {(s['task'] or '')[:70]!r}")
    finally:
        store.close()
    return 0
