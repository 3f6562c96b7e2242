"""The Message Batches API (/v1/messages/batches) through the official anthropic SDK: results equal
the same requests sent directly to /v1/messages, errors come back as errored results, creation
is validated, listing pages newest first, cancel and delete follow the batch's state, busy answers
are retried, and a batch survives a server restart without repeating finished requests."""

import json
import time

import anthropic
import httpx
import pytest
from server_support import LiveServer, Script, ScriptedEngine

from moonlet.server import create_app
from moonlet.server.batches import MAX_REQUESTS


def _client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)


def _server(tokenizer, tmp_path=None, **kw):
    engine = ScriptedEngine(tokenizer)
    app = create_app(engine, api_key="k", batch_dir=str(tmp_path) if tmp_path else None, **kw)
    app.state.batches.retry_delay = 0.02
    return engine, app


def _wait(client, batch_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def _req(cid, text="hi", **params):
    return {"custom_id": cid, "params": {"model": "m", "max_tokens": 32,
                                         "messages": [{"role": "user", "content": text}], **params}}


def test_results_equal_direct_requests_and_errors_are_results(tokenizer, tmp_path):
    engine, app = _server(tokenizer, tmp_path)
    with LiveServer(app) as server:
        client = _client(server)
        engine.default = Script("Paris is the capital.")
        requests = [_req("q-1", "capital of France?"), _req("q_2", "capital of Spain?", stop_sequences=["zzz"]),
                    _req("too-long", "word " * 5000)]
        batch = client.messages.batches.create(requests=requests)
        assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
        assert batch.request_counts.processing + batch.request_counts.succeeded + \
            batch.request_counts.errored == 3 and batch.results_url is None
        ended = _wait(client, batch.id)
        assert ended.request_counts.succeeded == 2 and ended.request_counts.errored == 1
        assert ended.results_url.endswith(f"/v1/messages/batches/{batch.id}/results") and ended.ended_at is not None
        results = list(client.messages.batches.results(batch.id))
        assert [r.custom_id for r in results] == ["q-1", "q_2", "too-long"]
        direct = [client.messages.create(**r["params"]) for r in requests[:2]]
        for got, want in zip(results[:2], direct):
            assert got.result.type == "succeeded"
            assert [b.model_dump() for b in got.result.message.content] == [b.model_dump() for b in want.content]
            assert got.result.message.stop_reason == want.stop_reason
            assert got.result.message.usage.input_tokens == want.usage.input_tokens
        err = results[2].result
        assert err.type == "errored" and err.error.error.type == "invalid_request_error"
        assert "prompt" in err.error.error.message
        # the batch's requests reached the engine as the direct ones did (the batch ran in any order)
        # (the over-long one was refused before reaching it, as a direct request is)
        assert len(engine.calls) == 4
        assert sorted(c.prompt_ids for c in engine.calls[:2]) == sorted(c.prompt_ids for c in engine.calls[2:])


def test_creation_is_validated(tokenizer):
    _, app = _server(tokenizer)
    with LiveServer(app) as server:
        client = _client(server)
        cases = [
            ([_req("a"), _req("a")], "used twice"),
            ([_req("bad id!")], "custom_id"),
            ([_req("s", stream=True)], "cannot stream"),
            ([{"custom_id": "x", "params": {"model": "m", "messages": []}}], "max_tokens"),
            ([], f"1 to {MAX_REQUESTS}"),
        ]
        for requests, message in cases:
            with pytest.raises(anthropic.BadRequestError, match=message):
                client.messages.batches.create(requests=requests)
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve("msgbatch_nope")


def test_list_cancel_delete(tokenizer):
    engine, app = _server(tokenizer, batch_concurrency=1)
    engine.default = Script("slow " * 20, delay=0.02)
    with LiveServer(app) as server:
        client = _client(server)
        ids = [client.messages.batches.create(requests=[_req(f"r{j}") for j in range(3)]).id for _ in range(3)]
        page = client.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        assert [b.id for b in client.messages.batches.list(limit=2)] == ids[::-1]  # the SDK pages on
        with pytest.raises(anthropic.BadRequestError, match="only an ended batch can be deleted"):
            client.messages.batches.delete(ids[0])
        early = httpx.get(f"{server.url}/v1/messages/batches/{ids[2]}/results", headers={"x-api-key": "k"})
        assert early.status_code == 400 and "available once it has ended" in early.json()["error"]["message"]
        for batch_id in ids:
            canceled = client.messages.batches.cancel(batch_id)
            assert canceled.processing_status in ("canceling", "ended") and canceled.cancel_initiated_at
        for batch_id in ids:
            ended = _wait(client, batch_id)
            counts = ended.request_counts
            assert counts.canceled + counts.succeeded == 3 and counts.processing == 0
        assert sum(_wait(client, i).request_counts.canceled for i in ids) >= 6  # one request at a time
        kinds = [r.result.type for r in client.messages.batches.results(ids[1])]
        assert set(kinds) <= {"succeeded", "canceled"} and len(kinds) == 3
        deleted = client.messages.batches.delete(ids[1])
        assert deleted.id == ids[1] and deleted.type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(ids[1])


def test_busy_answers_are_retried(tokenizer):
    """With one generation allowed at a time and two batch requests running, the second gets 429s
    from the server itself until the first is done; it must end up succeeded, not errored."""
    engine, app = _server(tokenizer, max_concurrent_requests=1, batch_concurrency=2)
    engine.default = Script("a few words here", delay=0.02)
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req(f"r{j}") for j in range(4)])
        ended = _wait(client, batch.id)
        assert ended.request_counts.succeeded == 4


