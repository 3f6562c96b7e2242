"""`moonlet batch`: run a file of API requests offline, without a server, and write their answers.

The input is JSONL in either batch format the two APIs define (one request per line; the formats
may be mixed):

- OpenAI's Batch API input: ``{"custom_id", "method": "POST", "url", "body"}`` with ``url`` one of
  ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/messages``; the output line
  is OpenAI's batch output ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error": null}``;
- Anthropic's Message Batches request: ``{"custom_id", "params"}`` (a Messages request); the output
  line is a Message Batches result ``{"custom_id", "result": {"type": "succeeded", "message"} |
  {"type": "errored", "error"}}``.

Every request goes through the same route handlers ``moonlet serve`` uses (the server app, called
in-process), so an answer is exactly what the server would have sent. Output lines are appended as
requests finish (in completion order, matched by ``custom_id``) and synced; run the same command again
after a crash or Ctrl-C and the requests already in the output file are skipped. The whole input is
checked before anything runs: a bad line is an error naming ``FILE:LINE``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

from ..engine.config import add_engine_cli_args
from .serve import engine_args, resolve_model

OPENAI_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def register(sub) -> None:
    p = sub.add_parser("batch", help="run a JSONL file of API requests offline (OpenAI or Anthropic batch format)",
                       description="Run a JSONL file of requests (OpenAI Batch API input lines or Anthropic Message "
                                   "Batches requests) through the engine without a server, appending one answer "
                                   "line per request to OUTPUT; a rerun skips the requests OUTPUT already has.")
    p.add_argument("-i", "--input", required=True, help="JSONL requests ('-' for stdin)")
    p.add_argument("-o", "--output", required=True, help="JSONL answers (appended; existing custom_ids are skipped)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled moonlet-tiny)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at once (default: the engine's max-num-seqs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    add_engine_cli_args(p)
    p.set_defaults(func=run)


def parse_requests(lines, source: str, on_error=None) -> list[dict]:
    """The input lines as ``{"custom_id", "url", "body", "format", "line"}``; ValueError naming FILE:LINE for
    a bad one (not JSON, unknown shape, an unsupported url or method, streaming, a repeated custom_id).
    ``on_error(line_number, message)``: called for each bad line instead of raising (the server's
    OpenAI Batch API reports every bad line of an input file); the bad lines are left out."""
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = _parse_line(line, f"{source}:{n}", seen)
        except ValueError as e:
            if on_error is None:
                raise
            on_error(n, str(e))
            continue
        seen.add(request["custom_id"])
        request["line"] = n
        out.append(request)
    return out


def _parse_line(line: str, where: str, seen: set[str]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a request line must be a JSON object")
    cid = row.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise ValueError(f"{where}: 'custom_id' must be a non-empty string")
    if cid in seen:
        raise ValueError(f"{where}: custom_id {cid!r} is used twice; each request needs its own")
    if "params" in row:
        fmt, url, body = "anthropic", "/v1/messages", row["params"]
    elif "body" in row:
        fmt, url, body = "openai", row.get("url"), row["body"]
        if row.get("method", "POST") != "POST":
            raise ValueError(f"{where}: method {row.get('method')!r}: only POST requests can be batched")
        if url not in OPENAI_URLS:
            raise ValueError(f"{where}: url {url!r} is not one this server answers in a batch; use one of "
                             f"{', '.join(OPENAI_URLS)}")
    else:
        raise ValueError(f"{where}: expected an OpenAI batch line {{custom_id, method, url, body}} or an "
                         "Anthropic one {custom_id, params}")
    if not isinstance(body, dict):
        raise ValueError(f"{where}: the request body must be a JSON object")
    if body.get("stream"):
        raise ValueError(f"{where}: 'stream' must be false or absent in a batch")
    return {"custom_id": cid, "url": url, "body": body, "format": fmt}


def done_ids(path: str) -> set[str]:
    """custom_ids already answered in an output file (a last line cut by a crash does not count)."""
    ids: set[str] = set()
    if not os.path.exists(path):
        return ids
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                ids.add(json.loads(line)["custom_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return ids


def answer_line(request: dict, status: int, body, request_id: str) -> dict:
    """The output line for a finished request, in its input's format."""
    if request["format"] == "anthropic":
        if status == 200:
            return {"custom_id": request["custom_id"], "result": {"type": "succeeded", "message": body}}
        return {"custom_id": request["custom_id"], "result": {"type": "errored", "error": body}}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": request["custom_id"],
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


async def run_requests(app, requests: list[dict], output: str, concurrency: int, progress=None) -> dict:
    """Send ``requests`` through ``app`` (an ASGI app), at most ``concurrency`` at a time, appending
    each answer to ``output``. Returns counts: done, ok (2xx), failed."""
    import httpx

    counts = {"done": 0, "ok": 0, "failed": 0}
    limit = asyncio.Semaphore(concurrency)
    if os.path.exists(output) and os.path.getsize(output):
        with open(output, "rb+") as fh:  # a line cut by a crash: start the new answers on a line of their own
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    headers = {"anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moonlet-batch",
                                 headers=headers, timeout=None) as client:
        with open(output, "a", encoding="utf-8") as fh:
            async def one(request: dict) -> None:
                async with limit:
                    response = await client.post(request["url"], json=request["body"])
                try:
                    body = response.json()
                except ValueError:
                    body = {"error": {"message": response.text[:500]}}
                line = answer_line(request, response.status_code, body, response.headers.get("request-id", ""))
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                counts["done"] += 1
                counts["ok" if response.status_code < 300 else "failed"] += 1
                if progress is not None:
                    progress(counts)

            await asyncio.gather(*(one(r) for r in requests))
    return counts


def run(args) -> int:
    from ..engine import AsyncLLM
    from ..server import create_app

    if args.input == "-":
        lines = sys.stdin.read().splitlines()
        source = "stdin"
    else:
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"--input {args.input!r} is not a file")
        with open(args.input, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        source = args.input
    requests = parse_requests(lines, source)
    skip = done_ids(args.output)
    todo = [r for r in requests if r["custom_id"] not in skip]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"moonlet batch: {len(requests)} requests, {len(requests) - len(todo)} already in {args.output}, "
        f"{len(todo)} to run")
    if not todo:
        return 0
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency} must be at least 1")
    path = resolve_model(args.model)
    engine = AsyncLLM(path, start=False, **engine_args(args, path))
    app = create_app(engine)
    concurrency = args.concurrency or engine.engine.config.max_num_seqs
    started = time.monotonic()
    last = [0.0]

    def progress(counts):
        now = time.monotonic()
        if now - last[0] >= 2 or counts["done"] == len(todo):
            last[0] = now
            say(f"  {counts['done']}/{len(todo)} done ({counts['failed']} failed), {now - started:.0f} s")

    engine.start()
    try:
        counts = asyncio.run(run_requests(app, todo, args.output, concurrency, progress))
    finally:
        engine.shutdown()
    say(f"moonlet batch: {counts['ok']} answered, {counts['failed']} failed (their error bodies are in "
        f"{args.output}), {time.monotonic() - started:.1f} s")
    return 0 if counts["failed"] == 0 else 3
