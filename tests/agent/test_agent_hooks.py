"""Hooks against the scripted endpoint: each hook is a small Python script written into the test's
directory and run with this interpreter. Checked by their effects (a file a blocked tool would have
written is absent, what the next request carries, what the session recorded) rather than by the
hook code's own view of itself."""

import asyncio
import json
import shlex
import subprocess
import sys
import time

import pytest
from agent_scripted import (Reply, ScriptedEndpoint, blocks, last_results, make_agent, result_text, text, tool,
                            tool_results)

from moonlet.agent.hooks import HookConfigError, HookGroup, HooksConfig, discover_hooks
from moonlet.agent.store import SessionStore


def hook(tmp_path, name: str, body: str) -> str:
    """A hook command: a Python script that has the event as `ev` and appends it to NAME.log."""
    path = tmp_path / f"{name}.py"
    log = tmp_path / f"{name}.log"
    path.write_text("import json, os, sys\nev = json.load(sys.stdin)\n"
                    f"with open({str(log)!r}, 'a') as f:\n"
                    "    f.write(json.dumps(dict(ev, _env=os.environ.get('MOONLET_PROJECT_DIR'))) + '\\n')\n" + body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


def logged(tmp_path, name: str) -> list[dict]:
    p = tmp_path / f"{name}.log"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def cfg(event: str, command: str, matcher: str | None = None, timeout: float | None = None, *more) -> dict:
    entry = {"type": "command", "command": command, **({"timeout": timeout} if timeout else {})}
    group = {"hooks": [entry], **({"matcher": matcher} if matcher is not None else {})}
    return {"hooks": {event: [group, *more]}}


def merge(*configs: dict) -> dict:
    out: dict = {"hooks": {}}
    for c in configs:
        for ev, groups in c["hooks"].items():
            out["hooks"].setdefault(ev, []).extend(groups)
    return out


async def _run(agent, *prompts):
    try:
        return [await agent.run(p) for p in prompts]
    finally:
        await agent.close()
        await agent.client.aclose()


def hook_events(agent) -> list[dict]:
    return [e["data"] for e in agent.store.events(agent.session_id) if e["kind"] == "hook"]


def test_pre_tool_use_exit_2_blocks_even_under_yolo(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    guard = hook(tmp_path, "guard", "if 'rm -rf' in ev['tool_input'].get('command', ''):\n"
                                    "    print('rm -rf is not allowed here', file=sys.stderr)\n    sys.exit(2)\n")

    def script(body):
        n = len(tool_results(body))
        if n == 0:
            return Reply([tool("shell", {"command": "touch blocked.txt; rm -rf nothing"})])
        if n == 1:
            return Reply([tool("shell", {"command": "touch allowed.txt"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, work, approval="yolo", hooks=cfg("PreToolUse", guard, "shell"))
        asyncio.run(_run(agent, "go"))
    first = last_results(ep.requests[1])[0]
    assert first["is_error"] and "rm -rf is not allowed here" in result_text(first)
    assert not (work / "blocked.txt").exists() and (work / "allowed.txt").exists()
    calls = agent.store.tool_calls(agent.session_id)
    assert [c["approved"] for c in calls] == [0, 1]
    seen = logged(tmp_path, "guard")
    assert [e["hook_event_name"] for e in seen] == ["PreToolUse", "PreToolUse"]
    assert seen[0]["tool_name"] == "shell" and seen[0]["tool_input"]["command"].startswith("touch blocked")
    assert seen[0]["session_id"] == agent.session_id and seen[0]["cwd"] == str(work.resolve())
    assert seen[0]["_env"] == str(work.resolve()) and seen[0]["tool_use_id"] == calls[0]["tool_use_id"]
    runs = hook_events(agent)
    assert [(r["exit_code"], r["effect"]) for r in runs] == [(2, "block"), (0, None)]


def test_json_decisions_and_matchers(tmp_path):
    deny = hook(tmp_path, "deny", "print(json.dumps({'hookSpecificOutput': {'hookEventName': 'PreToolUse', "
                                  "'permissionDecision': 'deny', 'permissionDecisionReason': 'no writes here'}}))\n")
    approve = hook(tmp_path, "approve", "print(json.dumps({'decision': 'approve'}))\n")
    allow = hook(tmp_path, "allow", "print(json.dumps({'hookSpecificOutput': {'permissionDecision': 'allow'}}))\n")
    veto = hook(tmp_path, "veto", "print('glob vetoed', file=sys.stderr); sys.exit(2)\n")
    hooks = merge(cfg("PreToolUse", deny, "write_file|str_replace"), cfg("PreToolUse", approve, "^calc"),
                  {"hooks": {"PreToolUse": [{"matcher": "glob", "hooks": [{"type": "command", "command": allow},
                                                                         {"type": "command", "command": veto}]}]}})

    def script(body):
        if not tool_results(body):
            return Reply([tool("write_file", {"path": "x.txt", "content": "x"}),
                          tool("calculator", {"expression": "6 * 7"}), tool("read_file", {"path": "x.txt"}),
                          tool("glob", {"pattern": "*"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        # "ask" with no terminal: every call the hooks leave alone is rejected
        agent = make_agent(ep.url, tmp_path, approval="ask", hooks=hooks)
        asyncio.run(_run(agent, "go"))
    write, calc, read, glob = last_results(ep.requests[1])
    assert write["is_error"] and "no writes here" in result_text(write) and not (tmp_path / "x.txt").exists()
    assert not calc.get("is_error") and result_text(calc) == "42"          # approved by the hook
    assert read["is_error"] and "did not approve" in result_text(read)     # no hook matched: policy as usual
    assert glob["is_error"] and "glob vetoed" in result_text(glob)         # deny beats allow
    assert len(logged(tmp_path, "deny")) == 1 and len(logged(tmp_path, "approve")) == 1
    assert len(logged(tmp_path, "allow")) == 1 and len(logged(tmp_path, "veto")) == 1
    approvals = [e["data"] for e in agent.store.events(agent.session_id) if e["kind"] == "approval"]
    assert approvals == [{"tool": "calculator", "approved": True, "by": "PreToolUse hook"}]


def test_matcher_forms():
    def m(pattern, name):
        return HookGroup(pattern, []).matches(name)
    assert m(None, "shell") and m("", "shell") and m("*", "mcp__x__y")
    assert m("shell|write_file", "write_file") and not m("shell|write_file", "write")   # exact names
    assert not m("shell", "shell2")
    assert m("mcp__github__.*", "mcp__github__create_issue") and not m("mcp__github__.*", "mcp__gitlab__x")
    assert m("^read_", "read_file") and not m("^read_", "thread_x")
    cfg_ = HooksConfig.parse(merge(cfg("PreToolUse", "a", "shell"), cfg("PreToolUse", "a", "sh.*"),
                                   cfg("PreToolUse", "b", "glob")))
    assert [h.command for h in cfg_.commands("PreToolUse", "shell")] == ["a"]   # the same command runs once
    pc = HooksConfig.parse(merge(cfg("PreCompact", "m", "manual"), cfg("SessionEnd", "e", "prompt_input_exit"),
                                 cfg("Notification", "n")))
    assert [h.command for h in pc.commands("PreCompact", "manual")] == ["m"] and pc.commands("PreCompact", "auto") == []
    assert pc.commands("SessionEnd", "other") == [] and [h.command for h in pc.commands("Notification", "x")] == ["n"]


def test_post_tool_use_feedback_reaches_the_next_request(tmp_path):
    lint = hook(tmp_path, "lint",
                "text = open(os.path.join(ev['cwd'], ev['tool_input']['path'])).read()\n"
                "bad = [i + 1 for i, l in enumerate(text.splitlines()) if 'TODO' in l]\n"
                "if bad:\n    print(f'lint: TODO on line(s) {bad}', file=sys.stderr)\n    sys.exit(2)\n")
    note = hook(tmp_path, "note", "print(json.dumps({'hookSpecificOutput': {'hookEventName': 'PostToolUse', "
                                  "'additionalContext': 'remember to run the tests'}}))\n")
    hooks = merge(cfg("PostToolUse", lint, "write_file"), cfg("PostToolUse", note))

    def script(body):
        n = len(tool_results(body))
        if n == 0:
            return Reply([tool("write_file", {"path": "a.py", "content": "x = 1\n# TODO fix\n"})])
        if n == 1:
            return Reply([tool("calculator", {"expression": "1 + 1"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=hooks)
        asyncio.run(_run(agent, "go"))
    first = result_text(last_results(ep.requests[1])[0])
    assert (tmp_path / "a.py").read_text() == "x = 1\n# TODO fix\n"       # the tool ran
    assert "lint: TODO on line(s) [2]" in first and "remember to run the tests" in first
    second = result_text(last_results(ep.requests[2])[0])
    assert second.startswith("2") and "remember to run the tests" in second and "lint" not in second
    seen = logged(tmp_path, "note")
    assert seen[0]["tool_response"]["is_error"] is False and seen[0]["tool_name"] == "write_file"
    assert seen[1]["tool_response"]["content"] == "2"
    assert len(logged(tmp_path, "lint")) == 1                                # matcher: write_file only


def test_user_prompt_submit_adds_context_and_blocks(tmp_path):
    ups = hook(tmp_path, "ups", "if 'password' in ev['prompt']:\n"
                                "    print('prompts must not contain passwords', file=sys.stderr)\n    sys.exit(2)\n"
                                "print('Build day: the CI is frozen.')\n")
    with ScriptedEndpoint(lambda body: Reply([text("ok")])) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=cfg("UserPromptSubmit", ups))
        first, second = asyncio.run(_run(agent, "hello", "my password is hunter2"))
    assert first.stop_reason == "end_turn" and len(ep.requests) == 1      # the blocked prompt was never sent
    sent = [b["text"] for b in blocks(ep.requests[0]["messages"][0])]
    assert sent[0] == "hello" and "Build day: the CI is frozen." in sent[1]
    assert second.stop_reason == "prompt_blocked" and "must not contain passwords" in second.text
    assert "hunter2" not in json.dumps(agent.store.messages(agent.session_id))
    assert [e["prompt"] for e in logged(tmp_path, "ups")] == ["hello", "my password is hunter2"]


def test_stop_hook_forces_one_more_turn_then_allows_the_stop(tmp_path):
    stop = hook(tmp_path, "stop", "if not os.path.exists(os.path.join(ev['cwd'], 'tests.ok')):\n"
                                  "    print(json.dumps({'decision': 'block', 'reason': 'the tests have not passed: "
                                  "write tests.ok'}))\n")

    def script(body):
        last = body["messages"][-1]
        if last["role"] == "user" and any("tests have not passed" in b.get("text", "") for b in blocks(last)):
            return Reply([tool("write_file", {"path": "tests.ok", "content": "ok"})])
        return Reply([text("finished")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=cfg("Stop", stop))
        (result,) = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "end_turn" and result.text == "finished" and len(ep.requests) == 3
    assert (tmp_path / "tests.ok").exists()
    assert [e["stop_hook_active"] for e in logged(tmp_path, "stop")] == [False, True]
    assert logged(tmp_path, "stop")[0]["last_assistant_message"] == "finished"
    kinds = [m["kind"] for m in agent.store.messages(agent.session_id)]
    assert kinds == ["prompt", "assistant", "hook", "assistant", "results", "assistant"]


def test_stop_hook_blocks_are_bounded(tmp_path):
    always = hook(tmp_path, "always", "print('keep going', file=sys.stderr); sys.exit(2)\n")
    with ScriptedEndpoint(lambda body: Reply([text("I am done")])) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=cfg("Stop", always), max_stop_blocks=2)
        (result,) = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "end_turn" and len(ep.requests) == 3   # two blocks honoured, the third not
    limit = [e for e in agent.store.events(agent.session_id) if e["kind"] == "stop_hook_limit"]
    assert len(limit) == 1 and limit[0]["data"]["blocks"] == 2
    with ScriptedEndpoint(lambda body: Reply([text("I am done")])) as ep:   # and budgets still apply
        agent = make_agent(ep.url, tmp_path, hooks=cfg("Stop", always), max_stop_blocks=50, max_steps=4)
        (result,) = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "max_steps" and len(ep.requests) == 4


def test_session_start_context_goes_into_the_system_prompt(tmp_path):
    start = hook(tmp_path, "start", "print(json.dumps({'hookSpecificOutput': {'hookEventName': 'SessionStart', "
                                    "'additionalContext': 'branch: feature-x'}}))\n")
    with ScriptedEndpoint(lambda body: Reply([text("ok")])) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=cfg("SessionStart", start), system_prompt="Be brief.")
        asyncio.run(_run(agent, "a", "b"))
    assert [r["system"] for r in ep.requests] == ["Be brief.\n\n# Session context (from SessionStart hooks)\n"
                                                  "branch: feature-x"] * 2
    assert [e["source"] for e in logged(tmp_path, "start")] == ["startup"]   # once per process


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead), after up to 5 s of grace."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


def test_failing_hooks_are_recorded_and_ignored(tmp_path):
    pidfile = tmp_path / "child.pid"
    slow = f"sleep 30 & echo $! > {shlex.quote(str(pidfile))}; wait"
    crash = hook(tmp_path, "crash", "raise RuntimeError('hook bug')\n")
    garbage = hook(tmp_path, "garbage", "print('{not json')\n")
    hooks = {"hooks": {"PreToolUse": [{"hooks": [{"type": "command", "command": slow, "timeout": 1},
                                                 {"type": "command", "command": crash},
                                                 {"type": "command", "command": garbage}]}]}}

    def script(body):
        if not tool_results(body):
            return Reply([tool("calculator", {"expression": "2 ** 10"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=hooks)
        (result,) = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "end_turn"
    assert result_text(last_results(ep.requests[1])[0]) == "1024"          # the call went ahead
    runs = {r["command"]: r for r in hook_events(agent)}
    assert runs[slow]["timed_out"] and "timed out" in runs[slow]["error"]
    assert not _alive(int(pidfile.read_text()))                            # the hook's child was killed too
    assert runs[crash]["exit_code"] == 1 and "hook bug" in runs[crash]["stderr"] and runs[crash]["error"]
    assert runs[garbage]["exit_code"] == 0 and "not valid JSON" in runs[garbage]["error"]


def test_sub_agents_run_tool_hooks_and_subagent_stop(tmp_path):
    guard = hook(tmp_path, "guard", "print('no shell for anyone', file=sys.stderr); sys.exit(2)\n")
    sub_stop = hook(tmp_path, "sub_stop", "")

    def script(body):
        if body["system"].startswith("You are a sub-agent"):
            if not tool_results(body):
                return Reply([tool("shell", {"command": "touch sub.txt"})])
            return Reply([text("sub done")])
        if not tool_results(body):
            return Reply([tool("task", {"prompt": "do it"})])
        return Reply([text("all done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, hooks=merge(cfg("PreToolUse", guard, "shell"),
                                                          cfg("SubagentStop", sub_stop)))
        asyncio.run(_run(agent, "go"))
    assert not (tmp_path / "sub.txt").exists()
    assert [e["tool_name"] for e in logged(tmp_path, "guard")] == ["shell"]
    stops = logged(tmp_path, "sub_stop")
    assert len(stops) == 1 and stops[0]["agent_depth"] == 1 and stops[0]["last_assistant_message"] == "sub done"
    child = agent.store.children(agent.session_id)[0]["id"]
    assert any(e["kind"] == "hook" for e in agent.store.events(child))


def test_config_validation_errors(tmp_path):
    def err(data) -> str:
        with pytest.raises(HookConfigError) as e:
            HooksConfig.parse(data, "hooks.json")
        return str(e.value)

    assert "hooks.json: hooks.PreToolUs: moonlet runs no 'PreToolUs' hooks" in err({"hooks": {"PreToolUs": []}})
    assert "hooks.PreToolUse[0].matcher: '(' is not a valid regular expression" in \
        err(cfg("PreToolUse", "x", "("))
    assert "hooks.Stop[0].hooks[0].command: expected a non-empty" in err({"hooks": {"Stop": [{"hooks": [{}]}]}})
    assert "hooks.Stop[0].hooks[0].timeout" in err(cfg("Stop", "x", None, -1))
    assert "hooks.Stop[0].hooks[0]: unknown key(s) timout" in \
        err({"hooks": {"Stop": [{"hooks": [{"command": "x", "timout": 3}]}]}})
    assert "hooks.Stop[0].hooks[0].type: 'prompt' is not supported" in \
        err({"hooks": {"Stop": [{"hooks": [{"type": "prompt", "command": "x"}]}]}})
    assert "hooks.SessionStart: expected a list" in err({"hooks": {"SessionStart": {}}})
    bad = tmp_path / "bad.json"
    bad.write_text("{\"hooks\": ")
    with pytest.raises(HookConfigError, match=r"bad.json: not valid JSON \(line 1"):
        HooksConfig.load(bad)
    # a Claude Code settings file is accepted as it is: other top-level keys are ignored
    ok = HooksConfig.parse({"permissions": {"allow": []}, **cfg("Stop", "true")})
    assert [h.command for h in ok.commands("Stop")] == ["true"]
    out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "x", "--base-url", "http://127.0.0.1:9",
                          "--model-name", "m", "--hooks", str(bad), "--db", str(tmp_path / "s.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "bad.json: not valid JSON" in out.stderr


def test_default_locations_project_then_user(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    (work / ".moonlet").mkdir(parents=True)
    (home / "agent").mkdir(parents=True)
    (work / ".moonlet" / "hooks.json").write_text(json.dumps(cfg("Stop", "project")))
    (home / "agent" / "hooks.json").write_text(json.dumps(cfg("Stop", "user")))
    monkeypatch.setenv("MOONLET_HOME", str(home))
    assert [h.command for h in discover_hooks(work).commands("Stop")] == ["project", "user"]
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps(cfg("Stop", "mine")))
    assert [h.command for h in discover_hooks(work, str(explicit)).commands("Stop")] == ["mine"]


def test_cli_records_hooks_in_show_and_export_and_resume_keeps_them(tmp_path):
    work, db = tmp_path / "work", tmp_path / "s.db"
    work.mkdir()
    log = hook(tmp_path, "log", "")
    hooks_file = tmp_path / "hooks.json"
    hooks_file.write_text(json.dumps(cfg("PreToolUse", log, "calculator")))

    def script(body):
        n = len(tool_results(body))
        if n < 2:
            return Reply([tool("calculator", {"expression": f"{n} + 1"})])
        return Reply([text("done")])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moonlet", "agent", *args, "--db", str(db)],
                              capture_output=True, text=True, timeout=120)

    with ScriptedEndpoint(script) as ep:
        first = cli("run", "count", "--base-url", ep.url, "--model-name", "scripted", "--workdir", str(work),
                    "--hooks", str(hooks_file), "--session-id", "hk", "--max-steps", "1", "-q")
        assert first.returncode == 3, first.stderr                       # stopped by the step budget
        assert len(logged(tmp_path, "log")) == 1
        hooks_file.unlink()                                              # resume uses the saved copy
        resumed = cli("resume", "hk", "--max-steps", "10", "-q")
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.strip() == "done"
    seen = logged(tmp_path, "log")
    assert [e["tool_input"]["expression"] for e in seen] == ["0 + 1", "1 + 1"]
    export = subprocess.run([sys.executable, "-m", "moonlet", "agent", "export", "hk", "--db", str(db)],
                            capture_output=True, text=True, timeout=60).stdout
    hook_rows = [r for r in map(json.loads, export.splitlines()) if r["type"] == "event" and r["kind"] == "hook"]
    assert len(hook_rows) == 2 and all(r["data"]["event"] == "PreToolUse" and r["data"]["exit_code"] == 0
                                       and r["data"]["target"] == "calculator" for r in hook_rows)
    shown = subprocess.run([sys.executable, "-m", "moonlet", "agent", "show", "hk", "--db", str(db)],
                           capture_output=True, text=True, timeout=60).stdout
    assert shown.count("hook PreToolUse calculator") == 2
    store = SessionStore(db)
    assert store.get_session("hk")["config"]["hooks"]["hooks"]["PreToolUse"][0]["matcher"] == "calculator"
    store.close()


# -- updatedInput, PreCompact, SessionEnd, Notification ---------------------------------------------
def test_pre_tool_use_updated_input_changes_what_runs_and_is_recorded(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rewrite = hook(tmp_path, "rewrite",
                   "cmd = ev['tool_input']['command']\n"
                   "if 'original' in cmd:\n"
                   "    new = dict(ev['tool_input'], command=cmd.replace('original', 'rewritten'))\n"
                   "    print(json.dumps({'hookSpecificOutput': {'hookEventName': 'PreToolUse', "
                   "'updatedInput': new}}))\n"
                   "elif 'bad' in cmd:\n"
                   "    print(json.dumps({'hookSpecificOutput': {'updatedInput': {'command': 5}}}))\n")
    post = hook(tmp_path, "post", "")

    def script(body):
        n = len(tool_results(body))
        if n == 0:
            return Reply([tool("shell", {"command": "echo original > out.txt"})])
        if n == 1:
            return Reply([tool("shell", {"command": "echo bad > bad.txt"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, work, approval="yolo",
                           hooks=merge(cfg("PreToolUse", rewrite, "shell"), cfg("PostToolUse", post)))
        asyncio.run(_run(agent, "go"))
    assert (work / "out.txt").read_text() == "rewritten\n"                # what ran is the hook's input
    assert not (work / "bad.txt").exists()                               # a schema-breaking rewrite does not run
    first, second = result_text(last_results(ep.requests[1])[0]), last_results(ep.requests[2])[0]
    assert "changed this call's input; what ran" in first and "echo rewritten > out.txt" in first
    assert second["is_error"] and "breaks the tool's schema" in result_text(second)
    calls = agent.store.tool_calls(agent.session_id)
    assert calls[0]["input"] == {"command": "echo rewritten > out.txt"} and calls[0]["approved"]
    assert calls[1]["input"] == {"command": "echo bad > bad.txt"} and not calls[1]["approved"]
    updates = [e["data"] for e in agent.store.events(agent.session_id) if e["kind"] == "input_updated"]
    assert updates[0]["original"] == {"command": "echo original > out.txt"}
    assert updates[0]["updated"] == {"command": "echo rewritten > out.txt"} and updates[1]["invalid"]
    assert logged(tmp_path, "post")[0]["tool_input"] == {"command": "echo rewritten > out.txt"}
    assert [r["effect"] for r in hook_events(agent) if r["event"] == "PreToolUse"] == ["update", "update"]


def test_updated_input_goes_through_approval(tmp_path):
    """Without a permission decision the rewritten call is what the user is asked about."""
    from moonlet.agent.approval import Decision
    asked = []

    async def prompt(summary):
        asked.append(summary)
        return Decision(True)

    rewrite = hook(tmp_path, "rw", "print(json.dumps({'hookSpecificOutput': {'updatedInput': "
                                   "{'path': 'b.txt', 'content': 'B'}}}))\n")

    def script(body):
        if not tool_results(body):
            return Reply([tool("write_file", {"path": "a.txt", "content": "A"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, approval="ask", prompt=prompt, hooks=cfg("PreToolUse", rewrite))
        asyncio.run(_run(agent, "go"))
    assert asked == ["write_file(b.txt)"] and (tmp_path / "b.txt").read_text() == "B"
    assert not (tmp_path / "a.txt").exists()


def _compaction_agent(tmp_path, hooks, summaries):
    from moonlet.agent.prompts import SUMMARY_SYSTEM
    for i in range(3):
        (tmp_path / f"p{i}.txt").write_text("".join(f"part {i} line {j} " + "z" * 80 + "\n" for j in range(25)))

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            summaries.append(body["messages"][0]["content"])
            return Reply([text("## Current focus\n- parts")])
        n = len(tool_results(body))
        return Reply([tool("read_file", {"path": f"p{n}.txt"})]) if n < 3 else Reply([text("read all")])

    return script


def test_pre_compact_adds_instructions_and_can_block_a_manual_compact(tmp_path):
    from moonlet.agent.loop import CompactBlocked
    pre = hook(tmp_path, "pre", "if 'forbid' in ev['custom_instructions']:\n"
                                "    print('not now: the user is reviewing', file=sys.stderr); sys.exit(2)\n"
                                "print('Keep every file name that was read.')\n")
    summaries: list[str] = []
    script = _compaction_agent(tmp_path, None, summaries)

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, hooks=cfg("PreCompact", pre, "manual"),
                           compaction={"keep_turns": 0})
        try:
            await agent.run("read the parts")
            await agent.compact("focus on part 2")
            await agent.run("and once more")          # something new to compact
            with pytest.raises(CompactBlocked, match="not now: the user is reviewing"):
                await agent.compact("forbid it")
            return agent
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script) as ep:
        agent = asyncio.run(go(ep.url))
    assert len(summaries) == 1 and len(agent.store.compactions(agent.session_id)) == 1   # the blocked one did not run
    assert "focus on part 2" in summaries[0] and "Keep every file name that was read." in summaries[0]
    assert [(e["trigger"], e["custom_instructions"]) for e in logged(tmp_path, "pre")] == \
        [("manual", "focus on part 2"), ("manual", "forbid it")]
    assert any(e["kind"] == "compact_blocked" for e in agent.store.events(agent.session_id))


def test_pre_compact_cannot_block_an_automatic_compaction(tmp_path):
    block = hook(tmp_path, "block", "print('never', file=sys.stderr); sys.exit(2)\n")
    summaries: list[str] = []
    script = _compaction_agent(tmp_path, None, summaries)
    with ScriptedEndpoint(script, window=2500) as ep:
        agent = make_agent(ep.url, tmp_path, only={"read_file"}, hooks=cfg("PreCompact", block),
                           context_window=2500, max_tokens=200)
        (result,) = asyncio.run(_run(agent, "read the parts"))
    assert result.text == "read all" and ep.oversized == []
    assert agent.store.compactions(agent.session_id) and summaries
    assert {e["trigger"] for e in logged(tmp_path, "block")} == {"auto"}


def test_session_end_runs_on_exit_and_notification_on_approval_prompts(tmp_path):
    work, db = tmp_path / "work", tmp_path / "s.db"
    work.mkdir()
    end = hook(tmp_path, "end", "print('cannot block', file=sys.stderr); sys.exit(2)\n")
    hooks_file = tmp_path / "hooks.json"
    hooks_file.write_text(json.dumps(cfg("SessionEnd", end)))
    with ScriptedEndpoint(lambda body: Reply([text("bye")])) as ep:
        base = [sys.executable, "-m", "moonlet", "agent", "run", "--base-url", ep.url, "--model-name", "scripted",
                "--workdir", str(work), "--hooks", str(hooks_file), "--db", str(db), "-q"]
        once = subprocess.run(base[:5] + ["hi"] + base[5:], capture_output=True, text=True, timeout=120)
        inter = subprocess.run(base, input="hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert once.returncode == 0 and once.stdout.strip() == "bye", once.stderr
    assert inter.returncode == 0, inter.stderr
    assert [e["reason"] for e in logged(tmp_path, "end")] == ["other", "prompt_input_exit"]
    store = SessionStore(db)
    sessions = [s["id"] for s in store.list_sessions()]
    assert all(store.get_session(s)["status"] == "done" for s in sessions)   # exit 2 changed nothing
    store.close()

    from moonlet.agent.approval import Decision
    note = hook(tmp_path, "note", "")

    async def prompt(summary):
        return Decision(True)

    def script(body):
        if not tool_results(body):
            return Reply([tool("write_file", {"path": "x.txt", "content": "x"}), tool("calculator", {"expression": "1"})])
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, work, approval="reads", prompt=prompt,
                           hooks=cfg("Notification", note, "permission_prompt"))
        asyncio.run(_run(agent, "go"))
    seen = logged(tmp_path, "note")   # write_file asks (and notifies); the calculator is a read and does not
    assert [(e["notification_type"], e["tool_name"]) for e in seen] == [("permission_prompt", "write_file")]
    assert "needs your permission to use write_file" in seen[0]["message"]
