"""The OpenAI Files and Batch APIs (/v1/files, /v1/batches) through the official openai SDK: an
uploaded request file runs as a batch whose output lines equal the same requests sent directly,
failures go to the error file, a bad input file makes a `failed` batch naming its lines, cancel and
listing follow the batch's state, files list and delete, and a batch survives a server restart
without repeating finished requests. The Anthropic batches (test_server_batches.py) share the runner."""

import io
import json
import time

import openai
import pytest
from server_support import LiveServer, Script, ScriptedEngine

from moonlet.server import create_app


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)


def _server(tokenizer, tmp_path=None, **kw):
    engine = ScriptedEngine(tokenizer)
    app = create_app(engine, api_key="k", batch_dir=str(tmp_path) if tmp_path else None, **kw)
    app.state.batches.retry_delay = 0.02
    return engine, app


def _line(cid, text="hi", url="/v1/chat/completions", **body):
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": "m", "max_tokens": 32, "messages": [{"role": "user", "content": text}], **body}}


def _upload(client, lines, name="in.jsonl"):
    data = "".join(json.dumps(x) + "\n" if isinstance(x, dict) else x + "\n" for x in lines).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def _wait(client, batch_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def _jsonl(client, file_id):
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_output_equals_direct_requests_and_failures_go_to_the_error_file(tokenizer):
    engine, app = _server(tokenizer)
    engine.default = Script("Paris is the capital.")
    with LiveServer(app) as server:
        client = _client(server)
        lines = [_line("q-1", "capital of France?"), _line("q-2", "capital of Spain?", stop=["zzz"]),
                 _line("too-long", "word " * 5000)]
        upload = _upload(client, lines)
        assert upload.id.startswith("file-") and upload.purpose == "batch" and upload.status == "processed"
        assert upload.bytes == len(client.files.content(upload.id).content) and upload.filename == "in.jsonl"
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"job": "nightly"})
        assert batch.id.startswith("batch_") and batch.status in ("validating", "in_progress")
        assert batch.request_counts.total == 3 and batch.metadata == {"job": "nightly"}
        done = _wait(client, batch.id)
        assert done.status == "completed" and done.completed_at and done.finalizing_at and done.in_progress_at
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        output, errors = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
        assert [x["custom_id"] for x in output] == ["q-1", "q-2"] and [x["custom_id"] for x in errors] == ["too-long"]
        direct = [client.chat.completions.create(**x["body"]) for x in lines[:2]]
        for got, want in zip(output, direct):
            assert got["id"].startswith("batch_req_") and got["error"] is None
            response = got["response"]
            assert response["status_code"] == 200 and response["request_id"].startswith("req_")
            choice = response["body"]["choices"][0]
            assert choice["message"]["content"] == want.choices[0].message.content
            assert choice["finish_reason"] == want.choices[0].finish_reason
            assert response["body"]["usage"]["prompt_tokens"] == want.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as direct_error:
            client.chat.completions.create(**lines[2]["body"])
        assert errors[0]["response"]["status_code"] == 400
        assert errors[0]["response"]["body"]["error"] == direct_error.value.body  # the same error, same shape
        # the batch's requests reached the engine as the direct ones did (the over-long one was refused first)
        assert sorted(c.prompt_ids for c in engine.calls[:2]) == sorted(c.prompt_ids for c in engine.calls[2:])

        outputs = client.files.list(purpose="batch_output").data
        assert {f.id for f in outputs} == {done.output_file_id, done.error_file_id}
        assert all(f.filename.startswith(batch.id) for f in outputs)
        assert [f.id for f in client.files.list().data][-1] == upload.id  # newest first
        deleted = client.files.delete(upload.id)
        assert deleted.deleted and deleted.id == upload.id
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(upload.id)
        assert client.batches.retrieve(batch.id).input_file_id == upload.id


