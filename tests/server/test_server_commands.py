"""`moonlet serve`, `moonlet chat` and `moonlet bench` on a tiny random checkpoint written in the hub
layout (weights + tokenizer), and against live servers."""

import os
import subprocess
import sys
import time

import anthropic
import httpx
import pytest
from server_support import LiveServer, Script, free_port

from moonlet.cli import main
from moonlet.commands import serve as serve_cmd
from moonlet.commands.bench import format_online, percentile, run_offline, run_online
from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.weights import save_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    tiny_tokenizer_dir(directory, chat_template="kimi-k2.6")
    save_model(random_model(tiny_k2_config(vocab_size=768, max_position_embeddings=512), seed=2), directory)
    return directory


@pytest.fixture(scope="module")
def real_server(checkpoint):
    llm = AsyncLLM(str(checkpoint), num_blocks=96, block_size=16, start=False)
    with LiveServer(create_app(llm, shutdown_engine_on_exit=True)) as server:
        yield server, llm


def test_serve_command_serves_a_checkpoint(checkpoint):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "moonlet", "serve", "--model", str(checkpoint), "--port",
                             str(port), "--api-key", "sekret", "--served-model-name", "tiny", "--num-blocks", "64",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = anthropic.Anthropic(base_url=url, api_key="sekret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        msg = client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                     thinking={"type": "disabled"})
        assert msg.usage.output_tokens <= 4 and msg.stop_reason in ("end_turn", "max_tokens", "tool_use")
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_without_a_model_says_to_pass_one(monkeypatch, capsys):
    def missing():
        raise FileNotFoundError("the bundled moonlet-tiny checkpoint is missing")

    monkeypatch.setattr("moonlet.assets.default_model_path", missing)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "moonlet-tiny" in err
    with pytest.raises(FileNotFoundError, match="not a directory"):
        serve_cmd.resolve_model("/nonexistent/checkpoint")


def test_chat_against_a_url_keeps_history(scripted, engine, capsys):
    engine.push(Script("Thought one.</think>First answer."), Script("Thought.</think>Second answer."))
    code = main(["chat", "--url", scripted.url, "--api-key", "test-key", "--prompt", "one", "--prompt", "two"])
    out = capsys.readouterr().out
    assert code == 0
    assert "First answer." in out and "Second answer." in out and "Thought." in out
    prompt = engine.calls[-1].prompt_text
    assert "<|im_user|>user<|im_middle|>one<|im_end|>" in prompt and "First answer.<|im_end|>" in prompt
    assert prompt.count("<|im_user|>") == 2


def test_chat_reports_http_errors(scripted, capsys):
    assert main(["chat", "--url", scripted.url, "--api-key", "wrong", "--prompt", "x"]) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_chat_in_process(checkpoint, capsys):
    code = main(["chat", "--model", str(checkpoint), "--prompt", "hello", "--prompt", "again", "--max-tokens", "3",
                 "--no-thinking", "--num-blocks", "32"])
    assert code == 0
    assert capsys.readouterr().out.count("\n") >= 2


def test_bench_online_reports_exact_lengths(real_server):
    server, llm = real_server
    import asyncio

    summary = asyncio.run(run_online(server.url, "completions", num_prompts=6, input_len=16, output_len=4,
                                     concurrency=3))
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["output_tokens"] == 24 and summary["prompt_tokens"] == 96
    assert len(summary["ttft_ms"]) == 6 and all(t > 0 for t in summary["ttft_ms"])
    table = format_online(summary)
    assert table.startswith("| metric | value |") and "TTFT (ms)" in table and "ITL (ms)" in table
    summary = asyncio.run(run_online(server.url, "messages", num_prompts=3, input_len=8, output_len=3,
                                     concurrency=2, request_rate=50.0))
    assert summary["completed"] == 3 and 0 < summary["output_tokens"] <= 9


def test_bench_offline(checkpoint):
    rows = run_offline(str(checkpoint), num_prompts=4, input_len=8, output_len=5, baseline=True, num_blocks=32)
    assert [r["output_tokens"] for r in rows] == [20, 20]
    assert rows[0]["prompt_tokens"] == 32


def test_percentile_matches_numpy():
    import numpy as np

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_chat_thinking_budget_over_http(scripted, engine, capsys):
    engine.push(Script("Hmm.</think>Answer."))
    code = main(["chat", "--url", scripted.url, "--api-key", "test-key", "--prompt", "q", "--max-tokens", "2048",
                 "--thinking-budget", "1024"])
    assert code == 0 and "Answer." in capsys.readouterr().out
    assert engine.calls[-1].params.thinking_token_budget == 1024
    assert engine.calls[-1].prompt_text.endswith("<think>")
    # the Messages API's floor is the server's to enforce; its message reaches the user
    assert main(["chat", "--url", scripted.url, "--api-key", "test-key", "--prompt", "q",
                 "--thinking-budget", "8"]) == 1
    assert "thinking.budget_tokens must be >= 1024" in capsys.readouterr().err
    assert main(["chat", "--url", scripted.url, "--prompt", "q", "--no-thinking", "--thinking-budget", "8"]) == 2


def test_chat_in_process_thinking_budget(checkpoint, capsys):
    from moonlet.commands.generate import generate_ids
    from moonlet.tokenizer import Tokenizer
    from moonlet.weights import load_model

    code = main(["chat", "--model", str(checkpoint), "--prompt", "hello", "--max-tokens", "8", "--temperature", "0",
                 "--thinking-budget", "3", "--num-blocks", "32"])
    assert code == 0
    out = capsys.readouterr().out
    # reference: the model's own greedy loop for 3 tokens from the thinking prompt
    tok, model = Tokenizer.from_pretrained(checkpoint), load_model(str(checkpoint))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], thinking=True, tokenize=True)
    thought = list(generate_ids(model, prompt, 3, set()))
    assert not set(thought) & (set(tok.stop_token_ids) | {tok.token_id("</think>")})
    assert out.startswith("[thinking] " + tok.decode(thought) + "\n")
