"""The Anthropic Messages API against a live server, driven by the official `anthropic` SDK (and raw
HTTP where the SDK hides the wire). The engine is the scripted double from conftest: it replays
exact model texts in K2's output format through the real tokenizer."""

import json

import anthropic
import httpx
import pytest
from server_support import Script

from moonlet.engine import EngineOverloadedError

TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         {"name": "get_time", "description": "Time in a zone",
          "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}]
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def client(scripted):
    return anthropic.Anthropic(base_url=scripted.url, api_key="test-key", max_retries=0)


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]  # the JSON carries the same type as the event line
        events.append((lines["event"], data))
    return events


def test_text_reply_non_streaming(client, engine):
    engine.push(Script("Hello there, friend."))
    raw = client.messages.with_raw_response.create(model="client-chosen-name", max_tokens=64, messages=USER,
                                                   thinking={"type": "disabled"})
    assert raw.headers["request-id"].startswith("req_")
    msg = raw.parse()
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "client-chosen-name"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello there, friend."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    call = engine.calls[-1]
    assert msg.usage.input_tokens == len(call.prompt_ids)
    assert msg.usage.output_tokens == len(engine.tokenizer.encode("Hello there, friend."))
    assert msg.usage.cache_read_input_tokens == 0
    # thinking disabled: the K2.6 template closes the think block in the generation prompt
    assert call.prompt_text.endswith("<|im_assistant|>assistant<|im_middle|><think></think>")
    assert call.params.max_tokens == 64 and call.params.skip_special_tokens is False


