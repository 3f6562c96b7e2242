"""Structured outputs over HTTP: OpenAI chat / completions ``response_format`` (and vLLM's
``structured_outputs``), Responses ``text.format``, Anthropic ``output_config.format`` / beta
``output_format``. The real engine with a tiny random model must return JSON that parses and
validates (the grammar forces it); bad formats are 400s naming the field; without the grammar
library a structured request is a 400 naming the extra to install."""

from __future__ import annotations

import json
import re
import sys

import httpx
import openai
import pytest
from server_support import LiveServer

from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config
from moonlet.tokenizer import Tokenizer

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "temp": {"type": "integer", "minimum": -50, "maximum": 50},
        "sky": {"enum": ["clear", "cloudy", "rain"]},
        "hours": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 23}},
    },
    "required": ["city", "temp", "sky", "hours"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "The weather in Paris, as JSON."}]
NO_THINK = {"thinking": False}


def check(text: str) -> dict:
    """Parse ``text`` and validate it against SCHEMA (by hand: the keywords SCHEMA uses)."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == set(SCHEMA["required"]), value
    assert isinstance(value["city"], str) and len(value["city"]) <= 6
    assert isinstance(value["temp"], int) and -50 <= value["temp"] <= 50
    assert value["sky"] in ("clear", "cloudy", "rain")
    assert isinstance(value["hours"], list) and len(value["hours"]) <= 3
    assert all(isinstance(h, int) and 0 <= h <= 23 for h in value["hours"])
    return value


def openai_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": strict}}


@pytest.fixture(scope="module")
def stack(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=3)
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=160, block_size=16, max_num_seqs=16, start=False)
    app = create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)
    with LiveServer(app) as server:
        yield server, llm, tok


def post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers or {}, timeout=60)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema(stack, temperature):
    server, _, _ = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, temperature=temperature,
                                       seed=4, response_format=openai_format(), extra_body={
                                           "chat_template_kwargs": NO_THINK})
    assert r.choices[0].finish_reason == "stop"
    check(r.choices[0].message.content)


def test_chat_thinking_is_free_and_the_content_is_constrained(stack):
    server, _, _ = stack
    r = post(server.url, "/v1/chat/completions", {
        "model": "tiny", "messages": MESSAGES, "max_tokens": 160, "temperature": 0, "thinking_token_budget": 5,
        "response_format": openai_format()})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["reasoning_content"]  # five free reasoning tokens, then </think> and the constrained answer
    check(msg["content"])


def test_chat_json_object_streamed(stack):
    server, _, _ = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=150, temperature=0, stream=True,
        response_format={"type": "json_object"},
        extra_body={"chat_template_kwargs": NO_THINK, "structured_outputs": None})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: an incomplete object
        assert finish == "length" and text.startswith("{")


def test_vllm_structured_outputs_regex_and_choice(stack):
    server, _, _ = stack
    r = post(server.url, "/v1/chat/completions", {
        "model": "tiny", "messages": MESSAGES, "max_tokens": 30, "temperature": 1.0, "seed": 1,
        "chat_template_kwargs": NO_THINK, "structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("sunny", "rainy")
    r = post(server.url, "/v1/completions", {"model": "tiny", "prompt": "Code:", "max_tokens": 30, "temperature": 1,
                                             "structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert r.status_code == 200, r.text
    import re

    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", r.json()["choices"][0]["text"])
    # an EBNF grammar: a comma-separated list of one to four lowercase words in brackets
    grammar = 'root ::= "[" word ("," word)? ("," word)? ("," word)? "]"\nword ::= [a-z]+'
    r = post(server.url, "/v1/completions", {"model": "tiny", "prompt": "List:", "max_tokens": 40, "temperature": 1,
                                             "seed": 3, "structured_outputs": {"grammar": grammar}})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert r.json()["choices"][0]["finish_reason"] == "stop" and re.fullmatch(r"\[[a-z]+(,[a-z]+){0,3}\]", text), text
    bad = post(server.url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5,
                                               "structured_outputs": {"grammar": "root ::= missing"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs"


def test_completions_response_format_and_max_tokens_cut(stack):
    server, _, _ = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    full = client.completions.create(model="tiny", prompt="Weather:", max_tokens=120, temperature=0,
                                      extra_body={"response_format": openai_format()})
    assert full.choices[0].finish_reason == "stop"
    check(full.choices[0].text)
    cut = client.completions.create(model="tiny", prompt="Weather:", max_tokens=6, temperature=0,
                                     extra_body={"response_format": openai_format()})
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(cut.choices[0].text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].text)


@pytest.mark.parametrize("field", ["response_format", "structured_outputs"])
def test_vllm_structural_tag(stack, field):
    """A structural tag (vLLM's response_format type, and structured_outputs.structural_tag as JSON text):
    the content is exactly the tagged sequence."""
    server, _, _ = stack
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "<city>"}, {"type": "regex", "pattern": "[A-Z][a-z]{1,8}"},
        {"type": "const_string", "value": "</city>"}]}}
    extra = {"response_format": tag} if field == "response_format" else {"structured_outputs": {
        "structural_tag": json.dumps(tag)}}
    r = post(server.url, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 40,
                                                  "temperature": 1.0, "seed": 3, "chat_template_kwargs": NO_THINK,
                                                  **extra})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r"<city>[A-Z][a-z]{1,8}</city>", content), content


def test_responses_text_format(stack):
    server, _, _ = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model="tiny", input="The weather, as JSON.", max_output_tokens=120, temperature=0,
                                reasoning={"effort": "none"},
                                text={"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA,
                                                 "strict": True}})
    assert r.status == "completed"
    check(r.output_text)
    assert r.text.format.type == "json_schema" and r.text.format.name == "weather"
    r = client.responses.create(model="tiny", input="JSON please", max_output_tokens=150, temperature=0,
                                reasoning={"effort": "none"}, text={"format": {"type": "json_object"}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_anthropic_output_format(stack, field):
    server, _, _ = stack
    fmt = {"type": "json_schema", "schema": SCHEMA}
    body = {"model": "tiny", "max_tokens": 120, "temperature": 0, "messages": MESSAGES,
            "thinking": {"type": "disabled"}}
    body.update({"output_config": {"format": fmt}} if field == "output_config" else {"output_format": fmt})
    headers = {"anthropic-version": "2023-06-01"}
    if field == "output_format":
        headers["anthropic-beta"] = "structured-outputs-2025-11-13"
    r = post(server.url, "/v1/messages", body, headers)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["stop_reason"] == "end_turn"
    assert [b["type"] for b in data["content"]] == ["text"]
    check(data["content"][0]["text"])


@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "must be 'text'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "must be an object"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
     "response_format.json_schema.schema", "JSON Schema object"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "a b", "schema": SCHEMA}}},
     "response_format.json_schema.name", "1-64 characters"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "w", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "cannot compile"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "(open"}}, "structured_outputs", "cannot compile"),
    ("/v1/chat/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "the structural tag must be"),
    ("/v1/chat/completions", {"structured_outputs": {"structural_tag": {"type": "structural_tag", "format": {
        "type": "nope"}}}}, "structured_outputs", "cannot compile"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "structural_tag": "{}"}}, "structured_outputs",
     "exactly one"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs",
     "cannot compile"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "not both"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f"}}]},
     "response_format", "forced tool call"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
     "response_format.json_schema.schema", "JSON Schema object"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "w",
                                                         "schema": {"type": "objectx"}}}},
     "text.format.schema", "cannot compile"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "schema": SCHEMA}}},
     "text.format.name", "1-64 characters"),
    ("/v1/messages", {"max_tokens": 5, "output_format": {"type": "json_object"}}, "output_format.type",
     "must be 'json_schema'"),
    ("/v1/messages", {"max_tokens": 5, "output_config": {"format": {"type": "json_schema", "schema": 3}}},
     "output_config.format.schema", "JSON Schema object"),
])
def test_bad_formats_are_400_with_param(stack, path, body, param, fragment):
    server, llm, _ = stack
    body = {"model": "tiny", **({"messages": MESSAGES} if path != "/v1/completions" and path != "/v1/responses"
                                else {}), **body}
    r = post(server.url, path, body, {"anthropic-version": "2023-06-01"} if path == "/v1/messages" else {})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    if path != "/v1/messages":  # Anthropic errors carry no param field; the message names it
        assert err["param"] == param, err
    else:
        assert param in err["message"], err
    assert llm.stats()["running"] == 0


def test_without_the_library_a_structured_request_is_a_400_naming_the_extra(scripted, engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails
    r = post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES,
                                                    "response_format": {"type": "json_object"}},
             {"authorization": "Bearer test-key"})
    assert r.status_code == 400 and "moonlet[structured]" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "response_format"
    r = post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES},
             {"authorization": "Bearer test-key"})
    assert r.status_code == 200  # everything else works
    # the Responses API's default strictness needs the library: without it, tools that do not ask for
    # strict are served unconstrained (and echoed as not strict); an explicit strict: true is a 400
    tool = {"type": "function", "name": "get_weather", "parameters": SCHEMA}
    calls = len(engine.calls)
    r = post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "tools": [tool]},
             {"authorization": "Bearer test-key"})
    assert r.status_code == 200, r.text
    assert r.json()["tools"][0]["strict"] is False and engine.calls[calls].params.structured is None
    r = post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "tools": [dict(tool, strict=True)]},
             {"authorization": "Bearer test-key"})
    assert r.status_code == 400 and "moonlet[structured]" in r.json()["error"]["message"], r.text


def test_scripted_engine_receives_the_constraint(scripted, engine):
    """Each API's field reaches SamplingParams.structured in the same shape."""
    auth = {"authorization": "Bearer test-key", "x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES,
                                                "response_format": openai_format(strict=False)}, auth)
    post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "w", "schema": SCHEMA, "strict": True}}}, auth)
    post(scripted.url, "/v1/messages", {"model": "m", "max_tokens": 5, "messages": MESSAGES,
                                        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}, auth)
    post(scripted.url, "/v1/completions", {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}},
         auth)
    specs = [c.params.structured for c in engine.calls[-4:]]
    assert [(s.kind, s.strict, s.any_whitespace) for s in specs] == [
        ("json_schema", False, False), ("json_schema", True, False), ("json_schema", True, False),
        ("json_object", True, False)]
    assert all(s.json_schema == SCHEMA for s in specs[:3])


