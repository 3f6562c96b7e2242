"""Malformed requests never produce a 500: every field of valid Anthropic and OpenAI requests is
replaced by values of the wrong type/shape; each answer is a success or a 4xx in that API's shape."""

import copy
import json

import httpx
import pytest
from server_support import Script

ODD_VALUES = [None, 0, -1, 1e300, "x", "", True, [], [1], {}, {"type": 1}, [{"type": "text"}], [{"text": 5}],
              [{"type": "tool_result"}], [{"type": "tool_use", "id": 1}], [None]]

ANTHROPIC = {
    "model": "m", "max_tokens": 1100, "stream": False, "system": [{"type": "text", "text": "sys"}],
    "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object", "properties": {}}}],
    "tool_choice": {"type": "auto"},
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "ok"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "r"}]}]}],
}
OPENAI = {
    "model": "m", "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stop": ["END"], "seed": 1, "n": 1,
    "thinking_token_budget": 4,
    "tools": [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "stream_options": {"include_usage": True}, "chat_template_kwargs": {"thinking": False},
    "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "r"}],
}

COMPLETIONS = {"model": "m", "prompt": "hi", "max_tokens": 4, "echo": True, "logprobs": 2, "stop": ["x"],
               "stream": False, "temperature": 0}


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def mutated(body, path, value):
    out = copy.deepcopy(body)
    if not path:
        return value
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


@pytest.mark.parametrize("route,body,api", [("/v1/messages", ANTHROPIC, "anthropic"),
                                            ("/v1/messages/count_tokens", ANTHROPIC, "anthropic"),
                                            ("/v1/chat/completions", OPENAI, "openai"),
                                            ("/v1/completions", COMPLETIONS, "openai")])
def test_no_mutation_causes_a_server_error(scripted, engine, route, body, api):
    engine.default = Script("fine")
    headers = {"x-api-key": "test-key", "content-type": "application/json"}
    seen = 0
    with httpx.Client(base_url=scripted.url, headers=headers, timeout=30) as client:
        assert client.post(route, json=body).status_code == 200
        for path in paths(body):
            for value in ODD_VALUES:
                r = client.post(route, content=json.dumps(mutated(body, path, value)))
                seen += 1
                assert r.status_code in (200, 400), (path, value, r.status_code, r.text)
                if r.status_code == 400:
                    err = r.json()
                    if api == "anthropic":
                        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
                    else:
                        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert seen >= len(ODD_VALUES) * 10
