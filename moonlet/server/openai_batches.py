"""The OpenAI Files and Batch APIs: ``/v1/files`` and ``/v1/batches``.

A client uploads a JSONL file of requests (``purpose="batch"``; each line ``{"custom_id", "method":
"POST", "url", "body"}``), creates a batch from it for one endpoint (``/v1/chat/completions``,
``/v1/completions`` or ``/v1/responses``), polls the batch, and downloads its output file (the 2xx
answers) and error file (the others), both OpenAI batch output lines ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}``.

The batch runs on the server's BatchManager (``batches.py``), as the Anthropic Message Batches do:
each request is sent to this server's own route in-process, busy answers are retried, at most
``--batch-concurrency`` batch requests of both APIs run at once, and with a batch directory the
batch and the files survive a restart. The input file is checked when the batch is created (every
line parsed by ``moonlet.commands.batch.parse_requests``, every ``url`` equal to the batch's
``endpoint``); a bad file gives a batch whose status is ``failed``, with one ``errors.data`` entry
``{code, message, param, line}`` per bad line, as OpenAI does. Statuses: ``validating`` (created,
not yet picked up), ``in_progress``, ``finalizing`` (writing the files), ``completed``; ``cancelling``
then ``cancelled`` after a cancel; ``expired`` 24 hours after creation (the requests not run are
error-file lines with code ``batch_expired``).
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, File, Form, Query, UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from .batches import Batch, BatchManager, manager_of
from .errors import invalid
from .files import PURPOSES, FileStore

router = APIRouter()

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_REQUESTS = 50_000  # OpenAI's limit per batch
MAX_METADATA = 16
MAX_REPORTED_ERRORS = 1000
MIN_LIFETIME, MAX_LIFETIME = 3600, 30 * 24 * 3600  # an expiration policy's range of seconds
DEFAULT_BATCH_INPUT_LIFETIME = 30 * 24 * 3600
_ENDED = {"completed": "completed", "canceled": "cancelled", "expired": "expired"}


def files_of(request: Request) -> FileStore:
    return request.app.state.files


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


# ---- the batch object ------------------------------------------------------------------------------
def status_of(batch: Batch) -> str:
    info = batch.info
    if info.get("failed_at") is not None:
        return "failed"
    if batch.ended_at is not None:
        return _ENDED[info["end"]]
    if info.get("finalizing_at") is not None:
        return "finalizing"
    if batch.cancel_initiated_at is not None:
        return "cancelling"
    return "in_progress" if info.get("in_progress_at") is not None else "validating"


def _answered(line: dict) -> int | None:
    """The HTTP status a result line's request got (None: it never ran)."""
    response = line.get("response")
    return None if response is None else response["status_code"]


def to_openai(batch: Batch) -> dict:
    info = batch.info
    end = info.get("end")
    return {
        "id": batch.id, "object": "batch", "endpoint": info["endpoint"], "errors": info.get("errors"),
        "input_file_id": info["input_file_id"], "completion_window": info["completion_window"],
        "status": status_of(batch), "output_file_id": info.get("output_file_id"),
        "error_file_id": info.get("error_file_id"), "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(info.get("in_progress_at")), "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(info.get("finalizing_at")),
        "completed_at": _ts(batch.ended_at) if end == "completed" else None,
        "failed_at": _ts(info.get("failed_at")),
        "expired_at": _ts(batch.ended_at) if end == "expired" else None,
        "cancelling_at": _ts(batch.cancel_initiated_at),
        "cancelled_at": _ts(batch.ended_at) if end == "canceled" else None,
        "request_counts": {"total": batch.total, "completed": batch.kinds.get("completed", 0),
                           "failed": batch.kinds.get("failed", 0)},
        "metadata": info.get("metadata"),
    }


