"""`moonlet batch`: a JSONL file of OpenAI and Anthropic batch lines run offline on a tiny random
checkpoint. Each answer must equal what a live server on the same checkpoint returns for the same
request (greedy decoding); errors become answer lines; a rerun after an interrupted run skips what
the output already has; bad input lines are refused before anything runs."""

import json

import anthropic
import openai
import pytest
from server_support import LiveServer

from moonlet.cli import main
from moonlet.commands.batch import parse_requests
from moonlet.engine import AsyncLLM
from moonlet.server import create_app
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.weights import save_model

ENGINE = ["--num-blocks", "96", "--block-size", "16", "--dtype", "float32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    tiny_tokenizer_dir(directory, chat_template="kimi-k2.6")
    save_model(random_model(tiny_k2_config(vocab_size=768, max_position_embeddings=512), seed=5), directory)
    return directory


def _lines():
    chat = {"model": "m", "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": "hello"}]}
    comp = {"model": "m", "max_tokens": 8, "temperature": 0, "prompt": "The capital of"}
    msgs = {"model": "m", "max_tokens": 10, "temperature": 0.0, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "hi there"}]}
    too_long = dict(chat, messages=[{"role": "user", "content": "word " * 2000}])
    return [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "comp-1", "method": "POST", "url": "/v1/completions", "body": comp},
        {"custom_id": "msg-1", "params": msgs},
        {"custom_id": "long", "method": "POST", "url": "/v1/chat/completions", "body": too_long},
    ]


def test_answers_equal_a_live_servers(checkpoint, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(line) for line in _lines()) + "\n")
    code = main(["batch", "-i", str(inp), "-o", str(out), "--model", str(checkpoint), "-q", *ENGINE])
    assert code == 3  # one request failed (its error is an answer line)
    answers = {row["custom_id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(answers) == {"chat-1", "comp-1", "msg-1", "long"}

    llm = AsyncLLM(str(checkpoint), num_blocks=96, block_size=16, dtype="float32", start=False)
    with LiveServer(create_app(llm, shutdown_engine_on_exit=True)) as server:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        an = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
        lines = _lines()
        chat = oa.chat.completions.create(**lines[0]["body"])
        comp = oa.completions.create(**lines[1]["body"])
        params = dict(lines[2]["params"])
        temperature = params.pop("temperature")  # this SDK has no temperature argument any more
        msg = an.messages.create(extra_body={"temperature": temperature}, **params)
    got = answers["chat-1"]["response"]
    assert got["status_code"] == 200 and answers["chat-1"]["error"] is None
    message = got["body"]["choices"][0]["message"]
    assert message["content"] == chat.choices[0].message.content and message.get("tool_calls") is None
    usage = got["body"]["usage"]  # (cached_tokens differ: the batch's requests share a cached system prompt)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (chat.usage.prompt_tokens,
                                                                    chat.usage.completion_tokens)
    assert answers["comp-1"]["response"]["body"]["choices"][0]["text"] == comp.choices[0].text
    result = answers["msg-1"]["result"]
    assert result["type"] == "succeeded" and result["message"]["content"] == [b.model_dump(exclude_none=True) for b in msg.content]
    long = answers["long"]["response"]
    assert long["status_code"] == 400 and "context" in json.dumps(long["body"]).lower()


def test_a_rerun_skips_answered_requests(checkpoint, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = _lines()[:3]
    inp.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    # an earlier run answered chat-1, then died while writing another line
    out.write_text(json.dumps({"custom_id": "chat-1", "response": {"status_code": 200, "body": {}}}) + "\n"
                   + '{"custom_id": "comp-1", "resp')
    assert main(["batch", "-i", str(inp), "-o", str(out), "--model", str(checkpoint), "-q", *ENGINE]) == 0
    rows = out.read_text().splitlines()
    ids = [json.loads(r)["custom_id"] for r in rows[:1] + rows[2:]]
    assert sorted(ids) == ["chat-1", "comp-1", "msg-1"]  # chat-1 not run again; the cut line is ignored
    assert main(["batch", "-i", str(inp), "-o", str(out), "--model", str(checkpoint), "-q", *ENGINE]) == 0
    assert len(out.read_text().splitlines()) == len(rows)  # nothing left to run


@pytest.mark.parametrize("line, message", [
    ("not json", "in.jsonl:2: not valid JSON"),
    ('{"custom_id": "a", "params": {}}', "custom_id 'a' is used twice"),
    ('{"custom_id": "b", "method": "GET", "url": "/v1/models", "body": {}}', "only POST"),
    ('{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}', "/v1/embeddings"),
    ('{"custom_id": "d", "params": {"stream": true}}', "stream"),
    ('{"custom_id": "e"}', "expected an OpenAI batch line"),
])
def test_bad_lines_are_refused_before_running(line, message):
    with pytest.raises(ValueError, match=message):
        parse_requests(['{"custom_id": "a", "params": {"max_tokens": 1}}', line], "in.jsonl")