# ---- strict tools -----------------------------------------------------------------------------------
TOOL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
                "additionalProperties": False}
SCHEMAS = {"forecast": TOOL_SCHEMA, "paint": COLOR_SCHEMA}


def check_args(name: str, args) -> None:
    """A call's name is declared and its arguments (JSON text or an object) are valid under its schema."""
    assert name in SCHEMAS, name
    value = json.loads(args) if isinstance(args, str) else args
    schema = SCHEMAS[name]
    assert isinstance(value, dict) and set(value) == set(schema["required"]), value
    if name == "forecast":
        assert isinstance(value["city"], str) and len(value["city"]) <= 6
        assert isinstance(value["days"], int) and 1 <= value["days"] <= 7
    else:
        assert value["color"] in ("red", "blue")


def openai_tools(strict=True) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "parameters": s, **({"strict": strict} if strict is not None
                                                                              else {})}}
            for n, s in SCHEMAS.items()]


@pytest.mark.parametrize("temperature,choice", [(0.0, "required"), (1.0, "required"),
                                                (1.0, {"type": "function", "function": {"name": "paint"}})])
def test_chat_strict_tools_forced_calls_are_valid(stack, temperature, choice):
    server, _, _ = stack
    for seed in range(3):
        r = post(server.url, "/v1/chat/completions", {
            "model": "tiny", "messages": MESSAGES, "max_tokens": 120, "temperature": temperature, "seed": seed,
            "tools": openai_tools(), "tool_choice": choice, "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        choice0 = r.json()["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", choice0
        calls = choice0["message"]["tool_calls"]
        assert len(calls) == 1  # parallel_tool_calls false: one call
        check_args(calls[0]["function"]["name"], calls[0]["function"]["arguments"])
        if isinstance(choice, dict):
            assert calls[0]["function"]["name"] == "paint"


def test_chat_strict_tools_streamed_and_auto(stack):
    server, _, _ = stack
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, temperature=0,
                                            tools=openai_tools(), tool_choice="required", parallel_tool_calls=False,
                                            stream=True)
    calls: dict[int, dict] = {}
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert len(calls) == 1
    check_args(calls[0]["name"], calls[0]["arguments"])
    for seed in range(3):  # auto: text stays allowed; any call made is valid
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed,
                                           tools=openai_tools(), extra_body={"chat_template_kwargs": NO_THINK})
        for call in r.choices[0].message.tool_calls or []:
            check_args(call.function.name, call.function.arguments)


