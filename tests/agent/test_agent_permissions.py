"""Permission rules (moonlet/agent/permissions.py): parsing and its errors, path globs checked against
git's own gitignore matching, shell command splitting checked against what bash really runs, the
precedence of deny > ask > allow > the approval mode, "always" remembering a shell prefix, and the
rules end to end: a scripted agent under `ask` mode, settings files merged with the CLI flags, and
resume keeping the flags."""

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest
from agent_scripted import Reply, ScriptedEndpoint, first_user_text, last_results, make_agent, result_text, text, tool

from moonlet.agent.approval import ApprovalPolicy, Decision
from moonlet.agent.permissions import (PermissionRuleError, PermissionRules, Rule, load_rules, remember_rules,
                                       split_rule_args, split_shell)
from moonlet.agent.tools import make_tools


def rules(**lists) -> PermissionRules:
    r = PermissionRules()
    for kind, texts in lists.items():
        r.add(kind, texts, "test")
    return r


# -- parsing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["read_file", "shell(git diff:*)", "shell(npm test)", "write_file(src/**)",
                                  "str_replace(//etc/**)", "read_file(~/notes/*.md)", "web_fetch(domain:example.com)",
                                  "web_fetch(domain:*.example.com)", "mcp__github", "mcp__github__create_issue",
                                  "task", "shell", "glob"])
def test_good_rules_parse(text):
    Rule("allow", text, "s.json")


@pytest.mark.parametrize("text,why", [
    ("Bash(ls:*)", "moonlet's tool for Claude Code's Bash is 'shell'"),
    ("frobnicate", "unknown tool 'frobnicate'"),
    ("shell()", "empty parentheses"),
    ("task(reviewer)", "task takes no specifier"),
    ("web_fetch(example.com)", "domain:HOST"),
    ("shell(a:* b)", "':*' may only end the rule"),
    ("shell(echo 'x)", "cannot be split"),
    ("read_file(src", "expected TOOL or TOOL(SPECIFIER)"),
])
def test_bad_rules_name_source_and_rule(text, why):
    with pytest.raises(PermissionRuleError) as e:
        Rule("deny", text, "proj/.moonlet/settings.json")
    msg = str(e.value)
    assert msg.startswith("proj/.moonlet/settings.json: deny rule ") and repr(text) in msg and why in msg


def test_bad_settings_files_are_named(tmp_path):
    f = tmp_path / ".moonlet" / "settings.json"
    f.parent.mkdir()
    f.write_text("{not json")
    with pytest.raises(PermissionRuleError, match=r"settings\.json: not valid JSON"):
        load_rules(str(tmp_path))
    f.write_text(json.dumps({"permissions": {"allow": ["read_file", "Write(x)"]}}))
    with pytest.raises(PermissionRuleError) as e:
        load_rules(str(tmp_path))
    assert str(f) in str(e.value) and "'Write(x)'" in str(e.value)
    f.write_text(json.dumps({"permissions": {"allow": "read_file"}}))
    with pytest.raises(PermissionRuleError, match="must be a list"):
        load_rules(str(tmp_path))
    f.write_text(json.dumps({"permissions": {"alow": ["read_file"]}}))
    with pytest.raises(PermissionRuleError, match="unknown rule list 'alow'"):
        load_rules(str(tmp_path))


def test_split_rule_args():
    assert split_rule_args([["read_file,shell(git diff:*)", "write_file(a b/*)"], ["task"]]) == \
        ["read_file", "shell(git diff:*)", "write_file(a b/*)", "task"]


# -- paths: gitignore semantics, with git as the reference --------------------------------------------
PATTERNS = ["*.env", "src/**", "src/**/*.py", "/top.txt", "build/", "docs/*.md", "**/secret/*", "a/**/b.txt",
            "src", "data/?.csv", "data/[ab].csv"]