def finalize(manager: BatchManager, batch: Batch, how: str) -> None:
    """Write an ending batch's output file (2xx answers) and error file (the rest), in the input's
    order, streamed from its results; called by the manager once every request has a result line."""
    expires = batch.info.get("output_expires_after")
    expires_at = None if expires is None else int(time.time()) + int(expires["seconds"])  # from the files' creation
    writers = {"output_file_id": manager.files.writer(), "error_file_id": manager.files.writer()}
    try:
        for _, line in manager.iter_results(batch):
            status = _answered(line)
            key = "output_file_id" if status is not None and status < 300 else "error_file_id"
            writers[key].write((json.dumps(line, ensure_ascii=False) + "\n").encode())
        for key, name in (("output_file_id", "output"), ("error_file_id", "error")):
            if writers[key].bytes and batch.info.get(key) is None:
                batch.info[key] = writers[key].commit(f"{batch.id}_{name}.jsonl", "batch_output", expires_at)["id"]
            else:
                writers[key].discard()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    batch.info["end"] = how


# ---- files -------------------------------------------------------------------------------------------
@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
    if purpose not in PURPOSES or purpose == "batch_output":
        allowed = ", ".join(p for p in PURPOSES if p != "batch_output")
        raise invalid(f"purpose {purpose!r} is not one of {allowed}", param="purpose")
    form = await request.form()
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        # OpenAI's default: batch inputs expire after 30 days, other files are kept until deleted
        lifetime = DEFAULT_BATCH_INPUT_LIFETIME if purpose == "batch" else None
    else:
        lifetime = _lifetime({"anchor": anchor, "seconds": seconds}, "expires_after")
    content = await file.read()
    if not content:
        raise invalid(f"the uploaded file {file.filename!r} is empty", param="file")
    expires_at = None if lifetime is None else int(time.time()) + lifetime
    return files_of(request).add(content, file.filename or "upload", purpose, expires_at)