def test_streaming_event_sequence_is_anthropics(scripted, engine):
    engine.push(Script("I should greet.</think>Hi!", cached=16))
    body = {"model": "m", "max_tokens": 2048, "messages": USER, "stream": True, "thinking": {"type": "enabled",
                                                                                           "budget_tokens": 1024}}
    r = httpx.post(scripted.url + "/v1/messages", json=body, headers={"x-api-key": "test-key"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    types = [t for t, _ in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["cache_read_input_tokens"] == 16
    assert start["usage"]["input_tokens"] == len(engine.calls[-1].prompt_ids) - 16
    body_events = [(t, d) for t, d in events[1:-2] if t != "ping"]
    # block 0 thinking: start, thinking deltas, signature, stop; block 1 text
    assert body_events[0][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    stops = [i for i, (t, _) in enumerate(body_events) if t == "content_block_stop"]
    assert len(stops) == 2
    assert body_events[stops[0] - 1][1]["delta"]["type"] == "signature_delta"
    thinking = "".join(d["delta"].get("thinking", "") for t, d in body_events[:stops[0]] if t == "content_block_delta")
    assert thinking == "I should greet."
    assert body_events[stops[0] + 1][1] == {"type": "content_block_start", "index": 1,
                                            "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for t, d in body_events[stops[0] + 1:] if t == "content_block_delta")
    assert text == "Hi!"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(engine.tokenizer.encode("I should greet.</think>Hi!"))
    assert "ping" in types


def test_sdk_stream_accumulates_thinking_and_text(client, engine):
    engine.push(Script("Plan: greet.</think>Hello!"))
    with client.messages.stream(model="m", max_tokens=64, messages=USER,
                                thinking={"type": "adaptive"}) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Hello!"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Plan: greet." and final.content[0].signature
    assert engine.calls[-1].prompt_text.endswith("<think>")


def test_tool_use_round_trip_preserves_ids(client, engine):
    engine.push(Script("Let me check." + CALL))
    msg = client.messages.create(model="m", max_tokens=100, tools=TOOLS, thinking={"type": "disabled"},
                                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    use = msg.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert use.id.startswith("toolu_") and all(c.isalnum() or c in "_-" for c in use.id)
    decl = json.dumps([{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                          "parameters": t["input_schema"]}} for t in TOOLS],
                      ensure_ascii=False)
    assert engine.calls[-1].prompt_text.startswith(f"<|im_system|>tool_declare<|im_middle|>{decl}<|im_end|>")

    engine.push(Script("It is sunny in Paris."))
    msg2 = client.messages.create(model="m", max_tokens=100, tools=TOOLS, thinking={"type": "disabled"}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21C"}]}])
    assert msg2.content[0].text == "It is sunny in Paris." and msg2.stop_reason == "end_turn"
    prompt = engine.calls[-1].prompt_text
    # the spec's K2 format: the call is rendered with its K2 id and the result refers to the same id
    assert ('<|im_assistant|>assistant<|im_middle|><think></think>Let me check.<|tool_calls_section_begin|>'
            '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
            '<|tool_call_end|><|tool_calls_section_end|><|im_end|>') in prompt
    assert "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nSunny, 21C<|im_end|>" in prompt


def test_streamed_tool_use_parses(client, engine):
    engine.push(Script(CALL.replace("<|tool_calls_section_end|>", "") + "<|tool_call_begin|>functions.get_time:1"
                       '<|tool_call_argument_begin|>{"zone": "CET"}<|tool_call_end|><|tool_calls_section_end|>'))
    with client.messages.stream(model="m", max_tokens=100, tools=TOOLS, messages=USER,
                                thinking={"type": "disabled"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert [(b.name, b.input) for b in final.content] == [("get_weather", {"city": "Paris"}),
                                                           ("get_time", {"zone": "CET"})]
    assert len({b.id for b in final.content}) == 2 and final.stop_reason == "tool_use"


def test_foreign_tool_ids_get_k2_ids(client, engine):
    engine.push(Script("ok"))
    client.messages.create(model="m", max_tokens=10, tools=TOOLS, thinking={"type": "disabled"}, messages=[
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "opaque"},
                                          {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_time",
                                           "input": {"zone": "UTC"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                                      "content": [{"type": "text", "text": "noon"}], "is_error": False}]}])
    prompt = engine.calls[-1].prompt_text
    assert "<|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.get_time:0\nnoon" in prompt
    assert "opaque" not in prompt  # redacted thinking cannot be read back; it is dropped


def test_malformed_tool_call_comes_back_as_text(client, engine):
    bad = '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": ' \
          '<|tool_call_end|><|tool_calls_section_end|>'
    engine.push(Script("Trying." + bad))
    msg = client.messages.create(model="m", max_tokens=100, tools=TOOLS, messages=USER, thinking={"type": "disabled"})
    assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "end_turn"
    assert "get_weather" in msg.content[0].text


def test_a_request_without_tools_never_gets_a_tool_call(client, engine, scripted):
    """The model may still try to open a tool section (K2 models are trained to); with no tool declared
    every API stops it there, as for tool_choice none, so no reply names a tool the client never offered."""
    section = engine.tokenizer.token_id("<|tool_calls_section_begin|>")
    engine.push(Script("Let me check."))
    msg = client.messages.create(model="m", max_tokens=50, messages=USER)
    assert engine.calls[-1].params.stop_token_ids == [section] and "tool_use" not in [b.type for b in msg.content]
    headers = {"authorization": "Bearer test-key"}
    for path, body in (("/v1/chat/completions", {"model": "m", "messages": USER}),
                       ("/v1/responses", {"model": "m", "input": "hi"})):
        engine.push(Script("Let me check."))
        assert httpx.post(scripted.url + path, json=body, headers=headers, timeout=30).status_code == 200
        assert engine.calls[-1].params.stop_token_ids == [section], path


def test_tool_choice_steers_the_reply(client, engine):
    engine.push(Script('{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>'))
    msg = client.messages.create(model="m", max_tokens=50, tools=TOOLS, messages=USER,
                                 tool_choice={"type": "tool", "name": "get_weather"})
    assert engine.calls[-1].prompt_text.endswith(
        "<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>")
    assert [(b.type, b.name, b.input) for b in msg.content] == [("tool_use", "get_weather", {"city": "Oslo"})]

    engine.push(Script("No tools."))
    client.messages.create(model="m", max_tokens=50, tools=TOOLS, messages=USER, tool_choice={"type": "none"})
    call = engine.calls[-1]
    assert "tool_declare" not in call.prompt_text
    assert call.params.stop_token_ids == [engine.tokenizer.token_id("<|tool_calls_section_begin|>")]

    engine.push(Script('<|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>{}<|tool_call_end|>'
                       '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|>'
                       '<|tool_calls_section_end|>'))
    msg = client.messages.create(model="m", max_tokens=80, tools=TOOLS, messages=USER,
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert engine.calls[-1].prompt_text.endswith("<|tool_calls_section_begin|>")
    assert [b.type for b in msg.content] == ["tool_use"] and msg.stop_reason == "tool_use"

    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        client.messages.create(model="m", max_tokens=5, tools=TOOLS, messages=USER,
                               tool_choice={"type": "tool", "name": "nope"})


def test_stop_reasons(client, engine):
    engine.push(Script("one two three END four"))
    msg = client.messages.create(model="m", max_tokens=50, messages=USER, stop_sequences=["END"],
                                 thinking={"type": "disabled"})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "END"
    assert msg.content[0].text == "one two three "
    engine.push(Script("a long answer that goes on and on"))
    msg = client.messages.create(model="m", max_tokens=3, messages=USER, thinking={"type": "disabled"})
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    assert engine.calls[-1].params.stop == ["END"] or engine.calls[-1].params.max_tokens == 3


def test_sampling_fields_and_system_and_merging(client, engine):
    engine.push(Script("ok"))
    # this SDK version has no sampling keywords; they travel as body fields
    client.messages.create(model="m", max_tokens=20, extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 40},
                           system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                                   {"type": "text", "text": "Be kind."}],
                           messages=[{"role": "user", "content": "a"}, {"role": "user", "content": [
                               {"type": "text", "text": "b"}]}], thinking={"type": "disabled"})
    call = engine.calls[-1]
    assert (call.params.temperature, call.params.top_p, call.params.top_k) == (0.3, 0.9, 40)
    assert call.prompt_text.startswith("<|im_system|>system<|im_middle|>Be brief.\n\nBe kind.<|im_end|>")
    assert call.prompt_text.count("<|im_user|>") == 1  # consecutive user turns merged
    assert "<|im_user|>user<|im_middle|>a\n\nb<|im_end|>" in call.prompt_text


def test_final_assistant_turn_is_a_prefill(client, engine):
    engine.push(Script(" 4."))
    msg = client.messages.create(model="m", max_tokens=20, messages=[
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is"}])
    assert engine.calls[-1].prompt_text.endswith("<|im_middle|><think></think>The answer is")
    assert msg.content[0].text == " 4."


def test_count_tokens_matches_the_prompt(client, engine):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Count me please"}], tools=TOOLS,
                  system="sys", thinking={"type": "disabled"})
    counted = client.messages.count_tokens(**kwargs)
    engine.push(Script("ok"))
    msg = client.messages.create(max_tokens=5, **kwargs)
    assert counted.input_tokens == len(engine.calls[-1].prompt_ids) == msg.usage.input_tokens
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "Count me please"}],
        tools=[{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                 "parameters": t["input_schema"]}} for t in TOOLS],
        tokenize=True, thinking=False)
    assert counted.input_tokens == len(expected)


def test_models_endpoints(client, scripted):
    page = client.models.list()
    assert [m.id for m in page.data] == ["moonlet-test"] and page.data[0].type == "model"
    assert page.has_more is False and page.first_id == page.last_id == "moonlet-test"
    info = client.models.retrieve("moonlet-test")
    assert info.display_name == "moonlet-test" and info.max_input_tokens == 4096
    assert client.models.list(after_id="moonlet-test").data == []
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-opus-4")
    with pytest.raises(anthropic.BadRequestError):
        client.models.list(limit=0)


def test_errors_in_anthropic_shape(scripted, engine):
    bad = anthropic.Anthropic(base_url=scripted.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="m", max_tokens=5, messages=USER)
    assert e.value.body["error"]["type"] == "authentication_error" and e.value.body["request_id"].startswith("req_")
    bearer = httpx.post(scripted.url + "/v1/messages/count_tokens", json={"model": "m", "messages": USER},
                        headers={"authorization": "Bearer test-key"})
    assert bearer.status_code == 200

    h = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "m", "messages": USER}).encode(),
                 json.dumps({"model": "m", "max_tokens": "many", "messages": USER}).encode(),
                 json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}).encode(),
                 json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]}).encode(),
                 json.dumps({"model": "m", "max_tokens": 5, "messages": USER, "temperature": 3}).encode()):
        r = httpx.post(scripted.url + "/v1/messages", content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    r = httpx.post(scripted.url + "/v1/nowhere", json={}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(scripted.url + "/v1/messages", content=b"x" * (3 * 2**20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_over_long_prompt_states_both_numbers(client, engine):
    engine.max_model_len = 200
    try:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "word " * 400}])
        message = e.value.body["error"]["message"]
        n = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "word " * 400}]).input_tokens
        assert f"{n} tokens" in message and "200" in message and "prompt is too long" in message
        # a prompt that fits: max_tokens beyond the window is clamped, not refused
        engine.push(Script("fine"))
        client.messages.create(model="m", max_tokens=20000, messages=USER)
        assert engine.calls[-1].params.max_tokens == 200 - len(engine.calls[-1].prompt_ids)
    finally:
        engine.max_model_len = 4096