PATHS = [".env", "x/.env", "src/a.py", "src/a/b/c.py", "src/a/b/c.txt", "top.txt", "sub/top.txt", "build/o/x.o",
         "docs/a.md", "docs/sub/a.md", "secret/k", "a/secret/k", "a/b.txt", "a/x/y/b.txt", "data/a.csv",
         "data/ab.csv", "data/c.csv", "other.py"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is the reference")
def test_path_globs_match_like_gitignore(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    for p in PATHS:
        (work / p).parent.mkdir(parents=True, exist_ok=True)
        (work / p).write_text("x")
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    checked = 0
    for pattern in PATTERNS:
        (work / ".gitignore").write_text(pattern + "\n")
        out = subprocess.run(["git", "-C", str(work), "check-ignore", "--no-index", *PATHS],
                             capture_output=True, text=True)
        ignored = set(out.stdout.split())
        r = rules(deny=[f"read_file({pattern})"])
        for p in PATHS:
            ours = r.evaluate("read_file", {"path": p}, str(work)).kind == "deny"
            assert ours == (p in ignored), (pattern, p, ours)
            checked += ours
    assert checked >= 15


def test_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = str(tmp_path / "w")
    os.makedirs(work)
    r = rules(deny=[f"read_file(/{tmp_path}/etc/**)", "write_file(~/.ssh/**)"])
    assert r.evaluate("read_file", {"path": str(tmp_path / "etc" / "passwd")}, work).kind == "deny"
    assert r.evaluate("read_file", {"path": str(tmp_path / "etc2")}, work).kind is None
    assert r.evaluate("write_file", {"path": "~/.ssh/id"}, work).kind == "deny"
    # a relative pattern never matches outside the work directory, and ../ is resolved first
    r = rules(deny=["read_file(*.txt)"])
    assert r.evaluate("read_file", {"path": "../x.txt"}, work).kind is None
    assert r.evaluate("read_file", {"path": "sub/../y.txt"}, work).kind == "deny"


def test_symlinked_path_is_judged_by_its_target(tmp_path):
    work = tmp_path / "w"
    (work / "secret").mkdir(parents=True)
    (work / "secret" / "k").write_text("x")
    (work / "link").symlink_to(work / "secret")
    r = rules(deny=["read_file(secret/**)"])
    assert r.evaluate("read_file", {"path": "link/k"}, str(work)).kind == "deny"


# -- shell: splitting checked against what bash runs ---------------------------------------------------
COMPOUND = [
    'aa x && bb "y && z"; cc',
    "aa | bb | cc",
    "aa $(bb 1) `cc 2`",
    'aa "$(bb "q; r")"',
    "ff || aa",
    "(aa; bb) && cc",
    "aa 'x|y' > /dev/null 2>&1",
    "if aa; then bb; fi; cc",
    "aa\nbb\\\n more",
    "aa <(bb) # cc\nwait $!",   # (bash does not wait for a process substitution by itself)
]


# commands run by other commands: shells' -c scripts, eval, wrappers, find -exec
WRAPPED = [
    "sh -c 'aa x; bb \"y z\"'",
    "bash -ec \"env Q=1 timeout 5 aa -v && cc\"",
    "env -u HOME X=1 aa 1",
    "timeout -k 3 10 nice -n 5 bb 2",
    "nohup aa 3 > /dev/null",
    "eval 'aa 4; bb 5'",
    "command aa 6",
    "xargs -n 1 aa 7 < /dev/null",
    "find . -maxdepth 0 -exec aa 8 ';' -exec bb 9 \\;",
    "sh -c \"bash -c 'cc 10'\"",
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is the reference")
@pytest.mark.parametrize("command", COMPOUND + WRAPPED)
def test_split_finds_every_command_bash_runs(tmp_path, command):
    """Shims log their argv; every command bash starts must be one split_shell found (and, as none
    of these branches is skipped except ff's, the sets are equal)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    for name in ("aa", "bb", "cc", "ff"):
        shim = bin_dir / name
        code = 1 if name == "ff" else 0
        # one write per record (appends of a few bytes do not interleave): name\0args\0...\036\0
        shim.write_text(f'#!/bin/sh\nprintf "%s\\0" "$(basename "$0")" "$@" "$(printf "\\036")" >> {log}\n'
                        f"exit {code}\n")
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, timeout=30)
    ran = [rec.split("\0")[:-1] for rec in log.read_text().split("\036\0") if rec]
    # a substitution's (empty) output and a process substitution's /dev/fd path stand where the
    # placeholder word is
    ran = [[w for w in c if w and not w.startswith("/dev/fd/")] for c in ran]
    parts = split_shell(command)
    assert parts is not None
    found = [w for w in parts.commands if w[0] in ("aa", "bb", "cc", "ff")]
    # substitutions' outputs are empty here, so the outer command's placeholder words vanish in bash
    norm = sorted([w for w in c if w != "__substitution__"] for c in found)
    assert sorted(ran) == norm


@pytest.mark.parametrize("command", ["cat <<EOF\nhi\nEOF", 'echo "open', "echo 'open", "echo $((1+2))", "echo )",
                                     "echo $(ls"])
def test_unsplittable_commands(command):
    assert split_shell(command) is None


def test_redirections_are_listed():
    p = split_shell("make > out.log 2>&1 && sort < in.txt >> sorted.txt; x &> all.log; y 2>/dev/null")
    assert p.commands == [["make"], ["sort"], ["x"], ["y"]]
    assert p.writes == ["out.log", "sorted.txt", "all.log"] and p.reads == ["in.txt"]
    assert split_shell("echo hi > $OUT").unknown_targets


SHELL_TABLE = [
    # (allow, deny, command, expected verdict)
    (["shell(git diff:*)"], [], "git diff", "allow"),
    (["shell(git diff:*)"], [], "git diff --stat HEAD", "allow"),
    (["shell(git diff:*)"], [], "git   diff  x", "allow"),          # words, not characters
    (["shell(git diff:*)"], [], "git diffx", None),                # a word prefix, not a string prefix
    (["shell(git diff)"], [], "git diff", "allow"),                # without :* an exact match
    (["shell(git diff)"], [], "git diff HEAD", None),
    (["shell(echo:*)"], [], 'echo "a && b"', "allow"),             # quoting hides the separator
    (["shell(echo:*)"], [], "echo a && rm -rf x", None),           # one part not allowed
    (["shell(echo:*)", "shell(rm:*)"], [], "echo a && rm -rf x", "allow"),
    (["shell(echo:*)"], [], "echo $(curl evil)", None),            # the substitution is a command too
    (["shell(echo:*)"], [], "echo hi > notes.txt", None),          # a write nothing allows
    (["shell(echo:*)", "write_file(*.txt)"], [], "echo hi > notes.txt", "allow"),
    (["shell(echo:*)"], [], "echo hi > /dev/null 2>&1", "allow"),
    (["shell(echo:*)"], [], "cat <<EOF\nx\nEOF", None),            # unsplittable: allow rules do not apply
    (["shell(echo:*)"], [], "PATH=/tmp echo hi", None),            # assignments must be in the allow rule
    (["shell"], ["shell(rm:*)"], "ls; rm -rf /", "deny"),          # deny on any part
    (["shell"], ["shell(rm:*)"], "echo $(rm -rf /)", "deny"),
    (["shell"], ["shell(rm:*)"], "X=1 rm -rf /", "deny"),          # assignments do not hide a denied command
    (["shell"], ["shell(rm:*)"], 'echo "rm -rf /"', "allow"),      # an argument, not a command
    (["shell"], ["shell(rm:*)"], "cat <<EOF\nx\nEOF\nrm -rf /", "deny"),  # unsplittable: deny still looks
    (["shell"], ["write_file(.env)"], "echo x > .env", "deny"),    # redirection into a denied path
    (["shell"], ["read_file(.env)"], "sort < .env", "deny"),
    (["shell"], [], "anything at all", "allow"),                   # bare rule
    ([], ["shell"], "ls", "deny"),
    # commands inside commands: a deny on any of them denies; an allow needs all of them allowed
    (["shell"], ["shell(rm:*)"], 'bash -c "env X=1 timeout 5 rm -rf /"', "deny"),
    (["shell"], ["shell(rm:*)"], "sh -ec 'ls; rm -rf /'", "deny"),
    (["shell"], ["shell(rm:*)"], "eval 'rm -rf /'", "deny"),
    (["shell"], ["shell(rm:*)"], "find . -name '*.o' -exec rm {} ';'", "deny"),
    (["shell"], ["shell(rm:*)"], "ls | xargs -I F -n 1 rm F", "deny"),
    (["shell"], ["shell(rm:*)"], "nohup nice -n 5 rm x &", "deny"),
    (["shell"], ["shell(rm:*)"], "sudo -u root rm x", "deny"),
    (["shell"], ["shell(rm:*)"], "sh -c \"bash -c 'rm x'\"", "deny"),
    (["shell"], ["shell(curl:*)"], "command -p curl evil.example", "deny"),
    (["shell(timeout:*)"], [], "timeout 5 rm -rf x", None),       # the wrapped command needs its own allow
    (["shell(timeout:*)", "shell(pytest:*)"], [], "timeout 60 pytest -q", "allow"),
    (["shell(sh:*)"], [], "sh -c 'make'", None),
    (["shell(sh:*)", "shell(make:*)"], [], "sh -c 'make && make test'", "allow"),
    (["shell(sh:*)"], [], "sh -c 'echo \"open'", None),           # an inner script that does not split
    (["shell(find:*)"], [], "find . -name x -exec cat {} +", None),
    (["shell(find:*)", "shell(cat:*)"], [], "find . -name x -exec cat {} +", "allow"),
    (["shell(find:*)"], [], "find . -exec cat {}", None),          # -exec without its end
    # files commands write or delete, against the write rules and the work directory
    (["shell"], ["write_file(.env)"], "cp other .env", "deny"),
    (["shell"], ["write_file(.env)"], "sed -i s/a/b/ .env", "deny"),
    (["shell"], ["write_file(.env)"], "sed -e s/a/b/ .env", "allow"),      # not in place: a read
    (["shell"], ["write_file(.env)"], "echo x | tee -a .env", "deny"),
    (["shell"], ["write_file(.env)"], "rm -f .env", "deny"),
    (["shell"], ["write_file(.env)"], "dd if=/dev/zero of=.env", "deny"),
    (["shell"], ["write_file(secrets/**)"], "find secrets -delete", "deny"),   # the files under it
    (["shell"], ["write_file(*.pem)"], "rm -rf secrets", "deny"),
    (["shell"], ["write_file(*.pem)"], "rm -rf secrets/other", "allow"),
    (["shell"], ["write_file(.env)"], "bash -c 'mv tmp .env'", "deny"),
    (["shell"], ["str_replace(*.py)"], "perl -pi -e s/a/b/ main.py", "deny"),
    (["shell(rm:*)"], [], "rm -rf build", "allow"),                 # inside the work directory
    (["shell(rm:*)"], [], "rm -rf ../elsewhere", None),             # outside: allow rules do not cover it
    (["shell(cp:*)"], [], "cp notes.txt /etc/motd", None),
    (["shell(cp:*)"], [], "cp /etc/hosts copy.txt", "allow"),
    # names and operands from variables are not looked into: deny still looks at the words, allow does not apply
    (["shell(rm:*)"], [], "rm $TARGET", None),
    (["shell(echo:*)"], [], "$CMD x", None),
]


@pytest.mark.parametrize("allow,deny,command,expected", SHELL_TABLE)
def test_shell_rule_table(tmp_path, allow, deny, command, expected):
    (tmp_path / "secrets" / "deep").mkdir(parents=True)
    (tmp_path / "secrets" / "deep" / "k.pem").write_text("x")
    assert rules(allow=allow, deny=deny).evaluate("shell", {"command": command}, str(tmp_path)).kind == expected


def test_other_tools_match():
    r = rules(allow=["web_fetch(domain:example.com)", "mcp__gh", "task"], deny=["mcp__gh__delete_repo"],
              ask=["web_fetch(domain:*.internal.org)"])
    ev = lambda name, args={}: r.evaluate(name, args, ".").kind  # noqa: E731
    assert ev("web_fetch", {"url": "https://example.com/a"}) == "allow"
    assert ev("web_fetch", {"url": "https://www.example.com/a"}) is None
    assert ev("web_fetch", {"url": "https://evil.com/?example.com"}) is None
    assert ev("web_fetch", {"url": "http://a.internal.org/"}) == "ask"
    assert ev("mcp__gh__list") == "allow" and ev("mcp__gh__delete_repo") == "deny"
    assert ev("mcp__ghx__list") is None and ev("task") == "allow" and ev("swarm") is None


# -- precedence across modes -----------------------------------------------------------------------------
class _Prompt:
    def __init__(self, answer=Decision(True)):
        self.asked, self.answer = [], answer

    async def __call__(self, summary):
        self.asked.append(summary)
        return self.answer


MODES = ("ask", "reads", "edits", "yolo", "plan")
# the mode alone, for write_file (not read-only) and read_file (read-only): ask / run / refuse
MODE_ALONE = {"ask": ("ask", "ask"), "reads": ("ask", "run"), "edits": ("run", "run"), "yolo": ("run", "run"),
              "plan": ("refuse", "run")}


def _expected(mode: str, rule: str | None, read_only: bool) -> str:
    """The documented order, written out: deny > plan's refusal > ask > allow > the mode."""
    if rule == "deny":
        return "refuse"
    if mode == "plan" and not read_only:
        return "refuse"
    if rule == "ask":
        return "ask"
    if rule == "allow":
        return "run"
    return MODE_ALONE[mode][1 if read_only else 0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", [None, "allow", "ask", "deny"])
@pytest.mark.parametrize("tool_name", ["write_file", "read_file"])
def test_precedence_table(tmp_path, mode, rule, tool_name):
    tools = make_tools()
    t = tools.get(tool_name)
    r = rules(**{rule: [f"{tool_name}(*.txt)"]}) if rule else PermissionRules()

    prompt = _Prompt()
    policy = ApprovalPolicy(mode, prompt, r)
    d = asyncio.run(policy.check(t, {"path": "a.txt", "content": "x"}))
    got = "ask" if prompt.asked else ("run" if d.approved else "refuse")
    assert got == _expected(mode, rule, t.read_only)
    # without a terminal, what would ask is refused, with the rule named for an ask rule
    d = asyncio.run(ApprovalPolicy(mode, None, r).check(t, {"path": "a.txt", "content": "x"}))
    if _expected(mode, rule, t.read_only) == "ask":
        assert not d.approved
        if rule == "ask":
            assert "ask rule 'read_file(*.txt)'".replace("read_file", tool_name) in d.feedback
    if rule == "deny":
        assert not d.approved and f"deny rule '{tool_name}(*.txt)' from test" in d.refusal


def test_always_remembers_the_shell_prefix_only(tmp_path):
    assert remember_rules("shell", {"command": "npm test -- --watch"}) == ["shell(npm test:*)"]
    assert remember_rules("shell", {"command": "ls -la && git diff HEAD"}) == ["shell(ls:*)", "shell(git diff:*)"]
    assert remember_rules("shell", {"command": "cat <<EOF\nx\nEOF"}) == []
    assert remember_rules("write_file", {"path": "a"}) == ["write_file"]
    shell = make_tools().get("shell")
    prompt = _Prompt(Decision(True, remember=True))
    policy = ApprovalPolicy("ask", prompt)
    assert asyncio.run(policy.check(shell, {"command": "npm test"})).approved
    assert "always = shell(npm test:*)" in prompt.asked[0]
    prompt.answer = Decision(False)
    assert asyncio.run(policy.check(shell, {"command": "npm test --coverage"})).approved  # not asked
    assert len(prompt.asked) == 1
    assert not asyncio.run(policy.check(shell, {"command": "npm publish"})).approved    # asked, refused
    assert not asyncio.run(policy.check(shell, {"command": "npm test && npm publish"})).approved
    assert len(prompt.asked) == 3


# -- end to end ------------------------------------------------------------------------------------------
def test_scripted_run_denies_and_allows_without_asking(tmp_path):
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / ".moonlet").mkdir()
    (tmp_path / ".moonlet" / "settings.json").write_text(json.dumps(
        {"permissions": {"deny": ["shell(rm:*)"], "allow": ["shell(echo:*)", "read_file"]}}))

    def script(body):
        results = last_results(body)
        if "sub-agent" in first_user_text(body):  # the sub-agent tries the denied command too
            if not results:
                return Reply([tool("shell", {"command": "rm keep.txt"})])
            return Reply([text("sub: " + result_text(results[0]))])
        if not results:
            return Reply([tool("shell", {"command": "echo hello && echo world"}),
                          tool("shell", {"command": "ls && rm -f keep.txt"}),
                          tool("task", {"prompt": "sub-agent: try rm"})])
        return Reply([text("done")])

    prompt = _Prompt()
    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, approval="ask", prompt=prompt)
        agent.approval.rules = load_rules(str(agent.workspace.root))

        async def go():
            try:
                return await agent.run("go")
            finally:
                await agent.close()
                await agent.client.aclose()

        asyncio.run(go())
        main_results = [r for body in ep.requests if "sub-agent" not in first_user_text(body)
                        for r in last_results(body)]
        sub_results = [r for body in ep.requests if "sub-agent" in first_user_text(body) for r in last_results(body)]
    assert (tmp_path / "keep.txt").exists()
    assert prompt.asked and all("shell(" not in a for a in prompt.asked)  # (task asks under `ask`)
    echo, rm, sub = main_results
    assert not echo.get("is_error") and "hello" in result_text(echo) and "world" in result_text(echo)
    denial = result_text(rm)
    assert rm.get("is_error") and "deny rule 'shell(rm:*)'" in denial
    assert str(tmp_path / ".moonlet" / "settings.json") in denial
    assert "deny rule 'shell(rm:*)'" in result_text(sub_results[0])  # the sub-agent inherits the rules


def _cli(tmp_path, ep_url, *args, home=None):
    env = dict(os.environ, MOONLET_HOME=str(home or tmp_path / "home"))
    return subprocess.run([sys.executable, "-m", "moonlet", "agent", *args, "--base-url", ep_url, "--model-name",
                           "scripted", "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path / "w"), "-q"],
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def test_settings_merged_with_cli_and_listed(tmp_path):
    work, home = tmp_path / "w", tmp_path / "home"
    (work / ".moonlet").mkdir(parents=True)
    home.mkdir()
    (work / ".moonlet" / "settings.json").write_text(json.dumps({"permissions": {"allow": ["read_file"]}}))
    (work / ".moonlet" / "settings.local.json").write_text(json.dumps({"permissions": {"ask": ["web_fetch"]}}))
    (home / "settings.json").write_text(json.dumps({"permissions": {"deny": ["shell(curl:*)"]}, "other": 1}))
    env = dict(os.environ, MOONLET_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "permissions", "--workdir", str(work),
                          "--allowed-tools", "shell(git diff:*),glob", "--disallowed-tools", "write_file(.env)"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.split()[0] in ("allow", "ask", "deny")]
    assert [(l[0], l[1]) for l in lines] == [
        ("deny", "shell(curl:*)"), ("deny", "write_file(.env)"), ("ask", "web_fetch"), ("allow", "read_file"),
        ("allow", "shell(git"), ("allow", "glob")]
    assert str(home / "settings.json") in out.stdout and "--disallowed-tools" in out.stdout
    assert str(work / ".moonlet" / "settings.local.json") in out.stdout
    (home / "settings.json").write_text(json.dumps({"permissions": {"deny": ["Bash(curl:*)"]}}))
    out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "permissions", "--workdir", str(work)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and str(home / "settings.json") in out.stderr and "'Bash(curl:*)'" in out.stderr


def test_resume_keeps_cli_rules(tmp_path):
    (tmp_path / "w").mkdir()

    def script(body):
        results = last_results(body)
        if not results:
            return Reply([tool("shell", {"command": "echo ran-$RANDOM"}), tool("shell", {"command": "rm -f x"})])
        return Reply([text(" | ".join(result_text(r).strip()[:300] for r in results))])

    with ScriptedEndpoint(script) as ep:
        # no terminal under --approval ask: only the allow rule lets echo run; the deny names its flag
        out = _cli(tmp_path, ep.url, "run", "go", "--approval", "ask", "--session-id", "p",
                   "--allowed-tools", "shell(echo:*)", "--disallowed-tools", "shell(rm:*)")
        assert out.returncode == 0, out.stderr
        assert "ran-" in out.stdout and "deny rule 'shell(rm:*)' from --disallowed-tools" in out.stdout
        out = _cli(tmp_path, ep.url, "resume", "p", "again")
        assert out.returncode == 0, out.stderr
        assert "ran-" in out.stdout and "deny rule 'shell(rm:*)' from --disallowed-tools" in out.stdout
        # flags on resume replace the saved list of their kind
        out = _cli(tmp_path, ep.url, "resume", "p", "once more", "--allowed-tools", "read_file")
        assert out.returncode == 0, out.stderr
        assert "ran-" not in out.stdout and "no terminal to ask" in out.stdout
        assert "deny rule 'shell(rm:*)'" in out.stdout


def test_save_always_writes_settings_local(tmp_path):
    from types import SimpleNamespace
    (tmp_path / ".moonlet").mkdir()
    local = tmp_path / ".moonlet" / "settings.local.json"
    local.write_text(json.dumps({"permissions": {"deny": ["shell(rm:*)"]}, "keep": True}))
    shell = make_tools().get("shell")
    agent = SimpleNamespace(workspace=SimpleNamespace(root=tmp_path), label=None, hooks=None, session_id="s",
                            state=SimpleNamespace(steps=0), store=SimpleNamespace(event=lambda *a: None))
    prompt = _Prompt(Decision(True, remember=True, persist=True))
    policy = ApprovalPolicy("ask", prompt)
    assert asyncio.run(policy.check(shell, {"command": "make -j4 && pytest -q"}, agent)).approved
    data = json.loads(local.read_text())
    assert data["keep"] is True and data["permissions"]["allow"] == ["shell(make:*)", "shell(pytest:*)"]
    assert data["permissions"]["deny"] == ["shell(rm:*)"]
    loaded = load_rules(str(tmp_path))
    assert loaded.evaluate("shell", {"command": "pytest tests"}, str(tmp_path)).kind == "allow"


def test_deny_rule_beats_a_hooks_allow_and_ask_rule_still_asks(tmp_path):
    hook = tmp_path / "allow.py"
    hook.write_text("import json\nprint(json.dumps({'hookSpecificOutput': {'permissionDecision': 'allow'}}))\n")
    hooks = {"hooks": {"PreToolUse": [{"matcher": "shell", "hooks": [
        {"type": "command", "command": f"{sys.executable} {hook}"}]}]}}
    (tmp_path / "x").write_text("x")

    def script(body):
        if not last_results(body):
            return Reply([tool("shell", {"command": "rm x"}), tool("shell", {"command": "git status"}),
                          tool("shell", {"command": "echo hooked"})])
        return Reply([text("done")])

    prompt = _Prompt(Decision(False))
    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, approval="ask", prompt=prompt, hooks=hooks)
        agent.approval.rules = rules(deny=["shell(rm:*)"], ask=["shell(git:*)"])

        async def go():
            try:
                return await agent.run("go")
            finally:
                await agent.close()
                await agent.client.aclose()

        asyncio.run(go())
        rm, git, echo = last_results(ep.requests[-1])
    assert (tmp_path / "x").exists() and "deny rule 'shell(rm:*)' from test" in result_text(rm)
    assert len(prompt.asked) == 1 and "git status" in prompt.asked[0] and "ask rule 'shell(git:*)'" in prompt.asked[0]
    assert git.get("is_error") and "hooked" in result_text(echo)  # the hook's allow ran echo unasked


def test_settings_default_mode(tmp_path, monkeypatch):
    import argparse

    from moonlet.agent.cli import _approval

    work, home = tmp_path / "w", tmp_path / "home"
    (work / ".moonlet").mkdir(parents=True)
    home.mkdir()
    monkeypatch.setenv("MOONLET_HOME", str(home))
    assert load_rules(str(work)).default_mode(str(work)) is None
    (home / "settings.json").write_text(json.dumps({"permissions": {"defaultMode": "bypassPermissions"}}))
    assert load_rules(str(work)).default_mode(str(work)) == "yolo"       # Claude Code's name, the user's file
    (work / ".moonlet" / "settings.json").write_text(json.dumps({"permissions": {"defaultMode": "acceptEdits"}}))
    assert load_rules(str(work)).default_mode(str(work)) == "edits"      # the project's beats the user's
    (work / ".moonlet" / "settings.local.json").write_text(json.dumps({"permissions": {"defaultMode": "plan"}}))
    rules = load_rules(str(work))
    assert rules.default_mode(str(work)) == "plan"                       # the local file's beats both
    args = argparse.Namespace(yolo=False, approval=None)
    assert _approval(args, None, rules, str(work)).mode == "plan"
    assert _approval(argparse.Namespace(yolo=False, approval="ask"), None, rules, str(work)).mode == "ask"  # flag wins
    assert _approval(args, "reads", rules, str(work)).mode == "reads"    # a resumed session keeps its mode
    (work / ".moonlet" / "settings.local.json").write_text(json.dumps({"permissions": {"defaultMode": "sometimes"}}))
    with pytest.raises(PermissionRuleError, match=r"settings.local.json: permissions.defaultMode 'sometimes'"):
        load_rules(str(work))
