"""The OpenAI Responses API (``/v1/responses``) against a live server, driven by the official `openai`
SDK and by raw HTTP: over the scripted engine double (exact model outputs: thinking, tool calls,
stops), over a tiny random model (greedy text checked against the model's own cached loop), and
over the bundled moonlet-tiny, which calls its calculator tool and uses the result."""

import copy
import json
import time

import httpx
import openai
import pytest
from server_support import LiveServer, Script
from test_server_fuzz import ODD_VALUES, mutated, paths

from moonlet.chat import parse_output
from moonlet.commands.generate import generate_ids
from moonlet.engine import AsyncLLM, EngineOverloadedError, RequestOutput
from moonlet.server import create_app
from moonlet.server.responses import ResponseStore

KEY = {"authorization": "Bearer test-key"}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
NO_THINK = {"effort": "none"}


@pytest.fixture()
def client(scripted):
    return openai.OpenAI(base_url=scripted.url + "/v1", api_key="test-key", max_retries=0)


def rendered_ids(tok, messages, tools=None, **kwargs):
    """The reference prompt: the chat template applied to chat-form messages, as token ids."""
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
    return tok.encode(text, allow_special=True)


def sse_events(url, body, headers=KEY):
    """(event name, payload) pairs of a streamed response, read as raw server-sent events."""
    events = []
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                name = None
    return events


def post(url, body, headers=KEY):
    return httpx.post(url + "/v1/responses", json=body, headers=headers, timeout=30)


# ---- the scripted engine: protocol ---------------------------------------------------------------

def test_text_response(client, engine):
    engine.push(Script("Hello!", cached=8))
    r = client.responses.create(model="gpt-x", input="hi", instructions="Be brief.", max_output_tokens=20,
                                temperature=0.5, top_p=0.9, reasoning=NO_THINK, metadata={"k": "v"}, user="u1")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "gpt-x"
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert [(p.type, p.text) for p in msg.content] == [("output_text", "Hello!")] and r.output_text == "Hello!"
    call = engine.calls[-1]
    tok = engine.tokenizer
    assert call.prompt_ids == rendered_ids(tok, [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}], thinking=False)
    assert (call.params.temperature, call.params.top_p, call.params.max_tokens) == (0.5, 0.9, 20)
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (len(call.prompt_ids), len(tok.encode("Hello!")))
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == 8 and u.output_tokens_details.reasoning_tokens == 0
    # echoed parameters
    assert (r.instructions, r.max_output_tokens, r.temperature, r.top_p) == ("Be brief.", 20, 0.5, 0.9)
    assert (r.metadata, r.user, r.tool_choice, r.tools, r.parallel_tool_calls) == ({"k": "v"}, "u1", "auto", [], True)
    assert r.reasoning.effort == "none" and r.text.format.type == "text"


