"""Plan mode (--approval plan): read-only tools run, every other call is refused without asking and
changes nothing, the system prompt says so; resuming with another mode carries the plan out."""

import subprocess
import sys

from agent_scripted import Reply, ScriptedEndpoint, last_results, result_text, text, tool


def test_plan_then_execute(tmp_path):
    (tmp_path / "a.txt").write_text("old\n")
    seen = []

    def script(body):
        seen.append(body)
        results = last_results(body)
        if not results:
            return Reply([tool("read_file", {"path": "a.txt"}), tool("write_file", {"path": "a.txt",
                                                                                     "content": "new\n"})])
        return Reply([text("plan: " + " | ".join(result_text(r)[:40] for r in results))])

    def run(*args):
        with ScriptedEndpoint(script) as ep:
            return subprocess.run([sys.executable, "-m", "moonlet", "agent", *args, "--base-url", ep.url,
                                   "--model-name", "scripted", "--db", str(tmp_path / "s.db"), "--workdir",
                                   str(tmp_path), "-q"], capture_output=True, text=True, timeout=120)

    out = run("run", "change a.txt", "--approval", "plan", "--session-id", "p")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.txt").read_text() == "old\n"  # nothing changed
    assert "old" in out.stdout and "plan mode: this session may only read" in out.stdout
    assert "# Plan mode" in seen[0]["system"]
    seen.clear()
    out = run("resume", "p", "go ahead", "--approval", "yolo")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.txt").read_text() == "new\n"
    assert "# Plan mode" not in seen[0]["system"]
