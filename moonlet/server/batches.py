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
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Query
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from .errors import APIError, invalid

logger = logging.getLogger(__name__)
router = APIRouter()

MAX_REQUESTS = 100_000
EXPIRY_SECONDS = 24 * 3600
RETENTION_SECONDS = 29 * 24 * 3600  # as the Message Batches API keeps results
SWEEP_SECONDS = 600  # how often ended batches and expired files are checked for deletion
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RETRY_STATUSES = (429, 503, 529)
MAX_RETRIES = 8


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def result_kind(result: dict) -> str:
    """What a result counts as: succeeded / errored / canceled / expired for a Message Batches result;
    completed (a 2xx answer) / failed / cancelled / expired for an OpenAI batch output line."""
    if "type" in result:
        return str(result["type"])
    error = result.get("error") or {}
    code = error.get("code") if isinstance(error, dict) else None
    if code in ("batch_cancelled", "batch_expired"):
        return code.removeprefix("batch_")
    response = result.get("response") or {}
    return "completed" if not error and 200 <= int(response.get("status_code", 0)) < 300 else "failed"


_LEADING_ID = re.compile(rb'^\{"custom_id": "([a-zA-Z0-9_-]{1,64})"')


def _custom_id_of(line: bytes) -> str:
    """The custom_id of a stored JSONL line (requests.jsonl / results.jsonl): read from the line's start
    where this module wrote it first, so a 100,000-line file is indexed without parsing every body."""
    m = _LEADING_ID.match(line)
    return m.group(1).decode() if m else json.loads(line)["custom_id"]


