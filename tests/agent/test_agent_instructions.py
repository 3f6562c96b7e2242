"""Project instructions (AGENTS.md): which files apply to a work directory and in which order, how
they are cut and reported, and that the top agent and its sub-agents send them in the system prompt
(and stop sending them with --no-project-instructions)."""

import subprocess
import sys

from agent_scripted import Reply, ScriptedEndpoint, first_user_text, text, tool

from moonlet.agent.instructions import MAX_FILE_CHARS, load_instructions, project_dirs


def _repo(tmp_path):
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    (root / "pkg" / "deep").mkdir(parents=True)
    (root / "AGENTS.md").write_text("Run tests with `make test`.\n")
    (root / "pkg" / "AGENTS.md").write_text("In pkg, never edit generated files.\n")
    (tmp_path / "AGENTS.md").write_text("outside the repository: not for this project\n")
    return root


def test_files_from_the_project_root_down_to_the_work_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    root = _repo(tmp_path)
    work = root / "pkg" / "deep"
    assert project_dirs(work) == [root.resolve(), (root / "pkg").resolve(), work.resolve()]
    found = load_instructions(work)
    assert [p for p, _ in found.files] == ["../../AGENTS.md", "../AGENTS.md"]
    rendered = found.render()
    assert rendered.index("make test") < rendered.index("never edit generated")  # general first
    assert "not for this project" not in rendered
    # the user's own file comes first of all
    (tmp_path / "home" / "agent").mkdir(parents=True)
    (tmp_path / "home" / "agent" / "AGENTS.md").write_text("Answer in British English.\n")
    found = load_instructions(work)
    assert len(found.files) == 3 and "British English" in found.files[0][1]
    assert "your own instructions" in found.files[0][0]


def test_outside_a_repository_only_the_work_directory_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "a" / "AGENTS.md").write_text("parent rules\n")
    assert not load_instructions(work)
    assert load_instructions(work).render() == ""
    (work / "AGENTS.md").write_text("local rules\n")
    assert [p for p, _ in load_instructions(work).files] == ["AGENTS.md"]


def test_large_and_unreadable_files_are_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    (tmp_path / ".git").mkdir()
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "AGENTS.md").write_text("x" * (MAX_FILE_CHARS + 500))
    (sub / "AGENTS.md").write_bytes(b"\xff\xfe not utf-8 \xc3\x28")
    files = load_instructions(sub).files
    assert len(files[0][1]) < MAX_FILE_CHARS + 300 and f"{MAX_FILE_CHARS + 500:,} characters" in files[0][1]
    assert "not UTF-8" in files[1][1]


def test_agent_and_sub_agents_send_the_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_HOME", str(tmp_path / "home"))
    root = _repo(tmp_path)
    work = root / "pkg"

    def script(body):
        if first_user_text(body) == "delegate":
            if any(m["role"] == "user" and isinstance(m["content"], list) and
                   any(b.get("type") == "tool_result" for b in m["content"]) for m in body["messages"]):
                return Reply([text("done")])
            return Reply([tool("task", {"prompt": "look around", "description": "look"})])
        return Reply([text("looked")])

    def run(*extra):
        with ScriptedEndpoint(script) as ep:
            out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "delegate", "--base-url", ep.url,
                                  "--model-name", "scripted", "--db", str(tmp_path / "s.db"), "--workdir", str(work),
                                  "--yolo", *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out, ep.requests

    out, requests = run()
    assert "instructions: ../AGENTS.md, AGENTS.md" in out.stderr
    systems = [r["system"] for r in requests if r.get("system")]
    assert len(systems) >= 3  # the top agent twice, the sub-agent once
    sub = [s for s in systems if "sub-agent" in s]
    assert sub and all("make test" in s and "never edit generated files" in s for s in systems)
    _, requests = run("--no-project-instructions")
    assert not any("make test" in (r.get("system") or "") for r in requests)
