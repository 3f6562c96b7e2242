"""/tokenize and /detokenize: text prompts against the tokenizer itself, chat messages against the
prompt /v1/chat/completions actually sends to the engine, the round trip, and errors."""

import httpx
import openai


def _post(scripted, path, body):
    return httpx.post(f"{scripted.url}{path}", json=body, headers={"authorization": "Bearer test-key"}, timeout=30)


def test_tokenize_text_and_chat_messages(scripted, engine, tokenizer):
    r = _post(scripted, "/tokenize", {"prompt": "Hello<|im_end|> world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello<|im_end|> world", allow_special=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 4096
    assert "".join(body["token_strs"]) == "Hello<|im_end|> world"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    r = _post(scripted, "/tokenize", {"messages": messages, "tools": tools})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=scripted.url + "/v1", api_key="test-key", max_retries=0)
    done = client.chat.completions.create(model="m", messages=messages, tools=tools, max_tokens=4)
    assert r.json()["tokens"] == engine.calls[-1].prompt_ids  # what the chat route ran
    assert r.json()["count"] == done.usage.prompt_tokens
    no_gen = _post(scripted, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert no_gen == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)


def test_detokenize_and_errors(scripted, tokenizer):
    ids = tokenizer.encode("round trip", allow_special=True)
    assert _post(scripted, "/detokenize", {"tokens": ids}).json() == {"prompt": "round trip"}
    bad = _post(scripted, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    both = _post(scripted, "/tokenize", {"prompt": "x", "messages": []})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    assert httpx.post(f"{scripted.url}/tokenize", json={"prompt": "x"}).status_code == 401  # the key is needed