def test_a_batch_survives_a_restart(tokenizer, tmp_path):
    engine, app = _server(tokenizer, tmp_path, batch_concurrency=1)
    engine.default = Script("one two three four five six", delay=0.05)
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req(f"r{j}", f"question {j}") for j in range(6)])
        deadline = time.monotonic() + 30
        while client.messages.batches.retrieve(batch.id).request_counts.succeeded < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with open(tmp_path / batch.id / "results.jsonl") as fh:  # what the stopped server had recorded
        done_before = {json.loads(line)["custom_id"] for line in fh}
    assert len(done_before) >= 2
    engine2, app2 = _server(tokenizer, tmp_path, batch_concurrency=2)
    with LiveServer(app2) as server:
        client = _client(server)
        ended = _wait(client, batch.id)
        assert ended.request_counts.succeeded == 6
        results = list(client.messages.batches.results(batch.id))
        assert [r.custom_id for r in results] == [f"r{j}" for j in range(6)]
        assert all(r.result.type == "succeeded" for r in results)
    rerun = [c.prompt_text for c in engine2.calls]
    assert len(rerun) == 6 - len(done_before)  # recorded requests are not run again, the others are
    for cid in done_before:
        assert not any(f"question {cid[1:]}<" in text for text in rerun)


def test_a_batch_past_its_expiry_marks_the_rest_expired(tokenizer, tmp_path):
    engine, app = _server(tokenizer, tmp_path, batch_concurrency=1)
    engine.default = Script("slow " * 10, delay=0.02)
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req(f"r{j}") for j in range(5)])
        app.state.batches.get(batch.id).expires_at = time.time()  # as if 24 hours had passed
        ended = _wait(client, batch.id)
        counts = ended.request_counts
        assert counts.expired >= 3 and counts.succeeded + counts.expired == 5
        kinds = [r.result.type for r in client.messages.batches.results(batch.id)]
        assert kinds == sorted(kinds, key=lambda k: k != "succeeded")  # finished ones first, then expired
    with open(tmp_path / batch.id / "results.jsonl") as fh:  # the expired results are stored too
        assert sum(json.loads(line)["result"]["type"] == "expired" for line in fh) == counts.expired


