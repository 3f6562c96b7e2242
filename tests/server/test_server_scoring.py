"""Scoring and steering over the OpenAI API with the real engine (tiny random model): echo with
logprobs and max_tokens 0 (lm-evaluation-harness's loglikelihood requests), vLLM's prompt_logprobs,
logit_bias / min_tokens / bad_words / allowed_token_ids and priority — checked against the model's own
full forward."""

import json

import httpx
import openai
import pytest
import torch
from server_support import LiveServer

from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config
from moonlet.tokenizer import Tokenizer

MAX_LEN = 256
TEXT = "Simple is better than complex. Flat is better than nested."


@pytest.fixture(scope="module")
def stack(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN), seed=4)
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=64, block_size=16, max_num_batched_tokens=16,
                   scheduling_policy="priority", start=False)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        yield server, client, model, tok


def full_logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(dim=-1)


def greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_max_tokens_zero_scores_the_prompt(stack, as_ids):
    server, client, model, tok = stack
    ids = tok.encode(TEXT)
    r = client.completions.create(model="tiny", prompt=ids if as_ids else TEXT, max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    ref = full_logprobs(model, ids)
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    for j in range(1, len(ids)):
        best = int(ref[j - 1].argmax())
        assert lp.top_logprobs[j] == pytest.approx({tok.decode([best]): float(ref[j - 1, best])}, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    # the sum lm-evaluation-harness takes of a continuation's tokens
    assert sum(lp.token_logprobs[1:]) == pytest.approx(
        sum(float(ref[j - 1, ids[j]]) for j in range(1, len(ids))), abs=1e-3)


def test_echo_puts_the_prompt_ahead_of_the_generated_tokens(stack):
    server, client, model, tok = stack
    ids = tok.encode(TEXT)
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    generated = greedy(model, ids, 3)
    assert lp.tokens == [tok.decode([t]) for t in ids + generated]
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    ref = full_logprobs(model, ids + generated)
    assert lp.token_logprobs[len(ids):] == pytest.approx(
        [float(ref[len(ids) + j - 1, t]) for j, t in enumerate(generated)], abs=1e-4)
    assert lp.text_offset[len(ids)] == len(tok.decode(ids))
    # streamed: the first chunk carries the echoed prompt's logprobs
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": TEXT, "max_tokens": 3, "echo": True, "logprobs": 2,
                            "temperature": 0, "stream": True}) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_vllm_prompt_logprobs_field(stack):
    server, client, model, tok = stack

    def check(plps, ids):
        ref = full_logprobs(model, ids)
        assert plps[0] is None and len(plps) == len(ids)
        for j in range(1, len(ids)):
            row = ref[j - 1]
            entry = plps[j]
            own = entry[str(ids[j])]
            assert own["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-4)
            assert own["rank"] == int((row > row[ids[j]]).sum()) + 1
            assert own["decoded_token"] == tok.decode([ids[j]])
            top = row.topk(2).indices.tolist()
            assert set(entry) == {str(t) for t in top} | {str(ids[j])}
            assert entry[str(top[0])]["rank"] == 1

    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    check(r.choices[0].model_extra["prompt_logprobs"], tok.encode(TEXT))
    messages = [{"role": "user", "content": "Errors should never pass silently."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    data = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
    ids = httpx.post(server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": True},
                     timeout=30).json()["tokens"]
    check(data["prompt_logprobs"], ids)
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_max_tokens_zero_needs_echo(stack):
    server, client, model, tok = stack
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=TEXT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_logit_processors_through_the_api(stack):
    server, client, model, tok = stack
    forced = next(t for t in range(300, 400) if tok.decode([t]).strip())
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 4)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, extra_body={"allowed_token_ids": [forced],
                                                                   "chat_template_kwargs": {"thinking": False}})
    assert r.choices[0].message.content == tok.decode([forced] * 3)
    # bad_words: the forced token's text is banned, so the other allowed token comes instead
    word, other = tok.decode([forced]), forced + 1
    assert tok.encode(word, allow_special=False) == [forced]
    steer = {"max_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 50}}
    r = client.completions.create(model="tiny", prompt=TEXT, **steer, extra_body={"allowed_token_ids": [forced, other]})
    assert r.choices[0].text == tok.decode([forced] * 3)
    r = client.completions.create(model="tiny", prompt=TEXT, **steer,
                                  extra_body={"allowed_token_ids": [forced, other], "bad_words": [word]})
    assert r.choices[0].text == tok.decode([other] * 3)
    # min_tokens with stop_token_ids-like EOS pressure: EOS biased up, held back for 3 tokens
    eos = model.config.eos_token_ids[0]
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=8, temperature=0,
                                  logit_bias={str(eos): 50}, extra_body={"min_tokens": 3})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"
    for body, param in (({"logit_bias": {"5": 150}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"min_tokens": 9}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, extra_body=body)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, extra_body={"allowed_token_ids": [10**6]})


def test_priority(stack, live_server, tokenizer_dir):
    server, client, model, tok = stack
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=2, temperature=0, extra_body={"priority": -3})
    assert r.choices[0].finish_reason == "length"
    tok2 = Tokenizer.from_pretrained(tokenizer_dir)
    fcfs = AsyncLLM(model=model, tokenizer=tok2, num_blocks=16, block_size=16, start=False)
    other = live_server(create_app(fcfs, served_model_name="tiny", shutdown_engine_on_exit=True))
    client2 = openai.OpenAI(base_url=other.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="priority=1: this engine schedules first come"):
        client2.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        extra_body={"priority": 1})
    assert client2.completions.create(model="tiny", prompt=TEXT, max_tokens=1, extra_body={"priority": 0}).choices
