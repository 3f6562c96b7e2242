"""Sub-agent types (.moonlet/agents/*.md): parsing and its errors, project over user precedence, and
the task / swarm tools starting a typed sub-agent whose request carries the type's system prompt and
only its tools."""

import asyncio

import pytest
from agent_scripted import Reply, ScriptedEndpoint, first_user_text, last_results, make_agent, result_text, text, tool

from moonlet.agent.agent_types import load_agent_types, parse_agent_file

REVIEWER = """---
name: reviewer
description: Reviews code for bugs; read-only.
tools: read_file, grep
max_steps: 3
---
You are the reviewer. Report bugs with file and line.
"""


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.md").write_text(text)


def test_parse_and_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    _write(tmp_path / "home" / "agent" / "agents", "reviewer", REVIEWER.replace("the reviewer", "the user's reviewer"))
    _write(tmp_path / "home" / "agent" / "agents", "writer", REVIEWER.replace("name: reviewer", "name: writer")
           .replace("tools: read_file, grep\n", ""))
    assert load_agent_types(tmp_path)["reviewer"].prompt.startswith("You are the user's reviewer")
    _write(tmp_path / ".moonlet" / "agents", "reviewer", REVIEWER)
    types = load_agent_types(tmp_path, known_tools=["read_file", "grep", "shell"])
    r = types["reviewer"]
    assert (r.tools, r.max_steps, r.description) == (("read_file", "grep"), 3, "Reviews code for bugs; read-only.")
    assert r.prompt == "You are the reviewer. Report bugs with file and line."
    assert types["writer"].tools is None
    with pytest.raises(ValueError, match="unknown tool.*grep; the tools here are read_file"):
        load_agent_types(tmp_path, known_tools=["read_file"])


@pytest.mark.parametrize("text, message", [
    ("no front matter", "front-matter block"),
    ("---\nname: a b\ndescription: x\n---\nprompt", "'name' must be"),
    ("---\nname: a\n---\nprompt", "'description' is required"),
    ("---\nname: a\ndescription: d\n---\n", "system prompt"),
    ("---\nname: a\ncolour: red\ndescription: d\n---\np", ":3: expected 'key: value'"),
    ("---\nname: a\ndescription: d\nmax_steps: lots\n---\np", "max_steps must be a positive integer"),
])
def test_bad_files_are_named(tmp_path, text, message):
    (tmp_path / "x.md").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        parse_agent_file(tmp_path / "x.md")
    assert "x.md" in str(e.value)


def test_task_and_swarm_start_typed_sub_agents(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    _write(tmp_path / ".moonlet" / "agents", "reviewer", REVIEWER)
    sub_requests = []

    def script(body):
        task = first_user_text(body)
        if task == "supervise":
            results = last_results(body)
            if not results:
                return Reply([tool("task", {"prompt": "review a.py", "agent": "reviewer"}),
                              tool("task", {"prompt": "review b.py", "agent": "nobody"}),
                              tool("swarm", {"tasks": ["review c.py", "review d.py"], "agent": "reviewer"})])
            return Reply([text(" | ".join(result_text(r) for r in results))])
        sub_requests.append(body)
        return Reply([text(f"reviewed ({task})")])

    async def go(url):
        agent = make_agent(url, tmp_path, task="supervise")
        try:
            return await agent.run("supervise")
        finally:
            await agent.close()

    with ScriptedEndpoint(script) as ep:
        result = asyncio.run(go(ep.url))
    top = ep.requests[0]
    task_spec = next(t for t in top["tools"] if t["name"] == "task")
    assert "- reviewer: Reviews code for bugs; read-only." in task_spec["description"]
    assert task_spec["input_schema"]["properties"]["agent"]["enum"] == ["reviewer"]
    assert len(sub_requests) == 3
    for body in sub_requests:
        assert body["system"].startswith("You are the reviewer. Report bugs with file and line.")
        assert [t["name"] for t in body["tools"]] == ["read_file", "grep"]
    assert "reviewed (review a.py)" in result.text
    assert "unknown sub-agent type 'nobody'; the types here: reviewer" in result.text
    assert "reviewed (review c.py)" in result.text and "reviewed (review d.py)" in result.text