def test_responses_tools_are_strict_by_default(stack):
    server, _, _ = stack
    tools = [{"type": "function", "name": n, "parameters": s} for n, s in SCHEMAS.items()]
    r = post(server.url, "/v1/responses", {"model": "tiny", "input": "Paint it.", "max_output_tokens": 120,
                                           "temperature": 0, "tools": tools, "tool_choice": "required",
                                           "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    data = r.json()
    calls = [item for item in data["output"] if item["type"] == "function_call"]
    assert len(calls) == 1
    check_args(calls[0]["name"], calls[0]["arguments"])
    assert all(t["strict"] is True for t in data["tools"])


def test_anthropic_strict_tools(stack):
    server, _, _ = stack
    tools = [{"name": n, "input_schema": s, "strict": True} for n, s in SCHEMAS.items()]
    for seed, choice in enumerate([{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "forecast"}]):
        r = post(server.url, "/v1/messages", {"model": "tiny", "max_tokens": 120, "temperature": 1.0, "messages": MESSAGES,
                                              "tools": tools, "tool_choice": choice},
                 {"anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
        data = r.json()
        uses = [b for b in data["content"] if b["type"] == "tool_use"]
        assert uses and data["stop_reason"] == "tool_use", data
        for block in uses:
            check_args(block["name"], block["input"])
        if choice["type"] == "tool":
            assert {b["name"] for b in uses} == {"forecast"}
        else:
            assert len(uses) == 1


def test_a_strict_tool_schema_that_cannot_compile_is_a_400(stack):
    server, llm, _ = stack
    tools = [{"type": "function", "function": {"name": "bad", "parameters": {"type": "objectx"}, "strict": True}}]
    r = post(server.url, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": tools})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools" and "tool 'bad'" in err["message"], err
    assert llm.stats()["running"] == 0


def test_scripted_engine_receives_the_tool_constraint(scripted, engine):
    """Strict tools reach SamplingParams.structured as a tools constraint; non-strict ones leave the
    request unconstrained, as before."""
    auth = {"authorization": "Bearer test-key", "x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "tools": openai_tools(None)}, auth)
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "tools": openai_tools(False)}, auth)
    post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "paint", "parameters": COLOR_SCHEMA, "strict": False}]}, auth)
    post(scripted.url, "/v1/messages", {"model": "m", "max_tokens": 5, "messages": MESSAGES,
                                        "tools": [{"name": "paint", "input_schema": COLOR_SCHEMA}]}, auth)
    assert [c.params.structured for c in engine.calls[-4:]] == [None] * 4
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "tools": [
        openai_tools()[0], openai_tools(False)[1]], "tool_choice": "required", "parallel_tool_calls": False}, auth)
    post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "paint", "parameters": COLOR_SCHEMA}],
        "tool_choice": {"type": "function", "name": "paint"}}, auth)
    post(scripted.url, "/v1/messages", {"model": "m", "max_tokens": 5, "messages": MESSAGES,
                                        "tools": [{"name": "paint", "input_schema": COLOR_SCHEMA, "strict": True}]},
         auth)
    specs = [c.params.structured for c in engine.calls[-3:]]
    assert [(s.kind, s.tool_start, s.parallel_tool_calls, s.param) for s in specs] == [
        ("tools", "section", False, "tools"), ("tools", "arguments", True, "tools"), ("tools", "text", True, "tools")]
    assert specs[0].tools == [{"name": "forecast", "parameters": TOOL_SCHEMA}, {"name": "paint", "parameters": None}]
    assert specs[1].tools == specs[2].tools == [{"name": "paint", "parameters": COLOR_SCHEMA}]


