"""Custom slash commands (.moonlet/commands/*.md): expansion rules, file errors, precedence, and the
expanded prompt reaching the model from interactive mode and as the TASK of `moonlet agent run`."""

import subprocess
import sys

import pytest
from agent_scripted import Reply, ScriptedEndpoint, first_user_text, text

from moonlet.agent.commands import Command, expand_prompt, load_commands, parse_command_file


def test_expansion():
    c = Command("review", "Review $1 then $2 ($3). All: $ARGUMENTS")
    assert c.expand("a.py b.py") == "Review a.py then b.py (). All: a.py b.py"
    assert expand_prompt("/review x", {"review": c}) == "Review x then  (). All: x"
    assert expand_prompt("/other x", {"review": c}) is None and expand_prompt("hello", {"review": c}) is None


def test_files_precedence_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    user = tmp_path / "home" / "agent" / "commands"
    user.mkdir(parents=True)
    (user / "fix.md").write_text("user fix $ARGUMENTS")
    assert load_commands(tmp_path)["fix"].template == "user fix $ARGUMENTS"
    project = tmp_path / ".moonlet" / "commands"
    project.mkdir(parents=True)
    (project / "fix.md").write_text("---\ndescription: fix a bug\n---\nFix: $ARGUMENTS\n")
    fix = load_commands(tmp_path)["fix"]
    assert (fix.template, fix.description) == ("Fix: $ARGUMENTS", "fix a bug")
    for name, body, message in (("help", "x", "cannot be a command name"), ("empty", "---\ndescription: d\n---\n",
                                                                            "template is empty"),
                                ("bad", "---\ncolour: red\n---\nx", "takes 'description"),
                                ("open", "---\ndescription: d\nx", "never closed")):
        (tmp_path / f"{name}.md").write_text(body)
        with pytest.raises(ValueError, match=message):
            parse_command_file(tmp_path / f"{name}.md")


def test_commands_reach_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    (tmp_path / ".moonlet" / "commands").mkdir(parents=True)
    (tmp_path / ".moonlet" / "commands" / "shout.md").write_text("---\ndescription: say it loud\n---\n"
                                                                  "Repeat in capitals: $ARGUMENTS")

    def script(body):
        return Reply([text(f"got: {first_user_text(body)}")])

    def run(*args, stdin=None):
        with ScriptedEndpoint(script) as ep:
            return subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", *args, "--base-url", ep.url,
                                   "--model-name", "scripted", "--db", str(tmp_path / "s.db"), "--workdir",
                                   str(tmp_path), "-q"], input=stdin, capture_output=True, text=True, timeout=120)

    out = run("/shout hello there")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "got: Repeat in capitals: hello there"
    out = run(stdin="/help\n/shout hi\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "/shout ARGS  say it loud" in out.stderr
    assert out.stdout.strip() == "got: Repeat in capitals: hi"
