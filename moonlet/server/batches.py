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
    requests: list[dict]  # {"custom_id", "params"}, in the order given
    results: dict[str, dict] = field(default_factory=dict)  # custom_id -> result
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    running: int = 0  # requests in flight now

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
                "ended_at": self.ended_at, "cancel_initiated_at": self.cancel_initiated_at}

    def to_api(self, base_url: str) -> dict:
        return {"id": self.id, "type": "message_batch", "processing_status": self.status,
                "request_counts": self.counts(), "ended_at": _rfc3339(self.ended_at),
                "created_at": _rfc3339(self.created_at), "expires_at": _rfc3339(self.expires_at),
                "archived_at": None, "cancel_initiated_at": _rfc3339(self.cancel_initiated_at),
                "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if self.ended_at else None}


class BatchManager:
    """Owns the batches of one server: storage, the background workers, the shared concurrency limit.
    ``app``: the ASGI app the requests are sent through; ``api_key``: the server's key, if any."""

    def __init__(self, app, directory: str | os.PathLike | None = None, concurrency: int = 8,
                 api_key: str | None = None, retry_delay: float = 1.0):
        if concurrency < 1:
            raise ValueError(f"batch concurrency must be >= 1; got {concurrency}")
        self.app = app
        self.directory = Path(directory) if directory is not None else None
        self.concurrency = concurrency
        self.api_key = api_key
        self.retry_delay = retry_delay
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
                                              results, state.get("ended_at"), state.get("cancel_initiated_at"))

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
    def create(self, requests: list[dict]) -> Batch:
        now = time.time()
        batch = Batch(f"msgbatch_{uuid.uuid4().hex[:24]}", now, now + EXPIRY_SECONDS, requests)
        d = self._dir(batch.id)
        if d is not None:
            d.mkdir(parents=True)
            with open(d / "requests.jsonl", "w", encoding="utf-8") as fh:
                for r in requests:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._save_state(batch)
        self.batches[batch.id] = batch
        self._launch(batch)
        return batch

    def get(self, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise APIError("not_found", f"no message batch {batch_id!r} on this server")
        return batch

    def cancel(self, batch: Batch) -> None:
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = time.time()
            self._save_state(batch)
            if batch.id not in self._tasks:  # nothing running it (cannot happen while started): end it here
                self._finish_rest(batch, "canceled")

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
        for r in batch.requests:
            if r["custom_id"] not in batch.results:
                self._append_result(batch, r["custom_id"], {"type": kind})
        batch.ended_at = time.time()
        self._save_state(batch)

    async def _process(self, batch: Batch) -> None:
        running: set[asyncio.Task] = set()
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
            elif len(batch.results) < len(batch.requests):
                self._finish_rest(batch, "expired")
            else:
                batch.ended_at = time.time()
                self._save_state(batch)
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _run_one(self, batch: Batch, request: dict) -> None:
        try:
            result = await self._call(request["params"])
            self._append_result(batch, request["custom_id"], result)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the batch
            logger.exception("batch %s request %s failed", batch.id, request["custom_id"])
            self._append_result(batch, request["custom_id"], {"type": "errored", "error": {
                "type": "error", "error": {"type": "api_error", "message": f"internal error: {type(e).__name__}"}}})
        finally:
            batch.running -= 1
            self._limit.release()

    async def _call(self, params: dict) -> dict:
        delay = self.retry_delay
        for attempt in range(MAX_RETRIES + 1):
            response = await self._client.post("/v1/messages", json=params)
            if response.status_code == 200:
                return {"type": "succeeded", "message": response.json()}
            if response.status_code in RETRY_STATUSES and attempt < MAX_RETRIES:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            try:
                body = response.json()
            except ValueError:
                body = {"type": "error", "error": {"type": "api_error", "message": response.text[:500]}}
            return {"type": "errored", "error": body}
        raise AssertionError("unreachable")


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
    ordered = sorted(manager.batches.values(), key=lambda b: b.created_at, reverse=True)  # newest first
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
