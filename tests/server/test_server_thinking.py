"""Thinking budgets through the APIs: the Anthropic ``thinking.budget_tokens`` validation (the real
API's rules) and hand-off to the engine, OpenAI's ``thinking_token_budget``, and one end-to-end
stream over the real engine whose thinking block is cut at the budget and followed by a text block
(checked against the model's own cached greedy loop, ``moonlet generate``'s path)."""

import json

import httpx
import pytest
import torch
from server_support import LiveServer, Script

from moonlet.commands.generate import generate_ids
from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config
from moonlet.tokenizer import Tokenizer

USER = [{"role": "user", "content": "hi"}]
KEY = {"x-api-key": "test-key"}


def post_messages(url, headers=None, **body):
    body = {"model": "m", "messages": USER, **body}
    return httpx.post(url + "/v1/messages", json=body, headers={**KEY, **(headers or {})}, timeout=30)


@pytest.mark.parametrize("thinking,max_tokens,message", [
    ({"type": "enabled", "budget_tokens": 1023}, 4096, "thinking.budget_tokens must be >= 1024; got 1023"),
    ({"type": "enabled", "budget_tokens": 0}, 4096, "must be >= 1024"),
    ({"type": "enabled", "budget_tokens": 2048}, 2048, "max_tokens must be greater than thinking.budget_tokens"),
    ({"type": "enabled", "budget_tokens": 4000}, 2048, "got max_tokens=2048 and budget_tokens=4000"),
    ({"type": "enabled", "budget_tokens": 1024.5}, 4096, "thinking.budget_tokens must be an integer; got 1024.5"),
    ({"type": "enabled", "budget_tokens": "2000"}, 4096, "must be an integer; got '2000'"),
    ({"type": "enabled", "budget_tokens": True}, 4096, "must be an integer"),
    ({"type": "enabled"}, 4096, "thinking.budget_tokens is required"),
])
def test_invalid_budgets_are_invalid_request_errors(scripted, engine, thinking, max_tokens, message):
    before = len(engine.calls)
    r = post_messages(scripted.url, max_tokens=max_tokens, thinking=thinking)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert message in err["error"]["message"]
    assert len(engine.calls) == before  # nothing reached the engine


def test_budget_reaches_the_engine(scripted, engine):
    r = post_messages(scripted.url, max_tokens=1025, thinking={"type": "enabled", "budget_tokens": 1024})
    assert r.status_code == 200, r.text
    assert engine.calls[-1].params.thinking_token_budget == 1024
    assert engine.calls[-1].prompt_text.endswith("<think>")  # generation starts inside thinking
    for thinking in ({"type": "adaptive"}, {"type": "disabled", "budget_tokens": 5}, None):
        r = post_messages(scripted.url, max_tokens=64, **({"thinking": thinking} if thinking else {}))
        assert r.status_code == 200, r.text
        assert engine.calls[-1].params.thinking_token_budget is None
    # count_tokens validates the same config
    r = httpx.post(scripted.url + "/v1/messages/count_tokens", headers=KEY,
                   json={"model": "m", "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 10}})
    assert r.status_code == 400 and "must be >= 1024" in r.json()["error"]["message"]


def test_interleaved_thinking_beta_allows_a_budget_beyond_max_tokens(scripted, engine):
    thinking = {"type": "enabled", "budget_tokens": 8000}
    r = post_messages(scripted.url, max_tokens=2048, thinking=thinking,
                      headers={"anthropic-beta": "fine-grained-tool-streaming-2025-05-14, interleaved-thinking-2025-05-14"})
    assert r.status_code == 200, r.text
    assert engine.calls[-1].params.thinking_token_budget == 8000
    assert post_messages(scripted.url, max_tokens=2048, thinking=thinking).status_code == 400


def test_openai_thinking_token_budget(scripted, engine):
    engine.push(Script("ok"), Script("ok"))
    for route, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(scripted.url + route, headers=KEY, json={"model": "m", "max_tokens": 8,
                                                                 "thinking_token_budget": 3, **body})
        assert r.status_code == 200, r.text
        assert engine.calls[-1].params.thinking_token_budget == 3
    r = httpx.post(scripted.url + "/v1/chat/completions", headers=KEY,
                   json={"model": "m", "messages": USER, "thinking_token_budget": -1})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "thinking_token_budget" in r.json()["error"]["message"]


# ---- end to end over the real engine -------------------------------------------------------------

BUDGET, MAX_TOKENS, CONTEXT = 1024, 1040, 1152


@pytest.fixture(scope="module")
def real(tokenizer_dir):
    """A tiny random model whose special tokens never win greedy decoding (their lm_head rows are 0,
    so their logits are 0 while the best ordinary token's is positive): it thinks until stopped."""
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT), seed=4)
    with torch.no_grad():
        model.lm_head.weight[tok.num_base_tokens:] = 0
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=80, block_size=16, start=False)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)
    with LiveServer(app) as server:
        yield server, model, tok


@pytest.mark.slow
def test_stream_has_a_thinking_block_cut_at_the_budget_then_text(real):
    server, model, tok = real
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0,
            "thinking": {"type": "enabled", "budget_tokens": BUDGET},
            "messages": [{"role": "user", "content": "Think it over: why is the sky blue?"}]}
    events = []
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    blocks, text = [], {}
    for ev in events:
        if ev["type"] == "content_block_start":
            blocks.append(ev["content_block"]["type"])
            text[ev["index"]] = ""
        elif ev["type"] == "content_block_delta" and ev["delta"]["type"] in ("thinking_delta", "text_delta"):
            text[ev["index"]] += ev["delta"].get("thinking", ev["delta"].get("text"))
    assert blocks == ["thinking", "text"]
    final = events[-2]
    assert final["type"] == "message_delta" and final["delta"]["stop_reason"] == "max_tokens"
    assert final["usage"]["output_tokens"] == MAX_TOKENS  # the forced </think> counts as an output token

    # reference: the model's own greedy loop (contiguous cache, no engine): BUDGET thinking tokens,
    # then </think>, then the answer continuing from there
    prompt = tok.apply_chat_template(body["messages"], thinking=True, tokenize=True)
    end = tok.token_id("</think>")
    thought = list(generate_ids(model, prompt, BUDGET, set()))
    answer = list(generate_ids(model, prompt + thought + [end], MAX_TOKENS - BUDGET - 1, set()))
    assert end not in thought and all(t < tok.num_base_tokens for t in thought + answer)
    assert text[0] == tok.decode(thought)
    assert text[1] == tok.decode(answer).lstrip()  # whitespace before the first text is held back