def test_overloaded_engine_is_529(client, engine):
    engine.push(Script(raise_error=EngineOverloadedError(10, 10)))
    with pytest.raises(anthropic.APIStatusError) as e:
        client.messages.create(model="m", max_tokens=5, messages=USER)
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"


def test_agent_cli_request_is_accepted(scripted, engine):
    """What a current agent CLI sends in print mode (spec): many betas, adaptive thinking, a JSON-string
    user_id, context_management, output_config, ~24 large tools, system and first user turn in blocks."""
    big_schema = {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#", "additionalProperties": False,
                  "properties": {f"p{k}": {"type": "string", "description": "x" * 200} for k in range(8)},
                  "required": ["p0"]}
    tools = [{"name": f"Tool{i}", "description": "d" * 500, "input_schema": big_schema} for i in range(24)]
    tools[0]["cache_control"] = {"type": "ephemeral"}
    body = {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 64000, "stream": True,
        "thinking": {"type": "adaptive"},
        "metadata": {"user_id": json.dumps({"device_id": "abc", "session_id": "s-1"})},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "system": [{"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be careful."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                                  {"type": "text", "text": "List files",
                                                   "cache_control": {"type": "ephemeral"}}]}],
        "tools": tools, "temperature": 1,
    }
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01", "anthropic-dangerous-direct-browser-access":
               "true", "x-app": "cli", "user-agent": "agent-cli/2.0",
               "anthropic-beta": ",".join(["claude-code-20250219", "interleaved-thinking-2025-05-14",
                                           "context-management-2025-06-27", "fine-grained-tool-streaming-2025-05-14",
                                           "oauth-2025-04-20", "effort-2025-11-24", "advanced-tool-use-2025-11-20",
                                           "context-1m-2025-08-07", "token-efficient-tools-2025-02-19",
                                           "output-128k-2025-02-19", "prompt-caching-scope-2026-01-05",
                                           "web-search-2025-03-05"])}
    engine.max_model_len = 262144
    count_body = {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "temperature")}
    n = httpx.post(scripted.url + "/v1/messages/count_tokens?beta=true", json=count_body, headers=headers,
                   timeout=60).json()["input_tokens"]
    engine.max_model_len = n + 1000  # max_tokens 64000 does not fit: clamped to what the window leaves
    try:
        engine.push(Script("Thinking about it.</think>Here are the files."))
        r = httpx.post(scripted.url + "/v1/messages?beta=true", json=body, headers=headers, timeout=60)
    finally:
        engine.max_model_len = 4096
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1][0] == "message_stop" and events[-2][1]["delta"]["stop_reason"] == "end_turn"
    call = engine.calls[-1]
    assert len(call.prompt_ids) == n and call.params.max_tokens == 1000
    assert call.prompt_text.count('"name": "Tool') == 24
    assert "<|im_user|>user<|im_middle|><system-reminder>ctx</system-reminder>\n\nList files<|im_end|>" in call.prompt_text