@dataclass
class Batch:
    """One batch. In memory it keeps its state, its result counts and which requests are done; the
    requests' bodies and the results are in ``requests`` / ``results`` only for a manager without a
    directory. With one they stay on disk (``requests.jsonl``, ``results.jsonl``), read as a stream
    when the batch runs and when its results are downloaded, so a server holding many large batches
    does not hold their bodies in memory."""
    id: str
    created_at: float
    expires_at: float
    total: int  # requests in the batch
    requests: list[dict] | None = None  # in memory only: {"custom_id", "params"} (+ "url"), in order
    results: dict[str, dict] | None = None  # in memory only: custom_id -> result (an OpenAI output line)
    done: set[str] = field(default_factory=set)  # custom_ids with a result (kept while the batch runs)
    kinds: dict[str, int] = field(default_factory=dict)  # result_kind -> results of that kind
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    archived_at: float | None = None  # when its requests and results were deleted (the retention passed)
    running: int = 0  # requests in flight now
    api: str = "anthropic"  # or "openai": whose routes see the batch and what its results look like
    info: dict = field(default_factory=dict)  # the OpenAI batch's own fields (endpoint, file ids, times)

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    @property
    def finished(self) -> int:
        """Requests with a result."""
        return sum(self.kinds.values())

    def counts(self) -> dict:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for kind, n in self.kinds.items():
            counts[kind] = n
        counts["processing"] = self.total - self.finished
        return counts

    def state(self) -> dict:
        return {"id": self.id, "created_at": self.created_at, "expires_at": self.expires_at,
                "ended_at": self.ended_at, "cancel_initiated_at": self.cancel_initiated_at,
                "archived_at": self.archived_at, "api": self.api, "info": self.info, "total": self.total,
                "kinds": self.kinds}

    def to_api(self, base_url: str) -> dict:
        available = self.ended_at is not None and self.archived_at is None
        return {"id": self.id, "type": "message_batch", "processing_status": self.status,
                "request_counts": self.counts(), "ended_at": _rfc3339(self.ended_at),
                "created_at": _rfc3339(self.created_at), "expires_at": _rfc3339(self.expires_at),
                "archived_at": _rfc3339(self.archived_at), "cancel_initiated_at": _rfc3339(self.cancel_initiated_at),
                "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if available else None}


class BatchManager:
    """Owns the batches of one server: storage, the background workers, the shared concurrency limit.
    ``app``: the ASGI app the requests are sent through; ``api_key``: the server's key, if any;
    ``files``: the server's FileStore (OpenAI batches write their output and error files there);
    ``retention_s``: how long after its creation an ended batch keeps its requests and results (then
    they are deleted and the batch is ``archived``; its record stays until deleted)."""

    def __init__(self, app, directory: str | os.PathLike | None = None, concurrency: int = 8,
                 api_key: str | None = None, retry_delay: float = 1.0, files=None,
                 retention_s: float = RETENTION_SECONDS):
        if concurrency < 1:
            raise ValueError(f"batch concurrency must be >= 1; got {concurrency}")
        if not retention_s > 0:
            raise ValueError(f"batch retention must be > 0 seconds; got {retention_s}")
        self.app = app
        self.directory = Path(directory) if directory is not None else None
        self.concurrency = concurrency
        self.api_key = api_key
        self.retry_delay = retry_delay
        self.files = files
        self.retention_s = retention_s
        self.batches: dict[str, Batch] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._limit: asyncio.Semaphore | None = None
        self._client = None
        self._sweeper: asyncio.Task | None = None

    # ---- storage -----------------------------------------------------------------------------------
    def _dir(self, batch_id: str) -> Path | None:
        return None if self.directory is None else self.directory / batch_id

    def _save_state(self, batch: Batch) -> None:
        d = self._dir(batch.id)
        if d is None:
            return
        tmp = d / f"batch.json.{os.getpid()}.{threading.get_ident()}.tmp"  # one per writer: never shared
        tmp.write_text(json.dumps(batch.state()))
        os.replace(tmp, d / "batch.json")

    def _append_result(self, batch: Batch, custom_id: str, result: dict) -> None:
        kind = result_kind(result)
        batch.kinds[kind] = batch.kinds.get(kind, 0) + 1
        batch.done.add(custom_id)
        d = self._dir(batch.id)
        if d is None:
            batch.results[custom_id] = result
            return
        with open(d / "results.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def iter_requests(self, batch: Batch):
        """The batch's requests in order, read from disk one line at a time when it has a directory."""
        if batch.requests is not None:
            yield from batch.requests
            return
        with open(self._dir(batch.id) / "requests.jsonl", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def _custom_ids(self, batch: Batch) -> list[str]:
        if batch.requests is not None:
            return [r["custom_id"] for r in batch.requests]
        with open(self._dir(batch.id) / "requests.jsonl", "rb") as fh:
            return [_custom_id_of(line) for line in fh if line.strip()]

    def iter_results(self, batch: Batch):
        """(custom_id, result) for every request, in the batch's order (an ended batch: every request
        has one). From disk, the results file is indexed by offset and each line read when its turn
        comes, so only the index is held in memory."""
        if batch.results is not None:
            for cid in self._custom_ids(batch):
                yield cid, batch.results[cid]
            return
        path = self._dir(batch.id) / "results.jsonl"
        offsets: dict[str, int] = {}
        with open(path, "rb") as fh:
            pos = 0
            for line in fh:
                if line.strip():
                    offsets[_custom_id_of(line)] = pos
                pos += len(line)
            for cid in self._custom_ids(batch):
                fh.seek(offsets[cid])
                yield cid, json.loads(fh.readline())["result"]

    def _scan_results(self, batch: Batch, path: Path) -> None:
        """Rebuild ``done`` and ``kinds`` of a batch that had not ended from its results file. A line cut
        by a crash (no newline, or not JSON) is cut off the file: its request runs again, and the next
        result starts on a line of its own."""
        good = 0
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("a line without its end")
                    row = json.loads(line)
                except ValueError:
                    break
                batch.done.add(row["custom_id"])
                kind = result_kind(row["result"])
                batch.kinds[kind] = batch.kinds.get(kind, 0) + 1
                good += len(line)
        if good < path.stat().st_size:
            logger.warning("batch %s: dropping a results line cut by a crash (its request runs again)", batch.id)
            with open(path, "rb+") as fh:
                fh.truncate(good)

    def load(self) -> None:
        """Read the batches kept in the directory (a restart). An ended batch costs its state only; one
        still running also has its done set rebuilt from its results file."""
        if self.directory is None or not self.directory.is_dir():
            return
        for d in sorted(self.directory.iterdir()):
            if not (d / "batch.json").is_file() and d.name == "files":
                continue  # the server's uploaded and output files (files.py), not a batch
            try:
                state = json.loads((d / "batch.json").read_text())
                batch = Batch(state["id"], state["created_at"], state["expires_at"], state.get("total", 0),
                              ended_at=state.get("ended_at"), cancel_initiated_at=state.get("cancel_initiated_at"),
                              archived_at=state.get("archived_at"), api=state.get("api", "anthropic"),
                              info=state.get("info", {}), kinds=dict(state.get("kinds") or {}))
                if batch.archived_at is None and ("total" not in state or batch.ended_at is None
                                                  or "kinds" not in state):
                    # a running batch (or one written before counts were saved): count what is done
                    batch.total = len(self._custom_ids(batch))
                    batch.kinds = {}
                    if (d / "results.jsonl").is_file():
                        self._scan_results(batch, d / "results.jsonl")
                    if batch.ended_at is not None:
                        batch.done = set()  # an ended batch needs no done set
            except (OSError, ValueError, KeyError) as e:
                logger.warning("skipping batch directory %s: %s", d, e)
                continue
            self.batches[batch.id] = batch

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
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        tasks = list(self._tasks.values()) + ([self._sweeper] if self._sweeper is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._sweeper = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _launch(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._process(batch))
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch.id, None))

    # ---- retention ---------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Archive every ended batch created more than ``retention_s`` ago (delete its requests and
        results; its record and counts stay), and delete the files whose ``expires_at`` has passed.
        Returns the ids of the batches archived now."""
        now = time.time() if now is None else now
        archived = []
        for batch in list(self.batches.values()):
            if batch.ended_at is None or batch.archived_at is not None or now < batch.created_at + self.retention_s:
                continue
            batch.archived_at = now
            batch.requests = [] if batch.requests is not None else None
            batch.results = {} if batch.results is not None else None
            d = self._dir(batch.id)
            if d is not None:
                self._save_state(batch)
                for name in ("requests.jsonl", "results.jsonl"):
                    (d / name).unlink(missing_ok=True)
            archived.append(batch.id)
        if self.files is not None:
            self.files.sweep(now)
        return archived

    async def _sweep_forever(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried; it must not stop the server
                logger.exception("batch retention sweep failed")
            await asyncio.sleep(SWEEP_SECONDS)

    # ---- the API's operations ----------------------------------------------------------------------
    def create(self, requests: list[dict], api: str = "anthropic", info: dict | None = None,
               failed: bool = False) -> Batch:
        """A new batch of ``requests``, stored and started. ``failed``: an OpenAI batch whose input did
        not validate; it is stored as ended and never runs."""
        now = time.time()
        prefix = "msgbatch_" if api == "anthropic" else "batch_"
        batch = Batch(f"{prefix}{uuid.uuid4().hex[:24]}", now, now + EXPIRY_SECONDS, len(requests), api=api,
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
        else:
            batch.requests, batch.results = list(requests), {}
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
        for r in self.iter_requests(batch):
            if r["custom_id"] not in batch.done:
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
        batch.done = set()  # the counts say the rest
        self._save_state(batch)

    async def _process(self, batch: Batch) -> None:
        running: set[asyncio.Task] = set()
        if batch.api == "openai" and batch.info.get("in_progress_at") is None:
            batch.info["in_progress_at"] = time.time()
            self._save_state(batch)
        try:
            for r in self.iter_requests(batch):
                if r["custom_id"] in batch.done:
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
            elif batch.finished < batch.total:
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
    manager = manager_of(request)
    if batch.archived_at is not None:
        raise APIError("not_found", f"message batch {batch_id} was archived at {_rfc3339(batch.archived_at)}: its "
                       f"results are kept {_days(manager.retention_s)} after creation")

    def lines():
        for cid, result in manager.iter_results(batch):
            yield json.dumps({"custom_id": cid, "result": result}, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-jsonl")


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} s"
