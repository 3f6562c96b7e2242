"""The agent against moonlet's own server started in-process (LocalServer): with a random tiny
checkpoint (protocol only: its text is noise), and with the bundled moonlet-tiny solving a
calculator task through a real tool call once that model ships."""

import asyncio
import subprocess
import sys

import pytest

from moonlet.agent import Agent, AgentConfig, AnthropicClient, Budgets, SessionStore, Workspace, make_tools
from moonlet.agent.local import LocalServer
from moonlet.agent.tokens import estimate_request


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
    from moonlet.weights import save_model

    d = tmp_path_factory.mktemp("ckpt")
    tiny_tokenizer_dir(d)
    save_model(random_model(tiny_k2_config(vocab_size=512 + 256), 0), d)
    return d


def test_agent_runs_against_moonlets_own_server_in_process(tiny_checkpoint, tmp_path):
    server = LocalServer(str(tiny_checkpoint))
    url = server.start()

    async def go():
        client = AnthropicClient(url, max_retries=0)
        try:
            req = {"model": server.model_name, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
            counted = await client.count_tokens(req)
            config = AgentConfig(model=server.model_name, context_window=server.context_window, max_tokens=8,
                                 budgets=Budgets(max_steps=1))
            tools = make_tools()  # the file and search tools: all thirteen definitions overflow this 4096-token window
            tools.tools = {k: v for k, v in tools.tools.items() if k in ("read_file", "glob", "grep", "calculator")}
            agent = Agent(client, config, tools, Workspace(tmp_path), SessionStore(":memory:"), task="hello")
            result = await agent.run("hello")
            return counted, agent, result
        finally:
            await client.aclose()

    try:
        counted, agent, result = asyncio.run(go())
    finally:
        server.stop()
    assert isinstance(counted, int) and 0 < counted <= estimate_request(
        {"messages": [{"role": "user", "content": "hello"}]}) * 4
    assert 0 < server.context_window <= 4096  # the tiny config's max_position_embeddings
    usage = agent.store.usage(agent.session_id)
    assert len(usage) == 1 and usage[0]["input_tokens"] > 0 and 0 < usage[0]["output_tokens"] <= 8
    assert result.stop_reason in ("end_turn", "max_tokens", "max_steps")


def _bundled_model():
    try:
        from moonlet.assets import default_model_path
        return default_model_path()
    except (ImportError, FileNotFoundError):
        return None


@pytest.mark.slow
@pytest.mark.skipif(_bundled_model() is None, reason="the bundled moonlet-tiny checkpoint is not in this checkout")
def test_bundled_model_answers_with_a_real_calculator_call(tmp_path):
    # the issue's own question: four-digit operands, taught by the tiny recipe's "digits" phase
    db = tmp_path / "s.db"
    out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "What is 1234 * 5678?", "--yolo",
                          "--db", str(db), "--workdir", str(tmp_path), "--session-id", "calc", "--max-steps", "8"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(1234 * 5678) in out.stdout
    store = SessionStore(db)
    calls = [c for c in store.tool_calls("calc") if c["name"] == "calculator"]
    assert calls and any(c["result"] == str(1234 * 5678) for c in calls)