def test_message_items_and_roles(client, engine):
    engine.push(Script("ok"))
    client.responses.create(model="m", reasoning=NO_THINK, input=[
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
        {"role": "user", "content": "d"}])
    expected = [{"role": "system", "content": "Rules."}, {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]
    assert engine.calls[-1].prompt_ids == rendered_ids(engine.tokenizer, expected, thinking=False)


def test_reasoning_output_and_reasoning_tokens(client, engine):
    engine.push(Script("Think hard.</think>Answer."))
    r = client.responses.create(model="m", input="hi")  # the kimi-k2.6 template thinks by default
    assert engine.calls[-1].prompt_text.endswith("<think>")
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", "Think hard.")]
    assert r.output_text == "Answer."
    assert r.usage.output_tokens_details.reasoning_tokens == len(engine.tokenizer.encode("Think hard."))
    assert r.usage.output_tokens == len(engine.tokenizer.encode("Think hard.</think>Answer.", allow_special=True))


EXPECTED_EVENTS = [
    "response.created", "response.in_progress",
    "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
    "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
    "response.output_item.added", "response.content_part.added", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.output_item.added", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.output_item.done", "response.completed"]


def collapse_deltas(names):
    """The event names with each run of delta events shown once."""
    return [n for i, n in enumerate(names) if not (n.endswith(".delta") and i and names[i - 1] == n)]


def test_stream_event_sequence_and_deltas_add_up(scripted, client, engine):
    text = "Let me see.</think>Checking the map." + CALL
    engine.push(Script(text))
    events = sse_events(scripted.url, {"model": "m", "input": "Weather in Paris?", "tools": TOOLS})
    names = [name for name, _ in events]
    assert collapse_deltas(names) == EXPECTED_EVENTS
    assert names.count("response.output_text.delta") > 1  # text streams as it is generated
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created, final = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == final["id"]
    output = final["output"]
    assert [o["type"] for o in output] == ["reasoning", "message", "function_call"]
    # the deltas of each item add up to the final item
    by_item: dict[str, str] = {}
    for _, ev in events:
        if ev["type"].endswith(".delta"):
            by_item[ev["item_id"]] = by_item.get(ev["item_id"], "") + ev["delta"]
    assert by_item == {output[0]["id"]: "Let me see.", output[1]["id"]: "Checking the map.",
                       output[2]["id"]: '{"city": "Paris"}'}
    done_items = [ev["item"] for _, ev in events if ev["type"] == "response.output_item.done"]
    assert done_items == output
    assert output[2] | {"id": None} == {"id": None, "type": "function_call", "status": "completed",
                                        "call_id": "functions.get_weather:0", "name": "get_weather",
                                        "arguments": '{"city": "Paris"}'}
    # the same request without streaming gives the same output (ids aside) and usage
    engine.push(Script(text))
    plain = post(scripted.url, {"model": "m", "input": "Weather in Paris?", "tools": TOOLS}).json()
    strip = lambda items: [dict(i, id=None) for i in items]  # noqa: E731
    assert strip(plain["output"]) == strip(output) and plain["usage"] == final["usage"]

    # the SDK's stream helper assembles the same final response
    engine.push(Script(text))
    with client.responses.stream(model="m", input="Weather in Paris?", tools=TOOLS) as stream:
        deltas = "".join(ev.delta for ev in stream if ev.type == "response.output_text.delta")
        sdk_final = stream.get_final_response()
    assert deltas == "Checking the map." and sdk_final.output_text == "Checking the map."
    assert strip([o.model_dump(exclude_none=True) for o in sdk_final.output]) == \
        strip([{k: v for k, v in o.items() if v is not None} for o in output])


def test_tool_call_round_trip(client, engine):
    engine.push(Script("Checking." + CALL))
    first = client.responses.create(model="m", input="Weather?", tools=TOOLS, reasoning=NO_THINK)
    message, call = first.output
    assert message.type == "message" and first.output_text == "Checking."
    assert call.type == "function_call" and call.call_id == "functions.get_weather:0" and call.id.startswith("fc_")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert first.tools[0].name == "get_weather" and first.tools[0].parameters == TOOLS[0]["parameters"]

    engine.push(Script("Sunny in Paris."))
    second = client.responses.create(model="m", tools=TOOLS, reasoning=NO_THINK, store=False, input=[
        {"role": "user", "content": "Weather?"}, *[o.model_dump(exclude_none=True) for o in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}])
    assert second.output_text == "Sunny in Paris."
    reference = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": "Checking.", "tool_calls": [
                     {"id": "functions.get_weather:0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
                  "content": "sunny, 24 C"}]
    assert engine.calls[-1].prompt_ids == rendered_ids(engine.tokenizer, reference, CHAT_TOOLS, thinking=False)


