"""The server over the real engine (AsyncLLM) with a tiny random K2 model and a small BPE tokenizer,
driven by the official SDKs. Greedy outputs are checked against the model run directly (full
forward passes, no cache), so the whole path prompt -> engine -> detokenize -> HTTP is covered."""

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest
import torch
from server_support import LiveServer

from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config
from moonlet.tokenizer import Tokenizer

NUM_BLOCKS, MAX_LEN = 160, 384
GREEDY = {"temperature": 0}
NO_THINK = {"type": "disabled"}


@pytest.fixture(scope="module")
def stack(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN), seed=11)
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=NUM_BLOCKS, block_size=16, max_num_seqs=64, start=False)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)
    with LiveServer(app) as server:
        yield server, llm, model, tok


def reference_greedy(model, prompt, n, stop_ids):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stop_ids:
                break
            ids.append(nxt)
    return ids[len(prompt):]


def all_blocks_free(llm, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = llm.stats()
        if stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_completion_matches_the_model(stack):
    server, llm, model, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model="tiny", prompt="The weather today", max_tokens=12, temperature=0)
    prompt = tok.encode("The weather today")
    expected = reference_greedy(model, prompt, 12, set(tok.stop_token_ids) | {1})
    assert r.choices[0].text == tok.decode(expected)
    assert r.usage.completion_tokens == len(expected) + (r.choices[0].finish_reason == "stop")


def test_messages_streaming_equals_non_streaming_and_hits_the_prefix_cache(stack):
    server, llm, model, tok = stack
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    kwargs = dict(model="tiny", max_tokens=10, thinking=NO_THINK, extra_body=GREEDY,
                  messages=[{"role": "user", "content": "Tell me a story about a fox and a crow in a forest."}])
    first = client.messages.create(**kwargs)
    assert first.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert first.usage.output_tokens <= 10 and first.usage.input_tokens > 16
    with client.messages.stream(**kwargs) as stream:
        second = stream.get_final_message()
    assert [b.model_dump() for b in second.content] == [b.model_dump() for b in first.content]
    # the same prompt again: every full block of it comes from the prefix cache
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert total == first.usage.input_tokens
    assert second.usage.cache_read_input_tokens == (total - 1) // 16 * 16 > 0
    assert all_blocks_free(llm)


def test_over_long_prompt_is_a_400_with_both_numbers(stack):
    server, llm, model, tok = stack
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "fox crow " * 400}])
    message = e.value.body["error"]["message"]
    assert "prompt is too long" in message and str(llm.max_model_len) in message


def test_client_disconnect_frees_blocks(stack):
    server, llm, model, tok = stack
    body = {"model": "tiny", "max_tokens": 300, "stream": True, "thinking": NO_THINK, "temperature": 0.9,
            "messages": [{"role": "user", "content": "Go on forever."}]}
    with httpx.stream("POST", server.url + "/v1/messages", json=body) as r:
        for chunk in r.iter_text():
            if "content_block_delta" in chunk or "message_delta" in chunk:
                break
    assert all_blocks_free(llm)


@pytest.mark.slow
def test_200_concurrent_streams_complete_and_free_every_block(stack):
    server, llm, model, tok = stack

    async def one(client, i):
        async with client.messages.stream(model="tiny", max_tokens=6, thinking=NO_THINK,
                                          messages=[{"role": "user", "content": f"Request number {i}: say hi."}]) as s:
            message = await s.get_final_message()
        return message

    async def run():
        # the SDK's default pool allows 1000 connections: all 200 streams are open at once
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    messages = asyncio.run(run())
    assert len(messages) == 200
    assert all(m.stop_reason in ("end_turn", "max_tokens", "tool_use") for m in messages)
    assert all(0 < m.usage.output_tokens <= 6 for m in messages)
    assert all_blocks_free(llm, timeout=30)
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"] == NUM_BLOCKS


def test_logprobs_match_the_model(stack):
    server, llm, model, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"chat_template_kwargs": {"thinking": False}})
    prompt = tok.apply_chat_template(messages, tokenize=True, thinking=False)
    with torch.no_grad():
        reference = model(torch.tensor([prompt]))[0, -1].float().log_softmax(-1)
    top = reference.topk(3)
    first = r.choices[0].logprobs.content[0]
    assert first.token == tok.decode([int(top.indices[0])])
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [t.token for t in first.top_logprobs] == [tok.decode([int(i)]) for i in top.indices]

    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp.tokens == [first.token] and lp.token_logprobs[0] == pytest.approx(first.logprob, abs=1e-4)
    assert list(lp.top_logprobs[0].values()) == pytest.approx(top.values[:2].tolist(), abs=1e-4)


def test_n_choices_match_single_requests(stack):
    """n over the real engine: at temperature 0 every choice is the model's greedy output; seeded, choice i
    is the single request with seed + i; streamed or not, the same."""
    server, llm, model, tok = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompt = "A fox and a crow met in the forest one morning"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, n=3)
    expected = tok.decode(reference_greedy(model, tok.encode(prompt), 8, set(tok.stop_token_ids) | {1}))
    assert [c.text for c in r.choices] == [expected] * 3 and [c.index for c in r.choices] == [0, 1, 2]

    seeded = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, logprobs=1)
    group = client.completions.create(n=3, seed=1234, **seeded)
    singles = [client.completions.create(seed=1234 + i, **seeded).choices[0] for i in range(3)]
    assert [c.text for c in group.choices] == [c.text for c in singles]
    for g, s in zip(group.choices, singles):
        assert g.logprobs.token_logprobs == pytest.approx(s.logprobs.token_logprobs, abs=1e-5)
    assert group.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in singles)

    messages = [{"role": "user", "content": "Tell me about the fox."}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=6, temperature=1.0, seed=77, n=2,
                  extra_body={"chat_template_kwargs": {"thinking": False}})
    whole = client.chat.completions.create(**kwargs)
    texts = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}
    single = client.chat.completions.create(**{**kwargs, "n": 1, "seed": 78})
    assert whole.choices[1].message.content == single.choices[0].message.content


def test_client_disconnect_frees_every_choice(stack, monkeypatch):
    server, llm, model, tok = stack
    execute = llm.engine.runner.execute

    def slow_execute(*args, **kwargs):  # 300 steps take 3 s at least: the client leaves long before the end
        time.sleep(0.01)
        return execute(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "execute", slow_execute)
    body = {"model": "tiny", "max_tokens": 300, "stream": True, "temperature": 0.9, "n": 4, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Go on forever, in four ways."}]}
    assert all_blocks_free(llm)  # the stats snapshot is taken after the engine's step: wait for the last one
    before = llm.stats()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        seen = set()  # choices that have sent text (reasoning or content)
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("reasoning_content") or choice["delta"].get("content"):
                        seen.add(choice["index"])
            if len(seen) >= 2:
                break
    assert all_blocks_free(llm)
    after = llm.stats()  # the request was aborted (all its samples), not run to its end
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_finished"] == before["requests_finished"]