def test_batches_in_metrics(tokenizer):
    import io

    import openai
    from prometheus_client.parser import text_string_to_metric_families

    _, app = _server(tokenizer)
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req("ok"), _req("long", "word " * 5000)])
        _wait(client, batch.id)
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": "hi", "max_tokens": 4}}
        f = oa.files.create(file=("in.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch")
        ob = oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 30
        while oa.batches.retrieve(ob.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = httpx.get(server.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("moonlet_batches", (("api", "anthropic"), ("status", "ended")))] == 1
    assert samples[("moonlet_batches", (("api", "openai"), ("status", "ended")))] == 1
    assert samples[("moonlet_batch_requests_total", (("api", "anthropic"), ("result", "succeeded")))] == 1
    assert samples[("moonlet_batch_requests_total", (("api", "anthropic"), ("result", "errored")))] == 1
    assert samples[("moonlet_batch_requests_total", (("api", "openai"), ("result", "completed")))] == 1


def test_a_restart_keeps_only_state_in_memory_and_cuts_a_torn_results_line(tokenizer, tmp_path):
    """An ended batch is read back as its state and counts (its requests and results stay on disk and
    are streamed when downloaded); a running batch whose results file ends in a line cut by a crash
    gets that line cut off, runs that request again, and ends with every line valid."""
    engine, app = _server(tokenizer, tmp_path, batch_concurrency=1)
    engine.default = Script("fine answer")
    with LiveServer(app) as server:
        client = _client(server)
        ended = client.messages.batches.create(requests=[_req(f"e{j}", f"q {j}") for j in range(4)])
        _wait(client, ended.id)
        expected = [r.model_dump() for r in client.messages.batches.results(ended.id)]
    # a second batch, as a crashed server left it: two results, the second torn mid-line
    d = tmp_path / "msgbatch_torn"
    d.mkdir()
    reqs = [_req(f"t{j}", f"torn {j}") for j in range(3)]
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    now = time.time()
    (d / "batch.json").write_text(json.dumps({"id": "msgbatch_torn", "created_at": now, "expires_at": now + 3600,
                                              "ended_at": None, "cancel_initiated_at": None, "total": 3}))
    good = json.dumps({"custom_id": "t0", "result": {"type": "succeeded", "message": {"id": "x"}}}) + "\n"
    (d / "results.jsonl").write_text(good + '{"custom_id": "t1", "result": {"type": "succ')

    engine2, app2 = _server(tokenizer, tmp_path, batch_concurrency=1)
    engine2.default = Script("fine answer")
    with LiveServer(app2) as server:
        client = _client(server)
        kept = app2.state.batches.get(ended.id)
        assert kept.requests is None and kept.results is None and not kept.done  # nothing but the state
        assert client.messages.batches.retrieve(ended.id).request_counts.succeeded == 4
        assert [r.model_dump() for r in client.messages.batches.results(ended.id)] == expected
        torn = _wait(client, "msgbatch_torn")
        assert torn.request_counts.succeeded == 3
        results = list(client.messages.batches.results("msgbatch_torn"))
        assert [r.custom_id for r in results] == ["t0", "t1", "t2"]
        assert results[0].result.message.id == "x"  # kept, not run again
    assert len(engine2.calls) == 2 and not any("torn 0<" in c.prompt_text for c in engine2.calls)
    lines = (d / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == ["t0", "t1", "t2"]


@pytest.mark.parametrize("persist", [True, False])
def test_retention_archives_an_ended_batch(tokenizer, tmp_path, persist):
    engine, app = _server(tokenizer, tmp_path if persist else None, batch_retention_days=2)
    engine.default = Script("fine answer")
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req("a"), _req("b")])
        running = client.messages.batches.create(requests=[_req("c")])
        _wait(client, batch.id)
        _wait(client, running.id)  # its task has ended and will not touch it again
        manager = app.state.batches
        manager.get(running.id).ended_at = None  # as if still running: a running batch is never archived
        assert manager.sweep(now=time.time() + 1.9 * 86400) == []
        assert manager.sweep(now=time.time() + 2.1 * 86400) == [batch.id]
        archived = client.messages.batches.retrieve(batch.id)
        assert archived.archived_at is not None and archived.results_url is None
        assert archived.request_counts.succeeded == 2 and archived.processing_status == "ended"
        gone = httpx.get(f"{server.url}/v1/messages/batches/{batch.id}/results", headers={"x-api-key": "k"})
        assert gone.status_code == 404 and "archived" in gone.json()["error"]["message"]
        if persist:
            assert not (tmp_path / batch.id / "results.jsonl").exists()
            assert not (tmp_path / batch.id / "requests.jsonl").exists()
        client.messages.batches.delete(batch.id)
    if persist:
        assert not (tmp_path / batch.id).exists()


def test_an_archived_batch_stays_archived_after_a_restart(tokenizer, tmp_path):
    engine, app = _server(tokenizer, tmp_path, batch_retention_days=1)
    engine.default = Script("fine answer")
    with LiveServer(app) as server:
        client = _client(server)
        batch = client.messages.batches.create(requests=[_req("a")])
        _wait(client, batch.id)
        app.state.batches.sweep(now=time.time() + 2 * 86400)
    _, app2 = _server(tokenizer, tmp_path)
    with LiveServer(app2) as server:
        again = _client(server).messages.batches.retrieve(batch.id)
        assert again.archived_at is not None and again.request_counts.succeeded == 1


def test_retention_must_be_positive(tokenizer):
    with pytest.raises(ValueError, match="retention"):
        _server(tokenizer, batch_retention_days=0)