def test_foreign_call_ids_and_reasoning_items_are_fed_back(client, engine):
    engine.push(Script("Done."))
    client.responses.create(model="m", tools=TOOLS, input=[
        {"role": "user", "content": "Weather in Rome and Oslo?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two."}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "cold"}]},
        {"type": "function_call_output", "call_id": "call_a", "output": "warm"}])
    reference = [{"role": "user", "content": "Weather in Rome and Oslo?"},
                 {"role": "assistant", "content": "", "reasoning_content": "Two.", "tool_calls": [
                     {"id": "functions.get_weather:0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
                     {"id": "functions.get_weather:1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                 {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "cold"},
                 {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "warm"}]
    assert engine.calls[-1].prompt_ids == rendered_ids(engine.tokenizer, reference, CHAT_TOOLS)
    assert "<think>Two.</think>" in engine.calls[-1].prompt_text  # the tool loop keeps its reasoning


def test_tool_choice_forms(client, engine):
    tok = engine.tokenizer
    engine.push(Script('{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>'))
    r = client.responses.create(model="m", input="hi", tools=TOOLS, tool_choice={"type": "function",
                                                                                 "name": "get_weather"})
    assert engine.calls[-1].prompt_text.endswith(
        "<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>")  # a forced call switches thinking off
    (call,) = r.output
    assert (call.call_id, json.loads(call.arguments)) == ("functions.get_weather:0", {"city": "Rome"})
    assert r.tool_choice.type == "function" and r.tool_choice.name == "get_weather"

    engine.push(Script("plain text"))
    r = client.responses.create(model="m", input="hi", tools=TOOLS, tool_choice="none", reasoning=NO_THINK)
    assert "tool_declare" not in engine.calls[-1].prompt_text and r.output_text == "plain text"
    assert tok.token_id("<|tool_calls_section_begin|>") in engine.calls[-1].params.stop_token_ids

    engine.push(Script('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}'
                       '<|tool_call_end|><|tool_calls_section_end|>'))
    r = client.responses.create(model="m", input="hi", tools=TOOLS, tool_choice="required")
    assert engine.calls[-1].prompt_text.endswith("<|tool_calls_section_begin|>")
    assert [o.type for o in r.output] == ["function_call"] and r.tool_choice == "required"


def test_parallel_tool_calls_false_keeps_the_first_call(client, engine):
    two = CALL.replace("<|tool_calls_section_end|>", "") + (
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        '<|tool_calls_section_end|>')
    engine.push(Script(two))
    r = client.responses.create(model="m", input="hi", tools=TOOLS, reasoning=NO_THINK)
    assert [json.loads(o.arguments)["city"] for o in r.output] == ["Paris", "Oslo"]
    engine.push(Script(two))
    r = client.responses.create(model="m", input="hi", tools=TOOLS, reasoning=NO_THINK, parallel_tool_calls=False)
    assert [json.loads(o.arguments)["city"] for o in r.output] == ["Paris"] and r.parallel_tool_calls is False
    assert r.status == "completed"


def test_max_output_tokens_makes_an_incomplete_response(scripted, client, engine):
    engine.push(Script("alpha beta gamma delta epsilon"))
    r = client.responses.create(model="m", input="hi", max_output_tokens=3, reasoning=NO_THINK)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3
    assert r.output_text == engine.tokenizer.decode(engine.tokenizer.encode("alpha beta gamma delta epsilon")[:3])
    engine.push(Script("Still thinking about it"))
    events = sse_events(scripted.url, {"model": "m", "input": "hi", "max_output_tokens": 2})
    name, last = events[-1]
    assert name == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [o["type"] for o in last["response"]["output"]] == ["reasoning"]
    assert last["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


def test_empty_reply_is_one_empty_message(client, engine):
    engine.push(Script("  "))
    r = client.responses.create(model="m", input="hi", reasoning=NO_THINK)
    assert [(o.type, o.content[0].text) for o in r.output] == [("message", "  ")]


@pytest.mark.parametrize("body,param,fragment", [
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type", "must be 'text', 'json_object'"),
    ({"input": "hi", "background": True, "store": False}, "background", "needs the response stored"),
    ({"input": "hi", "truncation": "auto"}, "truncation", "never drops input items"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0", "text only"),
    ({"input": [{"type": "bogus"}]}, "input.0.type", "'bogus' is not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "user, system, developer or assistant"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input.0", "call_id"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id", "call_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "item_reference"),
    ({"input": []}, "input", "at least one item"),
    ({"instructions": "only this"}, "input", "at least one item"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type", "function tools"),
    ({"input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0.name", "not under"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     "not among the tools"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "needs at least one tool"),
    ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice", "must be 'none', 'auto'"),
    ({"input": "hi", "previous_response_id": "resp_missing"}, "previous_response_id", "not in this server's"),
    ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": "hi", "reasoning": {"effort": 5}}, "reasoning.effort", "must be a string"),
    ({"input": "word " * 5000}, "input", "maximum context length is 4096 tokens"),
])
def test_invalid_requests_are_400_with_param(scripted, engine, body, param, fragment):
    before = len(engine.calls)
    r = post(scripted.url, {"model": "m", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and fragment in err["message"], err
    assert len(engine.calls) == before  # nothing reached the engine


def test_auth_and_engine_errors_in_openai_shape(scripted, client, engine):
    bad = openai.OpenAI(base_url=scripted.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.create(model="m", input="hi")
    engine.push(Script(raise_error=EngineOverloadedError(5, 5)))
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model="m", input="hi")
    assert e.value.status_code == 503


def test_error_mid_stream_is_an_error_event_then_response_failed(scripted, engine, monkeypatch):
    async def failing(prompt_token_ids, params, request_id):
        ids = engine.tokenizer.encode("Partial")
        yield RequestOutput(request_id=request_id, prompt_token_ids=list(prompt_token_ids), num_cached_tokens=0,
                            token_ids=ids, new_token_ids=ids, text="Partial", new_text="Partial", finished=False)
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "generate", failing)
    events = sse_events(scripted.url, {"model": "m", "input": "hi", "reasoning": NO_THINK})
    names = [name for name, _ in events]
    assert names[-2:] == ["error", "response.failed"] and "response.output_text.delta" in names
    error, failed = events[-2][1], events[-1][1]
    assert error["code"] == "server_error" and "device lost" in error["message"]
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["output"][0]["content"][0]["text"] == "Partial"


def test_stream_disconnect_aborts_the_request(scripted, engine):
    from test_server_lifecycle import _wait_for

    engine.push(Script("word " * 400, delay=0.02))
    body = {"model": "m", "input": "hi", "reasoning": NO_THINK, "stream": True}
    with httpx.stream("POST", scripted.url + "/v1/responses", json=body, headers=KEY) as r:
        rid = r.headers["request-id"]
        for chunk in r.iter_text():
            if "response.output_text.delta" in chunk:
                break
    assert _wait_for(lambda: rid in engine.aborted), "the engine request was not aborted"
    assert rid not in engine.finished


def test_previous_response_id_continues_a_stored_conversation(scripted, client, engine):
    engine.push(Script("Checking." + CALL))
    first = client.responses.create(model="m", input="Weather?", tools=TOOLS, instructions="Old rules.",
                                    reasoning=NO_THINK)
    assert client.responses.retrieve(first.id).output[1].call_id == "functions.get_weather:0"
    engine.push(Script("Sunny."))
    second = client.responses.create(model="m", previous_response_id=first.id, tools=TOOLS, reasoning=NO_THINK,
                                     instructions="New rules.", input=[
                                         {"type": "function_call_output", "call_id": "functions.get_weather:0",
                                          "output": "sunny"}])
    assert second.previous_response_id == first.id and second.output_text == "Sunny."
    # earlier instructions are not carried over; the earlier input and output are
    reference = [{"role": "system", "content": "New rules."}, {"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": "Checking.", "tool_calls": [
                     {"id": "functions.get_weather:0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
                  "content": "sunny"}]
    assert engine.calls[-1].prompt_ids == rendered_ids(engine.tokenizer, reference, CHAT_TOOLS, thinking=False)
    # a third turn continues the chain of two
    engine.push(Script("You are welcome."))
    client.responses.create(model="m", previous_response_id=second.id, input="Thanks!", reasoning=NO_THINK,
                            store=False)
    third_ref = reference[1:] + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks!"}]
    assert engine.calls[-1].prompt_ids == rendered_ids(engine.tokenizer, third_ref, thinking=False)
    # store=false responses cannot be retrieved; deleted ones neither
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    r = post(scripted.url, {"model": "m", "previous_response_id": second.id, "input": "again"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    assert first.id in r.json()["error"]["message"]  # names the missing link of the chain


def test_streamed_responses_are_stored_too(scripted, client, engine):
    engine.push(Script("Streamed."))
    events = sse_events(scripted.url, {"model": "m", "input": "hi", "reasoning": NO_THINK})
    final = events[-1][1]["response"]
    assert client.responses.retrieve(final["id"]).output_text == "Streamed."
    engine.push(Script("Not kept."))
    events = sse_events(scripted.url, {"model": "m", "input": "hi", "reasoning": NO_THINK, "store": False})
    assert events[-1][1]["response"]["store"] is False
    assert post(scripted.url, {"model": "m", "input": "x", "previous_response_id": events[-1][1]["response"]["id"]}
                ).status_code == 400


def test_store_bounds_evict_least_recently_used():
    def response(i):
        return {"id": f"resp_{i}", "output": [{"type": "message", "text": "x" * 10}]}

    store = ResponseStore(max_responses=3)
    store.put(response(0), [{"n": 0}], None)
    store.put(response(1), [{"n": 1}], "resp_0")
    store.put(response(2), [{"n": 2}], None)
    assert store.conversation("resp_1") == [{"n": 0}, {"n": 1}]  # marks resp_0 and resp_1 as recently used
    store.put(response(3), [{"n": 3}], None)
    assert store.get("resp_2") is None and len(store) == 3  # the least recently used went
    store.put(response(4), [], None)
    store.put(response(5), [], None)
    assert store.get("resp_1") is None
    with pytest.raises(Exception, match="not in this server's response store"):
        store.conversation("resp_1")
    sized = ResponseStore(max_bytes=300)
    for i in range(10):
        sized.put(response(i), [{"n": i}], None)
    total = sum(len(json.dumps(response(i))) + len(json.dumps([{"n": i}])) for i in range(10))
    assert 0 < len(sized) < 10 and total > 300 and sized.get("resp_9") is not None


def test_metrics_count_responses_requests(scripted, client, engine):
    def finished():
        text = httpx.get(scripted.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('moonlet_requests_total{api="openai"'))

    before = finished()
    engine.push(Script("ok"))
    client.responses.create(model="m", input="hi", reasoning=NO_THINK)
    assert finished() == before + 1


FUZZ_BODY = {
    "model": "m", "instructions": "sys", "max_output_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stream": False,
    "reasoning": {"effort": "low", "summary": "auto"}, "metadata": {"a": "b"}, "user": "u", "store": False,
    "text": {"format": {"type": "text"}}, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True,
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
              {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}]},
              {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
              {"type": "function_call_output", "call_id": "call_1", "output": "r"},
              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
              {"role": "user", "content": "more"}],
}


def test_input_items_lists_a_responses_own_input(scripted, client, engine):
    engine.push(Script("Calling." + CALL), Script("It is sunny."))
    first = client.responses.create(model="m", input="Weather in Paris?", tools=TOOLS, reasoning=NO_THINK)
    inputs = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]},
              {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sunny"},
              {"type": "message", "role": "user", "content": "And tomorrow?"}]
    second = client.responses.create(model="m", previous_response_id=first.id, input=inputs, tools=TOOLS,
                                     reasoning=NO_THINK)
    listed = client.responses.input_items.list(second.id, order="asc")
    data = [item.model_dump(exclude_none=True) for item in listed.data]
    assert [d["type"] for d in data] == ["message", "function_call_output", "message"]  # not the first response's
    assert [c["text"] for c in data[0]["content"]] == ["Thanks."] and data[1]["output"] == "sunny"
    assert data[2]["content"] == [{"type": "input_text", "text": "And tomorrow?"}] and data[2]["role"] == "user"
    assert len({d["id"] for d in data}) == 3
    # newest first by default; pages by id, stable across calls
    desc = client.responses.input_items.list(second.id, limit=2)
    assert [i.id for i in desc.data] == [data[2]["id"], data[1]["id"]] and desc.has_more
    rest = client.responses.input_items.list(second.id, limit=2, after=desc.data[-1].id)
    assert [i.id for i in rest.data] == [data[0]["id"]] and not rest.has_more
    assert [i.id for i in client.responses.input_items.list(second.id)] == [d["id"] for d in reversed(data)]
    one = client.responses.input_items.list(first.id)
    assert [i.model_dump(exclude_none=True)["content"] for i in one.data] == \
        [[{"type": "input_text", "text": "Weather in Paris?"}]]
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_missing")
    r = httpx.get(scripted.url + f"/v1/responses/{second.id}/input_items?after=nope", headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


# ---- background responses -----------------------------------------------------------------------
def _wait_status(client, rid, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(rid)
        if r.status in statuses:
            return r
        assert time.monotonic() < deadline, r.status
        time.sleep(0.02)


def test_background_response_is_polled_to_the_same_output(scripted, client, engine):
    text = "Let me see.</think>Checking the map." + CALL
    engine.push(Script(text, delay=0.01))
    started = client.responses.create(model="m", input="Weather in Paris?", tools=TOOLS, background=True)
    assert started.background is True and started.status in ("queued", "in_progress") and started.output == []
    done = _wait_status(client, started.id, {"completed"})
    assert done.background is True and done.usage.output_tokens > 0
    engine.push(Script(text))
    plain = client.responses.create(model="m", input="Weather in Paris?", tools=TOOLS)
    strip = lambda r: [dict(o.model_dump(exclude_none=True), id=None) for o in r.output]  # noqa: E731
    assert strip(done) == strip(plain)
    # it continues a conversation like any stored response
    engine.push(Script("Sunny."))
    nxt = client.responses.create(model="m", previous_response_id=started.id, reasoning=NO_THINK, input=[
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sunny"}])
    assert nxt.output_text == "Sunny."


def test_background_stream_resumes_from_any_sequence_number(scripted, client, engine):
    text = "Let me see.</think>Checking the map." + CALL
    engine.push(Script(text, delay=0.005))
    with httpx.stream("POST", scripted.url + "/v1/responses", headers=KEY, timeout=30, json={
            "model": "m", "input": "Weather?", "tools": TOOLS, "background": True, "stream": True}) as r:
        assert r.status_code == 200
        first = []
        for line in r.iter_lines():  # read a few events, then drop the connection
            if line.startswith("data: "):
                first.append(json.loads(line[6:]))
                if len(first) == 4:
                    break
    rid = first[0]["response"]["id"]
    assert first[0]["type"] == "response.created" and first[0]["response"]["status"] == "queued"
    _wait_status(client, rid, {"completed"})  # generation went on without a client
    full = list(client.responses.retrieve(rid, stream=True))
    assert [e.sequence_number for e in full] == list(range(len(full)))
    assert [e.model_dump(mode="json", exclude_none=True)["type"] for e in full[:4]] == [e["type"] for e in first]
    assert full[0].response.id == rid and full[0].response.status == "queued"
    assert full[-1].type == "response.completed"
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=3))
    assert [e.sequence_number for e in rest] == list(range(4, len(full)))
    deltas = "".join(e.delta for e in full if e.type == "response.output_text.delta")
    assert deltas == "Checking the map."
    assert full[-1].response.output_text == client.responses.retrieve(rid).output_text


def test_background_response_can_be_cancelled(scripted, client, engine):
    engine.push(Script("word " * 400, delay=0.01))
    started = client.responses.create(model="m", input="Talk.", background=True, max_output_tokens=1000,
                                      reasoning=NO_THINK)
    _wait_status(client, started.id, {"in_progress"})
    time.sleep(0.3)  # some words generated (the script takes 4 s for all of them)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.id == started.id
    assert engine.calls[-1].request_id in engine.aborted  # the engine request was aborted
    again = client.responses.retrieve(started.id)
    assert again.status == "cancelled" and client.responses.cancel(started.id).status == "cancelled"
    assert 0 < len(again.output_text) < len("word " * 400)
    # a finished background response is returned as it is; a foreground one cannot be cancelled
    engine.push(Script("Done."))
    done = client.responses.create(model="m", input="x", background=True)
    _wait_status(client, done.id, {"completed"})
    assert client.responses.cancel(done.id).status == "completed"
    engine.push(Script("Hi."))
    fg = client.responses.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(fg.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_missing")


def test_background_engine_failure_makes_a_failed_response(scripted, client, engine):
    engine.push(Script("x", raise_error=EngineOverloadedError(5, 5)))
    started = client.responses.create(model="m", input="x", background=True)
    failed = _wait_status(client, started.id, {"failed"})
    assert failed.error is not None and failed.error.code == "rate_limit_exceeded"


def test_no_mutation_causes_a_server_error(scripted, engine):
    engine.default = Script("fine")
    seen = 0
    with httpx.Client(base_url=scripted.url, headers=KEY, timeout=30) as http:
        assert http.post("/v1/responses", json=FUZZ_BODY).status_code == 200
        for path in paths(FUZZ_BODY):
            for value in ODD_VALUES:
                r = http.post("/v1/responses", content=json.dumps(mutated(copy.deepcopy(FUZZ_BODY), path, value)),
                              headers={"content-type": "application/json"})
                seen += 1
                assert r.status_code in (200, 400), (path, value, r.status_code, r.text)
                if r.status_code == 400:
                    err = r.json()["error"]
                    assert err["type"] == "invalid_request_error" and err["message"]
    assert seen >= len(ODD_VALUES) * 30


# ---- real engines -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_random(tokenizer_dir):
    from moonlet.testing import random_model, tiny_k2_config
    from moonlet.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size, max_position_embeddings=384), seed=11)
    llm = AsyncLLM(model=model, tokenizer=tok, num_blocks=64, block_size=16, start=False)
    with LiveServer(create_app(llm, served_model_name="tiny", shutdown_engine_on_exit=True)) as server:
        yield server, llm, tok


def test_greedy_output_matches_the_model(tiny_random):
    server, llm, tok = tiny_random
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    kwargs = dict(model="tiny", input="Tell me about foxes.", max_output_tokens=8, temperature=0, reasoning=NO_THINK)
    r = client.responses.create(**kwargs)
    prompt = rendered_ids(tok, [{"role": "user", "content": "Tell me about foxes."}], thinking=False)
    stop = set(tok.stop_token_ids) | set(llm.engine.model.config.eos_token_ids)
    expected = [t for t in generate_ids(llm.engine.model, prompt, 8, stop) if t not in stop]
    reference = parse_output(tok.decode(expected))
    assert r.usage.input_tokens == len(prompt)
    assert r.output_text == reference.content and not reference.tool_calls
    with client.responses.stream(**kwargs) as stream:
        last = list(stream)[-1]  # response.completed, or response.incomplete when max_output_tokens cut it
    assert last.type == f"response.{r.status}" and last.response.output_text == r.output_text


def _bundled_model():
    try:
        from moonlet.assets import default_model_path
        return default_model_path()
    except (ImportError, FileNotFoundError):
        return None


@pytest.mark.skipif(_bundled_model() is None, reason="the bundled moonlet-tiny checkpoint is not in this checkout")
def test_bundled_model_calls_its_tool_and_uses_the_result():
    """moonlet-tiny was trained to call `calculator`: the first response is that call, the second (fed the
    result through previous_response_id + function_call_output) states it. Both equal the model's own
    greedy loop over the same conversation in chat form."""
    from moonlet.agent.profiles import model_profile

    profile = model_profile(None)
    tools = [{"type": "function", "name": n, "description": profile["overrides"][n]["description"],
              "parameters": profile["overrides"][n]["input_schema"]} for n in profile["tools"]]
    llm = AsyncLLM(_bundled_model(), start=False, num_blocks=64, block_size=16)
    model, tok = llm.engine.model, llm.tokenizer
    stop = set(tok.stop_token_ids) | set(model.config.eos_token_ids)
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]

    def reference(messages):
        ids = [t for t in generate_ids(model, rendered_ids(tok, messages, chat_tools), 64, stop) if t not in stop]
        return parse_output(tok.decode(ids))

    with LiveServer(create_app(llm, served_model_name="moonlet-tiny", shutdown_engine_on_exit=True)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        common = dict(model="moonlet-tiny", tools=tools, instructions=profile["system_prompt"], temperature=0,
                      max_output_tokens=64)
        first = client.responses.create(input="What is 1234 * 5678?", **common)
        calls = [o for o in first.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "calculator"
        assert json.loads(calls[0].arguments) == {"expression": "1234 * 5678"}
        messages = [{"role": "system", "content": profile["system_prompt"]},
                    {"role": "user", "content": "What is 1234 * 5678?"}]
        ref = reference(messages)
        assert [(c.name, c.arguments) for c in ref.tool_calls] == [("calculator", calls[0].arguments)]

        second = client.responses.create(previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": str(1234 * 5678)}], **common)
        assert second.status == "completed" and str(1234 * 5678) in second.output_text
        messages += [{"role": "assistant", "content": first.output_text, "tool_calls": [
            {"id": calls[0].call_id, "type": "function",
             "function": {"name": "calculator", "arguments": calls[0].arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].call_id, "name": "calculator", "content": str(1234 * 5678)}]
        assert second.output_text == reference(messages).content
        assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's prefix was cached