# ---- a response format beside tools ---------------------------------------------------------------
def test_scripted_engine_receives_the_format_beside_the_tools(scripted, engine):
    """A JSON format in a request whose reply may call tools becomes one constraint: the tools (strict
    ones with their schemas, the others any object) with the format as its content — in all three APIs.
    A forbidden tool choice, or a regex, keeps the format alone."""
    auth = {"authorization": "Bearer test-key", "x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "response_format": fmt,
                                                "tools": [openai_tools()[0], openai_tools(False)[1]]}, auth)
    post(scripted.url, "/v1/responses", {"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "paint", "parameters": COLOR_SCHEMA}],
        "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}}}, auth)
    post(scripted.url, "/v1/messages", {"model": "m", "max_tokens": 5, "messages": MESSAGES,
                                        "tools": [{"name": "paint", "input_schema": COLOR_SCHEMA}],
                                        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}, auth)
    specs = [c.params.structured for c in engine.calls[-3:]]
    assert [(s.kind, s.tool_start, s.param) for s in specs] == [
        ("tools", "text", "response_format.json_schema.schema"), ("tools", "text", "text.format.schema"),
        ("tools", "text", "output_config.format.schema")]
    assert specs[0].tools == [{"name": "forecast", "parameters": TOOL_SCHEMA}, {"name": "paint", "parameters": None}]
    assert specs[1].tools == [{"name": "paint", "parameters": COLOR_SCHEMA}]  # Responses: strict by default
    assert specs[2].tools == [{"name": "paint", "parameters": None}]  # Messages: not strict unless asked
    assert all(s.content.kind == "json_schema" and s.content.json_schema == SCHEMA for s in specs)
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "response_format": fmt,
                                                "tools": openai_tools(), "tool_choice": "none"}, auth)
    post(scripted.url, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "tools": openai_tools(),
                                                "structured_outputs": {"regex": "[a-z]+"}}, auth)
    kinds = [c.params.structured.kind for c in engine.calls[-2:]]
    assert kinds == ["json_schema", "regex"]


@pytest.mark.parametrize("call_tool", [False, True])
def test_chat_format_beside_tools_answers_json_or_calls_a_tool(stack, call_tool):
    """The real engine: with the tool-section opener pushed up (logit_bias) the reply is a valid call
    (finish_reason tool_calls); pushed down, JSON under the format."""
    server, _, tok = stack
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    bias = {str(tok.token_id("<|tool_calls_section_begin|>")): 100 if call_tool else -100}
    for seed in range(2):
        r = post(server.url, "/v1/chat/completions", {
            "model": "tiny", "messages": MESSAGES, "max_tokens": 150, "temperature": 1.0, "seed": seed,
            "response_format": fmt, "tools": openai_tools(), "parallel_tool_calls": False, "logit_bias": bias,
            "chat_template_kwargs": NO_THINK})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if call_tool:
            assert choice["finish_reason"] == "tool_calls", choice
            calls = choice["message"]["tool_calls"]
            assert len(calls) == 1
            check_args(calls[0]["function"]["name"], calls[0]["function"]["arguments"])
        else:
            assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls"), choice
            check(choice["message"]["content"])