def _lifetime(policy, param: str) -> int:
    """The seconds of an expiration policy ``{"anchor": "created_at", "seconds": N}`` (N in 1 hour .. 30 days)."""
    if not isinstance(policy, dict) or policy.get("anchor") != "created_at":
        raise invalid(f"{param}.anchor must be 'created_at' (the only anchor); got "
                      f"{policy.get('anchor') if isinstance(policy, dict) else policy!r}", param=f"{param}.anchor")
    seconds = policy.get("seconds")
    try:
        seconds = int(seconds)
    except (TypeError, ValueError):
        raise invalid(f"{param}.seconds must be an integer number of seconds; got {seconds!r}",
                      param=f"{param}.seconds") from None
    if not MIN_LIFETIME <= seconds <= MAX_LIFETIME:
        raise invalid(f"{param}.seconds {seconds} must be between {MIN_LIFETIME} (1 hour) and {MAX_LIFETIME} "
                      "(30 days)", param=f"{param}.seconds")
    return seconds


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10_000, ge=1, le=10_000), order: str = "desc"):
    if order not in ("asc", "desc"):
        raise invalid(f"order={order!r} must be 'asc' or 'desc'", param="order")
    files = files_of(request).list(purpose)
    if order == "asc":
        files.reverse()
    return _page(files, after, limit, "file")


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request):
    return files_of(request).get(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    store = files_of(request)
    meta = store.get(file_id)
    media = "application/jsonl" if meta["filename"].endswith(".jsonl") else "application/octet-stream"
    path = store.path(file_id)
    if path is not None:  # streamed from disk, not read whole into memory
        return FileResponse(path, media_type=media)
    return Response(store.content(file_id), media_type=media)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    files_of(request).delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _page(items: list[dict], after: str | None, limit: int, what: str) -> dict:
    """A cursor page of ``items`` (already in the list's order): the ``limit`` items after ``after``."""
    lo = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid(f"after={after!r} is not a {what} on this server", param="after")
        lo = ids.index(after) + 1
    page = items[lo:lo + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": lo + len(page) < len(items)}


# ---- batches -----------------------------------------------------------------------------------------
def _check_create(body) -> dict:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object {input_file_id, endpoint, completion_window}")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise invalid(f"{name} is required (a string)", param=name)
    if body["endpoint"] not in ENDPOINTS:
        raise invalid(f"endpoint {body['endpoint']!r} is not one this server batches; use one of "
                      f"{', '.join(ENDPOINTS)}", param="endpoint")
    if body["completion_window"] != "24h":
        raise invalid(f"completion_window {body['completion_window']!r}: only '24h' is supported",
                      param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise invalid("metadata must be an object of string keys and string values", param="metadata")
        if len(metadata) > MAX_METADATA:
            raise invalid(f"metadata has {len(metadata)} pairs; at most {MAX_METADATA} are allowed", param="metadata")
        for k, v in metadata.items():
            if len(k) > 64 or len(v) > 512:
                raise invalid(f"metadata key {k[:64]!r}: keys are at most 64 characters, values at most 512",
                              param="metadata")
    if body.get("output_expires_after") is not None:
        _lifetime(body["output_expires_after"], "output_expires_after")
    return body


def _read_requests(content: bytes, filename: str, endpoint: str) -> tuple[list[dict], list[dict]]:
    """The input file's requests (``{"custom_id", "url", "params"}``) and its errors (``{code, message,
    param, line}``, empty when the file is good)."""
    from ..commands.batch import parse_requests

    errors: list[dict] = []

    def error(line: int | None, message: str, code: str = "invalid_request") -> None:
        errors.append({"code": code, "message": message, "param": None, "line": line})

    try:
        lines = content.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        error(None, f"{filename}: the file is not UTF-8 text ({e.reason} at byte {e.start})", "invalid_file")
        return [], errors
    requests = parse_requests(lines, filename, on_error=error)
    for r in requests:
        if r["url"] != endpoint:
            error(r["line"], f"{filename}:{r['line']}: url {r['url']!r} differs from the batch's endpoint "
                             f"{endpoint!r}; every line of a batch must use its endpoint", "mismatched_url")
    if not errors and not requests:
        error(None, f"{filename}: the file holds no requests", "empty_file")
    if len(requests) > MAX_REQUESTS:
        error(None, f"{filename}: {len(requests)} requests; a batch holds at most {MAX_REQUESTS}", "too_many_requests")
    errors.sort(key=lambda e: e["line"] or 0)
    return [{"custom_id": r["custom_id"], "url": r["url"], "params": r["body"]} for r in requests], errors


@router.post("/v1/batches")
async def create_batch(request: Request):
    try:
        body = await request.json()
    except ValueError:
        raise invalid("the body is not valid JSON") from None
    body = _check_create(body)
    store = files_of(request)
    meta = store.get(body["input_file_id"])
    if meta["purpose"] != "batch":
        raise invalid(f"input file {meta['id']} has purpose {meta['purpose']!r}; upload the requests with "
                      "purpose 'batch'", param="input_file_id")
    requests, errors = _read_requests(store.content(meta["id"]), meta["filename"], body["endpoint"])
    info = {"endpoint": body["endpoint"], "input_file_id": meta["id"], "completion_window": "24h",
            "metadata": body.get("metadata")}
    if body.get("output_expires_after") is not None:
        info["output_expires_after"] = {"anchor": "created_at", "seconds": int(body["output_expires_after"]["seconds"])}
    if errors:
        info["errors"] = {"object": "list", "data": errors[:MAX_REPORTED_ERRORS]}
        batch = manager_of(request).create([], api="openai", info=info, failed=True)
    else:
        batch = manager_of(request).create(requests, api="openai", info=info)
    return to_openai(batch)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    return _page([to_openai(b) for b in manager_of(request).of_api("openai")], after, limit, "batch")


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request):
    return to_openai(manager_of(request).get(batch_id, api="openai"))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    manager = manager_of(request)
    batch = manager.get(batch_id, api="openai")
    if batch.ended_at is not None:
        raise invalid(f"batch {batch_id} is {status_of(batch)}; only a batch that has not ended can be cancelled")
    manager.cancel(batch)
    return to_openai(batch)