def test_a_bad_input_file_fails_the_batch_and_creation_is_checked(tokenizer):
    engine, app = _server(tokenizer)
    with LiveServer(app) as server:
        client = _client(server)
        upload = _upload(client, [_line("a"), "{not json", _line("b", url="/v1/completions"), _line("a"),
                                  {"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}])
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
        assert [e.line for e in batch.errors.data] == [2, 3, 4, 5]
        assert "not valid JSON" in batch.errors.data[0].message and "endpoint" in batch.errors.data[1].message
        assert "used twice" in batch.errors.data[2].message and "only POST" in batch.errors.data[3].message
        assert client.batches.retrieve(batch.id).status == "failed" and not engine.calls

        good = _upload(client, [_line("a")])
        cases = [(dict(endpoint="/v1/embeddings"), "endpoint"), (dict(completion_window="1h"), "24h"),
                 (dict(metadata={f"k{i}": "v" for i in range(17)}), "at most 16")]
        for change, message in cases:
            args = dict(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h") | change
            with pytest.raises(openai.BadRequestError, match=message) as e:
                client.batches.create(**args)
            assert e.value.body["type"] == "invalid_request_error"  # OpenAI's error shape
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                  completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch_output")


def test_list_cancel_and_body_limit(tokenizer):
    engine, app = _server(tokenizer, batch_concurrency=1, max_body_bytes=4096)
    engine.default = Script("slow " * 20, delay=0.02)
    with LiveServer(app) as server:
        client = _client(server)
        upload = _upload(client, [_line(f"r{j}") for j in range(3)])
        ids = [client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(3)]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK pages on with `after`
        for batch_id in ids:
            cancelling = client.batches.cancel(batch_id)
            assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        for batch_id in ids:
            ended = _wait(client, batch_id)
            assert ended.status == "cancelled" and ended.cancelled_at
            ran = ended.request_counts.completed
            assert ended.request_counts.failed == 0
            cancelled = _jsonl(client, ended.error_file_id)
            assert len(cancelled) == 3 - ran and all(x["error"]["code"] == "batch_cancelled" and
                                                     x["response"] is None for x in cancelled)
        with pytest.raises(openai.BadRequestError, match="cancelled"):
            client.batches.cancel(ids[0])
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 8192)), purpose="batch")
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_a_batch_and_its_files_survive_a_restart(tokenizer, tmp_path):
    engine, app = _server(tokenizer, tmp_path, batch_concurrency=1)
    engine.default = Script("one two three four five six", delay=0.05)
    with LiveServer(app) as server:
        client = _client(server)
        upload = _upload(client, [_line(f"r{j}", f"question {j}") for j in range(5)])
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 30
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with open(tmp_path / batch.id / "results.jsonl") as fh:  # what the stopped server had recorded
        done_before = {json.loads(line)["custom_id"] for line in fh}
    engine2, app2 = _server(tokenizer, tmp_path, batch_concurrency=2)
    with LiveServer(app2) as server:
        client = _client(server)
        assert client.files.retrieve(upload.id).bytes == upload.bytes
        ended = _wait(client, batch.id)
        assert ended.status == "completed" and ended.request_counts.completed == 5
        assert [x["custom_id"] for x in _jsonl(client, ended.output_file_id)] == [f"r{j}" for j in range(5)]
    rerun = [c.prompt_text for c in engine2.calls]
    assert len(rerun) == 5 - len(done_before)  # recorded requests are not run again, the others are
    for cid in done_before:
        assert not any(f"question {cid[1:]}<" in text for text in rerun)


def test_responses_and_completions_endpoints(tokenizer):
    """The other two endpoints: answers equal direct requests, and a failure's body has OpenAI's error
    shape (the in-process client also sends anthropic-version, which must not make it Anthropic's)."""
    engine, app = _server(tokenizer)
    engine.default = Script("Four.")
    with LiveServer(app) as server:
        client = _client(server)
        for endpoint, body, too_long in [
            ("/v1/responses", {"model": "m", "input": "2+2?", "max_output_tokens": 16},
             {"model": "m", "input": "word " * 5000}),
            ("/v1/completions", {"model": "m", "prompt": "2+2=", "max_tokens": 16},
             {"model": "m", "prompt": "word " * 5000, "max_tokens": 4}),
        ]:
            lines = [{"custom_id": "ok", "method": "POST", "url": endpoint, "body": body},
                     {"custom_id": "long", "method": "POST", "url": endpoint, "body": too_long}]
            batch = client.batches.create(input_file_id=_upload(client, lines).id, endpoint=endpoint,
                                          completion_window="24h")
            done = _wait(client, batch.id)
            assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 1, 1)
            got = _jsonl(client, done.output_file_id)[0]["response"]["body"]
            error = _jsonl(client, done.error_file_id)[0]["response"]
            if endpoint == "/v1/responses":
                want = client.responses.create(**body).model_dump()
                strip = [{k: v for k, v in item.items() if k != "id"} for item in want["output"]]
                assert [{k: v for k, v in item.items() if k != "id"} for item in got["output"]] == strip
                assert got["usage"]["input_tokens"] == want["usage"]["input_tokens"]
            else:
                want = client.completions.create(**body)
                assert got["choices"][0]["text"] == want.choices[0].text
            assert error["status_code"] == 400 and set(error["body"]) == {"error"}
            assert error["body"]["error"]["type"] == "invalid_request_error"


