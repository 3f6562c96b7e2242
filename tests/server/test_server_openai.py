"""The OpenAI API (chat completions, completions, models) against a live server, driven by the official
`openai` SDK, over the scripted engine double."""

import json

import httpx
import openai
import pytest
from server_support import Script

from moonlet.engine import EngineOverloadedError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
USER = [{"role": "user", "content": "hi"}]
NO_THINK = {"chat_template_kwargs": {"thinking": False}}


@pytest.fixture()
def client(scripted):
    return openai.OpenAI(base_url=scripted.url + "/v1", api_key="test-key", max_retries=0)


def test_chat_completion(client, engine):
    engine.push(Script("Hello!", cached=8))
    r = client.chat.completions.create(model="gpt-x", messages=USER, max_tokens=20, temperature=0.5, seed=7,
                                       extra_body=NO_THINK)
    assert r.object == "chat.completion" and r.model == "gpt-x"
    assert r.choices[0].message.content == "Hello!" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(engine.calls[-1].prompt_ids)
    assert r.usage.completion_tokens == len(engine.tokenizer.encode("Hello!"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 8
    p = engine.calls[-1].params
    assert (p.temperature, p.seed, p.max_tokens) == (0.5, 7, 20)


def test_reasoning_content(client, engine):
    engine.push(Script("Think hard.</think>Answer."))
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=20)
    msg = r.choices[0].message
    assert msg.content == "Answer." and msg.model_extra["reasoning_content"] == "Think hard."
    engine.push(Script("Think hard.</think>Answer."))
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=20, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Think hard.", "Answer.")


def test_tool_calls_round_trip(client, engine):
    engine.push(Script("Checking." + CALL))
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                                       extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    engine.push(Script("Sunny."))
    client.chat.completions.create(model="m", tools=TOOLS, extra_body=NO_THINK, messages=[
        {"role": "user", "content": "Weather?"}, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    prompt = engine.calls[-1].prompt_text
    assert ('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            in prompt)
    assert "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>" in prompt


def test_streamed_tool_calls_and_usage(client, engine):
    engine.push(Script("Checking." + CALL))
    stream = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_THINK)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["args"] += tc.function.arguments or ""
    assert calls == {0: {"id": "functions.get_weather:0", "name": "get_weather", "args": '{"city": "Paris"}'}}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_choice_forms(client, engine):
    engine.push(Script('{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>'))
    r = client.chat.completions.create(model="m", messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert engine.calls[-1].prompt_text.endswith("<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>")
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    engine.push(Script("plain"))
    client.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="none")
    assert "tool_declare" not in engine.calls[-1].prompt_text
    engine.push(Script("x"))
    client.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="required")
    assert engine.calls[-1].prompt_text.endswith("<|tool_calls_section_begin|>")


def test_stop_and_length(client, engine):
    engine.push(Script("alpha beta STOP gamma"))
    r = client.chat.completions.create(model="m", messages=USER, stop="STOP", extra_body=NO_THINK)
    assert r.choices[0].message.content == "alpha beta " and r.choices[0].finish_reason == "stop"
    engine.push(Script("alpha beta gamma delta"))
    r = client.chat.completions.create(model="m", messages=USER, max_completion_tokens=2, extra_body=NO_THINK)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_completions(client, engine):
    engine.push(Script(" world and more"))
    r = client.completions.create(model="m", prompt="hello", max_tokens=3, echo=True)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    ids = engine.tokenizer.encode(" world and more")[:3]
    assert r.choices[0].text == "hello" + engine.tokenizer.decode(ids)
    assert engine.calls[-1].prompt_ids == engine.tokenizer.encode("hello")
    engine.push(Script(" streamed text"))
    chunks = list(client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=50, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " streamed text"
    assert engine.calls[-1].prompt_ids == [5, 6, 7]
    assert chunks[-1].usage.prompt_tokens == 3


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["moonlet-test"] and models.data[0].object == "model"
    assert client.models.retrieve("moonlet-test").id == "moonlet-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_errors_in_openai_shape(scripted, client, engine):
    bad = openai.OpenAI(base_url=scripted.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="m", messages=USER)
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}])
    assert "text only" in e.value.body["message"]
    for n in (0, 200, -1):  # n: 1..128 choices
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=USER, n=n)
        assert e.value.param == "n" and f"n={n}" in e.value.message and "1 to 128" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt="hi", n=n)
        assert e.value.param == "n"
    for body in (b"{", json.dumps({"messages": USER}).encode(), json.dumps({"model": "m", "messages": "hi"}).encode()):
        r = httpx.post(scripted.url + "/v1/chat/completions", content=body,
                       headers={"authorization": "Bearer test-key", "content-type": "application/json"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    engine.max_model_len = 100
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 300}])
        assert e.value.code == "context_length_exceeded" and "100 tokens" in e.value.body["message"]
    finally:
        engine.max_model_len = 4096
    engine.push(Script(raise_error=EngineOverloadedError(5, 5)))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="m", messages=USER)
    assert e.value.status_code == 503


