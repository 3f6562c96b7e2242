"""`moonlet agent run --output-format json | stream-json`: what a script reading stdout gets — every
line a JSON object, in the order things happened, ending with the result — and the refusal of
interactive use."""

import json
import subprocess
import sys

from agent_scripted import Reply, ScriptedEndpoint, last_results, result_text, text, thinking, tool


def _script(body):
    results = last_results(body)
    if results:
        return Reply([text(f"The answer is {result_text(results[0])}.")])
    return Reply([thinking("use the calculator"), text("Let me compute."), tool("calculator", {"expression": "6*7"})])


def _run(tmp_path, *args, sid="fmt"):
    with ScriptedEndpoint(_script) as ep:
        return subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", *args, "--base-url", ep.url,
                               "--model-name", "scripted", "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path),
                               "--yolo", "--session-id", sid], capture_output=True, text=True, timeout=120)


def test_stream_json_lines_in_order(tmp_path):
    out = _run(tmp_path, "what is 6*7", "--output-format", "stream-json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["type"] for r in records] == ["init", "assistant", "tool_use", "tool_result", "assistant", "result"]
    assert all(r["session_id"] == "fmt" for r in records)
    init, first, use, res, second, result = records
    assert init["model"] == "scripted" and "calculator" in init["tools"] and init["approval"] == "yolo"
    assert first == {"type": "assistant", "session_id": "fmt", "text": "Let me compute.",
                     "thinking": "use the calculator"}
    assert use["name"] == "calculator" and use["input"] == {"expression": "6*7"}
    assert res["text"] == "42" and res["is_error"] is False
    assert second["text"] == "The answer is 42."
    assert result["result"] == "The answer is 42." and result["stop_reason"] == "end_turn"
    assert result["exit_code"] == 0 and result["is_error"] is False and result["steps"] == 2
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0


def test_json_is_one_result_object(tmp_path):
    out = _run(tmp_path, "what is 6*7", "--output-format", "json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["type"] == "result" and result["result"] == "The answer is 42." and result["session_id"] == "fmt"
    # a budget stop: exit code 3, is_error, and how to resume
    out = _run(tmp_path, "what is 6*7", "--output-format", "json", "--max-steps", "1", sid="cut")
    assert out.returncode == 3
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["is_error"] and result["stop_reason"] == "max_steps" and result["resume"].endswith("resume cut")


def test_json_formats_refuse_interactive_use(tmp_path):
    out = _run(tmp_path, "--output-format", "json")
    assert out.returncode != 0 and "--output-format json is for runs without a terminal conversation" in out.stderr