def test_file_expiry_policies(tokenizer, tmp_path):
    """Uploads take OpenAI's expires_after (batch inputs default to 30 days, others never expire), a
    batch's output_expires_after applies to its output and error files, an expired file is gone for
    every route and its bytes are deleted by the sweep; bad policies are 400s naming the field."""
    engine, app = _server(tokenizer, tmp_path)
    engine.default = Script("ok")
    with LiveServer(app) as server:
        client = _client(server)
        before = int(time.time())
        default = _upload(client, [_line("a")])
        assert before + 30 * 86400 <= default.expires_at <= int(time.time()) + 30 * 86400
        other = client.files.create(file=("notes.txt", io.BytesIO(b"keep me")), purpose="user_data")
        assert other.expires_at is None
        short = client.files.create(file=("in.jsonl", io.BytesIO((json.dumps(_line("b")) + "\n").encode())),
                                    purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600})
        assert before + 3600 <= short.expires_at <= int(time.time()) + 3600
        for bad, match in (({"anchor": "created_at", "seconds": 60}, "between 3600"),
                           ({"anchor": "last_active_at", "seconds": 3600}, "anchor")):
            with pytest.raises(openai.BadRequestError, match=match):
                client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch", expires_after=bad)
        with pytest.raises(openai.BadRequestError, match="output_expires_after.seconds"):
            client.batches.create(input_file_id=default.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 31 * 86400})
        batch = client.batches.create(input_file_id=default.id, endpoint="/v1/chat/completions",
                                      completion_window="24h",
                                      output_expires_after={"anchor": "created_at", "seconds": 7200})
        ended = _wait(client, batch.id)
        out = client.files.retrieve(ended.output_file_id)
        assert out.expires_at is not None and before + 7200 <= out.expires_at <= int(time.time()) + 7200

        store = app.state.files
        gone = store.sweep(now=time.time() + 3 * 3600)  # the short upload and the output file
        assert set(gone) == {short.id, ended.output_file_id}
        assert not (tmp_path / "files" / short.id).exists()
        for fid in gone:
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(fid)
            with pytest.raises(openai.NotFoundError):
                client.files.content(fid)
        listed = {f.id for f in client.files.list()}
        assert default.id in listed and other.id in listed and not listed & set(gone)
        # expiry is checked on access too, before any sweep
        store.meta[other.id]["expires_at"] = int(time.time()) - 1
        with pytest.raises(openai.NotFoundError, match="expired"):
            client.files.retrieve(other.id)
        assert not (tmp_path / "files" / other.id).exists()