def test_n_choices(client, engine):
    """n choices: each its own message, tool calls, reasoning, logprobs and finish_reason, in index order;
    usage counts the prompt once and the completion tokens of all choices."""
    texts = ["Think one.</think>Plain answer.", "Think two.</think>Checking." + CALL, "Think three.</think>Cut off"]
    engine.push(*(Script(t) for t in texts))
    r = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, n=3, max_tokens=300, logprobs=True,
                                       top_logprobs=1)
    assert engine.calls[-1].params.n == 3 and len(engine.calls) == 1
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.model_extra["reasoning_content"] for c in r.choices] == ["Think one.", "Think two.",
                                                                              "Think three."]
    assert r.choices[0].message.content == "Plain answer." and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    (call,) = r.choices[1].message.tool_calls
    assert r.choices[1].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[2].message.content == "Cut off"
    tok = engine.tokenizer
    for i, c in enumerate(r.choices):
        ids = tok.encode(texts[i], allow_special=True)
        assert [e.logprob for e in c.logprobs.content] == pytest.approx([-0.5 * i - 0.01 * j for j in range(len(ids))])
        assert [bytes(e.bytes) for e in c.logprobs.content] == [tok.decode_bytes([t]) for t in ids]
    assert r.usage.prompt_tokens == len(engine.calls[-1].prompt_ids)
    assert r.usage.completion_tokens == sum(len(tok.encode(t, allow_special=True)) for t in texts)

    engine.push(Script("Sunny.", finish="length"), Script("Rainy."))
    r = client.chat.completions.create(model="m", messages=USER, n=2, extra_body=NO_THINK)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [("Sunny.", "length"), ("Rainy.", "stop")]


def test_n_choices_streamed(client, engine):
    """The chunks of all choices interleave, each with its index; each choice ends with its own
    finish_reason; the usage chunk comes last."""
    texts = ["First reply here.", "Checking." + CALL, "Third."]
    engine.push(*(Script(t) for t in texts))
    chunks = list(client.chat.completions.create(model="m", messages=USER, tools=TOOLS, n=3, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=NO_THINK))
    order = [c.choices[0].index for c in chunks if c.choices]
    assert order[:3] == [0, 1, 2] and order != sorted(order)  # interleaved
    content, calls, finishes = {}, {}, {}
    for c in chunks[:-1]:
        (ch,) = c.choices
        assert ch.index not in finishes  # nothing after a choice's finish chunk
        content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
        for tc in ch.delta.tool_calls or []:
            entry = calls.setdefault((ch.index, tc.index), {"name": "", "args": ""})
            entry["name"] += tc.function.name or ""
            entry["args"] += tc.function.arguments or ""
        if ch.finish_reason:
            finishes[ch.index] = ch.finish_reason
    assert content == {0: "First reply here.", 1: "Checking.", 2: "Third."}
    assert calls == {(1, 0): {"name": "get_weather", "args": '{"city": "Paris"}'}}
    assert finishes == {0: "stop", 1: "tool_calls", 2: "stop"}
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    tok = engine.tokenizer
    assert chunks[-1].usage.completion_tokens == sum(len(tok.encode(t, allow_special=True)) for t in texts)


