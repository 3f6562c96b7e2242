"""`moonlet agent` interactive mode (slash commands, compaction on request) and argument errors."""

import subprocess
import sys

from agent_scripted import Reply, ScriptedEndpoint, blocks, text

from moonlet.agent.prompts import SUMMARY_SYSTEM
from moonlet.agent.store import SessionStore


def _user_texts(body):
    return [b.get("text", "") for m in body["messages"] if m["role"] == "user" for b in blocks(m)]


def test_interactive_session_with_pin_and_compact(tmp_path):
    summaries = []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            summaries.append(body)
            return Reply([text("## Current focus\n- answering questions")])
        last = _user_texts(body)[-1]
        return Reply([text(f"answer to {last}")])

    stdin = "first question\n/pin the user likes brevity\n/compact focus on names\n/usage\nsecond question\n/exit\n"
    with ScriptedEndpoint(script) as ep:
        out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "--base-url", ep.url, "--model-name",
                              "scripted", "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path), "-q",
                              "--session-id", "chat"], input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["answer to first question", "answer to second question"]
    assert "steps 1" in out.stderr and "compactions 1" in out.stderr
    assert len(summaries) == 1 and "focus on names" in summaries[0]["messages"][0]["content"]
    last = ep.requests[-1]
    head = "\n".join(b["text"] for b in blocks(last["messages"][0]))
    assert head.startswith("first question") and "the user likes brevity" in head and "Context compacted" in head
    assert _user_texts(last)[-1] == "second question"
    store = SessionStore(tmp_path / "s.db")
    assert [m["kind"] for m in store.messages("chat")] == ["prompt", "assistant", "head", "prompt", "assistant"]
    assert store.compactions("chat")[0]["reason"] == "/compact"


def test_bad_arguments_give_clear_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moonlet", "agent", *args], capture_output=True, text=True,
                              timeout=60)

    missing = cli("show", "nope", "--db", str(tmp_path / "s.db"))
    assert missing.returncode == 1 and "no session 'nope'" in missing.stderr
    bad_url = cli("run", "x", "--base-url", "localhost:1", "--db", str(tmp_path / "s.db"))
    assert bad_url.returncode == 1 and "must start with http://" in bad_url.stderr
    bad_dir = cli("run", "x", "--base-url", "http://127.0.0.1:9", "--model-name", "m", "--workdir",
                  str(tmp_path / "absent"), "--db", str(tmp_path / "s.db"))
    assert bad_dir.returncode == 1 and "does not exist" in bad_dir.stderr


def test_tools_flag_and_the_bundled_model_profile(tmp_path):
    import json

    import pytest

    from moonlet.agent.profiles import PROFILE_FILE, apply_profile, checkpoint_profile, model_profile
    from moonlet.agent.tools import make_tools
    from moonlet.train.synth import SYSTEM_PROMPTS, TOOLS

    trained = [{"name": t["function"]["name"], "description": t["function"]["description"],
                "input_schema": t["function"]["parameters"]} for t in TOOLS]
    profile = model_profile(None)  # the bundled moonlet-tiny
    specs = apply_profile(make_tools(), profile["tools"], profile["overrides"]).specs()
    # exactly the declarations moonlet-tiny was trained with, in the Anthropic tool shape
    assert specs == trained
    assert profile["system_prompt"] in SYSTEM_PROMPTS
    assert profile["temperature"] == 0.0  # sampled as it is evaluated (greedy), not at the API's default 1.0

    # any checkpoint directory can declare its profile (OpenAI-shaped tools accepted); none: all tools
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert model_profile(ckpt) is None
    (ckpt / PROFILE_FILE).write_text(json.dumps({"tools": TOOLS[:1], "system_prompt": "Use the calculator."}))
    own = checkpoint_profile(ckpt)
    assert own["tools"] == ["calculator"] and own["system_prompt"] == "Use the calculator."
    assert apply_profile(make_tools(), own["tools"], own["overrides"]).specs() == trained[:1]
    assert own["temperature"] is None  # no temperature in the file: the request leaves it to the server
    (ckpt / PROFILE_FILE).write_text('{"tools": []}')
    with pytest.raises(ValueError, match="non-empty"):
        checkpoint_profile(ckpt)
    (ckpt / PROFILE_FILE).write_text(json.dumps({"tools": TOOLS[:1], "temperature": 1.5}))
    with pytest.raises(ValueError, match="temperature.*0 to 1; got 1.5"):
        checkpoint_profile(ckpt)

    with ScriptedEndpoint(lambda body: Reply([text("ok")])) as ep:
        base = [sys.executable, "-m", "moonlet", "agent", "run", "hi", "--base-url", ep.url, "--model-name", "s",
                "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path), "-q"]
        ok = subprocess.run(base + ["--tools", "grep,calculator", "--system-prompt", "Be brief."],
                            capture_output=True, text=True, timeout=60)
        bad = subprocess.run(base + ["--tools", "calculator,teleport"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and [t["name"] for t in ep.requests[0]["tools"]] == ["grep", "calculator"]
    assert ep.requests[0]["system"] == "Be brief."
    assert bad.returncode == 1 and "unknown tool(s) teleport" in bad.stderr


def test_thinking_flag_is_checked_against_the_apis_limits():
    import argparse

    import pytest

    from moonlet.agent.cli import _apply_overrides
    from moonlet.agent.loop import AgentConfig

    def apply(**flags):
        config = AgentConfig()
        _apply_overrides(config, argparse.Namespace(**flags))
        return config

    assert apply(thinking=2048).thinking == {"type": "enabled", "budget_tokens": 2048}
    with pytest.raises(ValueError, match="at least 1024"):
        apply(thinking=100)
    with pytest.raises(ValueError, match="--max-reply-tokens"):
        apply(thinking=4096, max_reply_tokens=4096)
