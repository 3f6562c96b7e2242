"""The Anthropic Message Batches API: ``/v1/messages/batches``.

A batch is up to 100,000 Messages requests, each with a ``custom_id``, processed in the background;
the client polls the batch and downloads the results as JSONL once it has ended. Endpoints: create
(POST), retrieve (GET /{id}), list (GET, newest first, ``limit`` / ``before_id`` / ``after_id``),
cancel (POST /{id}/cancel), delete (DELETE /{id}, ended batches only) and results
(GET /{id}/results, one ``{"custom_id", "result"}`` line per request, in the batch's order).

Each request runs through this server's own ``POST /v1/messages`` (an in-process ASGI call), so a
batch request is served, validated and answered exactly as the same request sent directly: a
success is ``{"type": "succeeded", "message": ...}``, a failure ``{"type": "errored", "error": <the
Messages API's error body>}``. Busy answers (429, 529) are retried with backoff instead of becoming
errors. At most ``concurrency`` batch requests run at once over all batches, so batches fill the
engine's idle capacity without crowding out interactive traffic; a batch whose ``expires_at`` (24 h
after creation) passes marks what it has not started ``expired``; a canceled one marks it
``canceled`` and ends once its running requests finish.

With a directory (``moonlet serve`` uses ``$MOONLET_HOME/batches``), each batch lives in
``DIR/<id>/``: ``batch.json`` (its state), ``requests.jsonl`` and ``results.jsonl`` (appended as
each request finishes). A server restarted after a crash or a stop picks up every unfinished batch
where it was: requests without a result line run again, the others are not repeated. Without a
directory, batches live in memory only.

The same manager runs the OpenAI Batch API's batches (``openai_batches.py``): a batch's ``api`` says
which API it belongs to (each API's routes see only their own), its requests carry the ``url`` they
are sent to, and its results are OpenAI batch output lines; the runner, the concurrency limit, the
retries and the persistence are shared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Query
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, invalid

logger = logging.getLogger(__name__)
router = APIRouter()

MAX_REQUESTS = 100_000
EXPIRY_SECONDS = 24 * 3600
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RETRY_STATUSES = (429, 503, 529)
MAX_RETRIES = 8


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Batch:
    id: str
    created_at: float
    expires_at: float
    requests: list[dict]  # {"custom_id", "params"} (+ "url" when not /v1/messages), in the order given
    results: dict[str, dict] = field(default_factory=dict)  # custom_id -> result (an OpenAI output line)
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    running: int = 0  # requests in flight now
    api: str = "anthropic"  # or "openai": whose routes see the batch and what its results look like
    info: dict = field(default_factory=dict)  # the OpenAI batch's own fields (endpoint, file ids, times)

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def counts(self) -> dict:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for r in self.results.values():
            counts[r["type"]] += 1
        counts["processing"] = len(self.requests) - len(self.results)
        return counts

    def state(self) -> dict:
        return {"id": self.id, "created_at": self.created_at, "expires_at": self.expires_at,
                "ended_at": self.ended_at, "cancel_initiated_at": self.cancel_initiated_at, "api": self.api,
                "info": self.info}

    def to_api(self, base_url: str) -> dict:
        return {"id": self.id, "type": "message_batch", "processing_status": self.status,
                "request_counts": self.counts(), "ended_at": _rfc3339(self.ended_at),
                "created_at": _rfc3339(self.created_at), "expires_at": _rfc3339(self.expires_at),
                "archived_at": None, "cancel_initiated_at": _rfc3339(self.cancel_initiated_at),
                "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if self.ended_at else None}


class BatchManager:
    """Owns the batches of one server: storage, the background workers, the shared concurrency limit.
    ``app``: the ASGI app the requests are sent through; ``api_key``: the server's key, if any;
    ``files``: the server's FileStore (OpenAI batches write their output and error files there)."""

    def __init__(self, app, directory: str | os.PathLike | None = None, concurrency: int = 8,
                 api_key: str | None = None, retry_delay: float = 1.0, files=None):
        if concurrency < 1:
            raise ValueError(f"batch concurrency must be >= 1; got {concurrency}")
        self.app = app
        self.directory = Path(directory) if directory is not None else None
        self.concurrency = concurrency
        self.api_key = api_key
        self.retry_delay = retry_delay
        self.files = files
        self.batches: dict[str, Batch] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._limit: asyncio.Semaphore | None = None
        self._client = None

    # ---- storage -----------------------------------------------------------------------------------
    def _dir(self, batch_id: str) -> Path | None:
        return None if self.directory is None else self.directory / batch_id

    def _save_state(self, batch: Batch) -> None:
        d = self._dir(batch.id)
        if d is None:
            return
        tmp = d / "batch.json.tmp"
        tmp.write_text(json.dumps(batch.state()))
        os.replace(tmp, d / "batch.json")

    def _append_result(self, batch: Batch, custom_id: str, result: dict) -> None:
        batch.results[custom_id] = result
        d = self._dir(batch.id)
        if d is not None:
            with open(d / "results.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def load(self) -> None:
        """Read the batches kept in the directory (a restart)."""
        if self.directory is None or not self.directory.is_dir():
            return
        for d in sorted(self.directory.iterdir()):
            if not (d / "batch.json").is_file() and d.name == "files":
                continue  # the server's uploaded and output files (files.py), not a batch
            try:
                state = json.loads((d / "batch.json").read_text())
                with open(d / "requests.jsonl", encoding="utf-8") as fh:
                    requests = [json.loads(line) for line in fh if line.strip()]
                results: dict[str, dict] = {}
                if (d / "results.jsonl").is_file():
                    with open(d / "results.jsonl", encoding="utf-8") as fh:
                        for line in fh:
                            try:
                                row = json.loads(line)
                            except json.JSONDecodeError:
                                break  # a line cut by a crash: that request runs again
                            results[row["custom_id"]] = row["result"]
            except (OSError, ValueError, KeyError) as e:
                logger.warning("skipping batch directory %s: %s", d, e)
                continue
            self.batches[state["id"]] = Batch(state["id"], state["created_at"], state["expires_at"], requests,
                                              results, state.get("ended_at"), state.get("cancel_initiated_at"),
                                              api=state.get("api", "anthropic"), info=state.get("info", {}))

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        import httpx

        self._limit = asyncio.Semaphore(self.concurrency)
        headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://moonlet-batch",
                                         headers=headers, timeout=None)
        self.load()
        for batch in self.batches.values():
            if batch.ended_at is None:
                self._launch(batch)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _launch(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._process(batch))
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch.id, None))

    # ---- the API's operations ----------------------------------------------------------------------
    def create(self, requests: list[dict], api: str = "anthropic", info: dict | None = None,
               failed: bool = False) -> Batch:
        """A new batch of ``requests``, stored and started. ``failed``: an OpenAI batch whose input did
        not validate; it is stored as ended and never runs."""
        now = time.time()
        prefix = "msgbatch_" if api == "anthropic" else "batch_"
        batch = Batch(f"{prefix}{uuid.uuid4().hex[:24]}", now, now + EXPIRY_SECONDS, requests, api=api,
                      info=dict(info or {}))
        if failed:
            batch.ended_at = batch.info["failed_at"] = now
        d = self._dir(batch.id)
        if d is not None:
            d.mkdir(parents=True)
            with open(d / "requests.jsonl", "w", encoding="utf-8") as fh:
                for r in requests:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._save_state(batch)
        self.batches[batch.id] = batch
        if not failed:
            self._launch(batch)
        return batch

    def get(self, batch_id: str, api: str = "anthropic") -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None or batch.api != api:
            what = "message batch" if api == "anthropic" else "batch"
            raise APIError("not_found", f"no {what} {batch_id!r} on this server")
        return batch

    def of_api(self, api: str) -> list[Batch]:
        """The batches of one API, newest first."""
        return sorted((b for b in self.batches.values() if b.api == api), key=lambda b: b.created_at, reverse=True)

    def cancel(self, batch: Batch) -> None:
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = time.time()
            self._save_state(batch)
            if batch.id not in self._tasks:  # nothing running it (cannot happen while started): end it here
                self._finish_rest(batch, "canceled")
                self._end(batch, "canceled")

    def delete(self, batch: Batch) -> None:
        if batch.ended_at is None:
            raise invalid(f"message batch {batch.id} is {batch.status}; only an ended batch can be deleted (cancel "
                          "it first and wait for it to end)")
        del self.batches[batch.id]
        d = self._dir(batch.id)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    # ---- processing --------------------------------------------------------------------------------
    def _finish_rest(self, batch: Batch, kind: str) -> None:
        """Give every request without a result the result ``kind`` ('canceled' or 'expired')."""
        for r in batch.requests:
            if r["custom_id"] not in batch.results:
                if batch.api == "anthropic":
                    result = {"type": kind}
                else:  # OpenAI writes these to the error file with a code and no response
                    code = "batch_cancelled" if kind == "canceled" else "batch_expired"
                    message = ("the batch was cancelled before this request ran" if kind == "canceled" else
                               "this request could not be run before the batch's completion window expired")
                    result = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": r["custom_id"],
                              "response": None, "error": {"code": code, "message": message}}
                self._append_result(batch, r["custom_id"], result)

    def _end(self, batch: Batch, how: str) -> None:
        """End the batch ('completed', 'canceled' or 'expired'); an OpenAI batch first writes its
        output and error files (``finalizing``)."""
        if batch.api == "openai":
            from .openai_batches import finalize

            batch.info["finalizing_at"] = time.time()
            self._save_state(batch)
            finalize(self, batch, how)
        batch.ended_at = time.time()
        self._save_state(batch)

    async def _process(self, batch: Batch) -> None:
        running: set[asyncio.Task] = set()
        if batch.api == "openai" and batch.info.get("in_progress_at") is None:
            batch.info["in_progress_at"] = time.time()
            self._save_state(batch)
        try:
            for r in batch.requests:
                if r["custom_id"] in batch.results:
                    continue
                await self._limit.acquire()
                if batch.cancel_initiated_at is not None or time.time() >= batch.expires_at:
                    self._limit.release()
                    break
                batch.running += 1
                task = asyncio.get_running_loop().create_task(self._run_one(batch, r))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
            if batch.cancel_initiated_at is not None:
                self._finish_rest(batch, "canceled")
                self._end(batch, "canceled")
            elif len(batch.results) < len(batch.requests):
                self._finish_rest(batch, "expired")
                self._end(batch, "expired")
            else:
                self._end(batch, "completed")
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _run_one(self, batch: Batch, request: dict) -> None:
        try:
            status, body, request_id = await self._call(request.get("url", "/v1/messages"), request["params"])
        except asyncio.CancelledError:
            batch.running -= 1
            self._limit.release()
            raise
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the batch
            logger.exception("batch %s request %s failed", batch.id, request["custom_id"])
            message = f"internal error: {type(e).__name__}"
            status, request_id = 500, ""
            body = ({"type": "error", "error": {"type": "api_error", "message": message}} if batch.api == "anthropic"
                    else {"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        try:
            self._append_result(batch, request["custom_id"], _result(batch, request, status, body, request_id))
        finally:
            batch.running -= 1
            self._limit.release()

    async def _call(self, url: str, params: dict) -> tuple[int, object, str]:
        """(status, JSON body, request id) of ``params`` sent to this server's ``url``, busy answers retried."""
        delay = self.retry_delay
        for attempt in range(MAX_RETRIES + 1):
            response = await self._client.post(url, json=params)
            if response.status_code in RETRY_STATUSES and attempt < MAX_RETRIES:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            try:
                body = response.json()
            except ValueError:
                body = {"type": "error", "error": {"type": "api_error", "message": response.text[:500]}}
            return response.status_code, body, response.headers.get("request-id", "")
        raise AssertionError("unreachable")


def _result(batch: Batch, request: dict, status: int, body, request_id: str) -> dict:
    """A finished request's result: a Message Batches result, or an OpenAI batch output line."""
    if batch.api == "anthropic":
        if status == 200:
            return {"type": "succeeded", "message": body}
        return {"type": "errored", "error": body}
    from ..commands.batch import answer_line

    return answer_line({"custom_id": request["custom_id"], "format": "openai"}, status, body, request_id)


def manager_of(request: Request) -> BatchManager:
    return request.app.state.batches


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _check_requests(body) -> list[dict]:
    from .anthropic import MessagesRequest

    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise invalid("the body must be an object with a 'requests' list of {custom_id, params}", param="requests")
    reqs = body["requests"]
    if not 1 <= len(reqs) <= MAX_REQUESTS:
        raise invalid(f"a batch holds 1 to {MAX_REQUESTS} requests; got {len(reqs)}", param="requests")
    seen: set[str] = set()
    out = []
    for i, r in enumerate(reqs):
        where = f"requests.{i}"
        if not isinstance(r, dict) or set(r) - {"custom_id", "params"} or "params" not in r:
            raise invalid(f"{where} must be an object with exactly 'custom_id' and 'params'", param=where)
        cid = r.get("custom_id")
        if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
            raise invalid(f"{where}.custom_id {cid!r} must be 1-64 letters, digits, '_' or '-'",
                          param=f"{where}.custom_id")
        if cid in seen:
            raise invalid(f"{where}.custom_id {cid!r} is used twice; custom_id values must be unique in a batch",
                          param=f"{where}.custom_id")
        seen.add(cid)
        params = r["params"]
        if not isinstance(params, dict):
            raise invalid(f"{where}.params must be a Messages request object", param=f"{where}.params")
        if params.get("stream"):
            raise invalid(f"{where}.params.stream: batch requests cannot stream", param=f"{where}.params.stream")
        try:
            MessagesRequest.model_validate(params)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            raise invalid(f"{where}.params.{loc}: {first.get('msg')}", param=f"{where}.params.{loc}") from None
        out.append({"custom_id": cid, "params": params})
    return out


@router.post("/v1/messages/batches")
async def create_batch(request: Request):
    try:
        body = await request.json()
    except ValueError:
        raise invalid("the body is not valid JSON") from None
    batch = manager_of(request).create(_check_requests(body))
    return batch.to_api(_base_url(request))


@router.get("/v1/messages/batches")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=1000), before_id: str | None = None,
                       after_id: str | None = None):
    manager = manager_of(request)
    ordered = manager.of_api("anthropic")  # newest first
    ids = [b.id for b in ordered]
    lo, hi = 0, len(ordered)
    for cursor, name in ((after_id, "after_id"), (before_id, "before_id")):
        if cursor is not None and cursor not in ids:
            raise invalid(f"{name}={cursor!r} is not a batch on this server", param=name)
    if after_id is not None:  # the page after this id in the list's order
        lo = ids.index(after_id) + 1
    if before_id is not None:  # the page just before it
        hi = ids.index(before_id)
        lo = max(lo, hi - limit)
    page = ordered[lo:hi][:limit]
    has_more = (lo + len(page) < hi) if before_id is None else lo > 0
    base = _base_url(request)
    return {"data": [b.to_api(base) for b in page], "has_more": has_more,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/v1/messages/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request):
    return manager_of(request).get(batch_id).to_api(_base_url(request))


@router.post("/v1/messages/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    manager = manager_of(request)
    batch = manager.get(batch_id)
    manager.cancel(batch)
    return batch.to_api(_base_url(request))


@router.delete("/v1/messages/batches/{batch_id}")
async def delete_batch(batch_id: str, request: Request):
    manager = manager_of(request)
    manager.delete(manager.get(batch_id))
    return JSONResponse({"id": batch_id, "type": "message_batch_deleted"})


@router.get("/v1/messages/batches/{batch_id}/results")
async def batch_results(batch_id: str, request: Request):
    batch = manager_of(request).get(batch_id)
    if batch.ended_at is None:
        raise invalid(f"message batch {batch_id} is {batch.status}; its results are available once it has ended "
                      "(poll GET /v1/messages/batches/{id} until processing_status is 'ended')")
    lines = [json.dumps({"custom_id": r["custom_id"], "result": batch.results[r["custom_id"]]}, ensure_ascii=False)
             for r in batch.requests]
    return Response("\n".join(lines) + "\n", media_type="application/x-jsonl")