def test_n_choices_with_a_forced_tool_call(client, engine):
    """tool_choice 'required': every choice continues the opened tool section on its own."""
    engine.push(Script('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}'
                       '<|tool_call_end|><|tool_calls_section_end|>'),
                Script('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Rome"}'
                       '<|tool_call_end|><|tool_calls_section_end|>'))
    r = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="required", n=2)
    assert engine.calls[-1].prompt_text.endswith("<|tool_calls_section_begin|>")
    cities = [json.loads(c.message.tool_calls[0].function.arguments)["city"] for c in r.choices]
    assert cities == ["Oslo", "Rome"] and {c.finish_reason for c in r.choices} == {"tool_calls"}


def test_completions_n(client, engine):
    texts = [" one two three four five six seven", " four"]
    engine.push(*(Script(t) for t in texts))
    r = client.completions.create(model="m", prompt="hello", n=2, max_tokens=5, echo=True, logprobs=1)
    tok = engine.tokenizer
    ids = [tok.encode(t)[:5] for t in texts]
    assert len(ids[0]) == 5 > len(tok.encode(texts[1]))
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == ["hello" + tok.decode(i) for i in ids]
    assert [c.finish_reason for c in r.choices] == ["length", "stop"]
    for i, c in enumerate(r.choices):
        assert c.logprobs.token_logprobs == pytest.approx([-0.5 * i - 0.01 * j for j in range(len(ids[i]))])
    assert r.usage.prompt_tokens == len(tok.encode("hello"))
    assert r.usage.completion_tokens == len(ids[0]) + len(ids[1])

    engine.push(Script(" alpha beta"), Script(" gamma"), Script(" delta epsilon zeta"))
    chunks = list(client.completions.create(model="m", prompt="hi", n=3, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for c in chunks[:-1]:
        (ch,) = c.choices
        texts[ch.index] = texts.get(ch.index, "") + ch.text
        if ch.finish_reason:
            finishes[ch.index] = ch.finish_reason
    assert texts == {0: " alpha beta", 1: " gamma", 2: " delta epsilon zeta"}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1].usage.prompt_tokens == len(tok.encode("hi"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_ended_by_its_single_call_stops_its_sample(client, engine, stream):
    """parallel_tool_calls false with n choices: when a choice's one call is complete, the server stops
    that sample in the engine (it would otherwise generate on: here, a second call and more text)."""
    def script(city):
        return Script('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "' + city +
                      '"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>'
                      '{"city": "X"}<|tool_call_end|><|tool_calls_section_end|>' + " and more" * 20, delay=0.002)

    engine.stopped_samples.clear()
    engine.push(script("Oslo"), script("Rome"))
    kwargs = dict(model="m", messages=USER, tools=TOOLS, tool_choice="required", n=2, parallel_tool_calls=False)
    if stream:
        calls = {}
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    if tc.function and tc.function.arguments:
                        calls[ch.index] = calls.get(ch.index, "") + tc.function.arguments
        cities = [json.loads(calls[i])["city"] for i in (0, 1)]
    else:
        r = client.chat.completions.create(**kwargs)
        assert [len(c.message.tool_calls) for c in r.choices] == [1, 1]
        cities = [json.loads(c.message.tool_calls[0].function.arguments)["city"] for c in r.choices]
    assert cities == ["Oslo", "Rome"]
    rid = engine.calls[-1].request_id
    assert sorted(engine.stopped_samples) == [(rid, 0), (rid, 1)]
