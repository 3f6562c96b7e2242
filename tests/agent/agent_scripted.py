"""A scripted Anthropic Messages endpoint for the agent tests: a real HTTP server (uvicorn on a free
127.0.0.1 port, in a background thread) whose replies come from a test's script function. Replies
stream in the Messages API's event order (message_start, ping, per block content_block_start /
deltas / content_block_stop, message_delta, message_stop); a reply can instead be an HTTP error
(429 with retry-after, 500, ...), an `event: error` mid-stream, a malformed tool-call JSON, or slow."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def text(s: str) -> dict:
    return {"type": "text", "text": s}


_ids = itertools.count(1)


def tool(name: str, input: dict, id: str | None = None) -> dict:
    return {"type": "tool_use", "id": id or f"toolu_{next(_ids):06d}", "name": name, "input": input}


def thinking(s: str, signature: str = "sig") -> dict:
    return {"type": "thinking", "thinking": s, "signature": signature}


@dataclass
class Reply:
    content: list = field(default_factory=list)
    stop_reason: str | None = None                 # default: tool_use if a tool_use block, else end_turn
    status: int = 200                              # != 200: an error reply with this status
    error_type: str = "api_error"
    message: str = "scripted error"
    retry_after: float | None = None
    delay: float = 0.0                             # seconds before the reply starts
    raw_json: dict = field(default_factory=dict)   # block index -> partial_json text sent instead of the input
    stream_error: str | None = None                # an `event: error` of this type after message_start


def error(status: int, error_type: str, message: str = "scripted error", retry_after: float | None = None) -> Reply:
    return Reply(status=status, error_type=error_type, message=message, retry_after=retry_after)


def count_tokens(body: dict) -> int:
    """The endpoint's own token count: one token per 4 characters of the request's JSON."""
    parts = {k: body[k] for k in ("system", "messages", "tools") if k in body}
    return math.ceil(len(json.dumps(parts, ensure_ascii=False, separators=(",", ":"))) / 4)


# -- helpers scripts use to read a request --------------------------------------------------------
def blocks(message: dict) -> list[dict]:
    c = message["content"]
    return [{"type": "text", "text": c}] if isinstance(c, str) else c


def first_user_text(body: dict) -> str:
    return "".join(b.get("text", "") for b in blocks(body["messages"][0]) if b.get("type") == "text")


def tool_results(body: dict) -> list[dict]:
    return [b for m in body["messages"] if m["role"] == "user" for b in blocks(m) if b.get("type") == "tool_result"]


def result_text(block: dict) -> str:
    c = block.get("content")
    return c if isinstance(c, str) else "".join(x.get("text", "") for x in c or [])


def last_results(body: dict) -> list[dict]:
    last = body["messages"][-1]
    return [b for b in blocks(last) if b.get("type") == "tool_result"] if last["role"] == "user" else []


class ScriptedEndpoint:
    def __init__(self, script: Callable[[dict], Reply], *, count_tokens_enabled: bool = True,
                 window: int | None = None, chunk: int = 7):
        self.script = script
        self.count_tokens_enabled = count_tokens_enabled
        self.window = window
        self.chunk = chunk
        self.requests: list[dict] = []
        self.oversized: list[int] = []
        self.count_calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self._server = None
        self._thread = None
        self.url = ""

    # the app ---------------------------------------------------------------------------------
    def _app(self) -> Starlette:
        async def messages(request: Request):
            body = await request.json()
            self.requests.append(body)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if self.window is not None:
                    n = count_tokens(body)
                    if n + body["max_tokens"] > self.window:
                        self.oversized.append(n + body["max_tokens"])
                        self.inflight -= 1
                        return _error(400, "invalid_request_error",
                                      f"prompt is too long: {n} tokens + max_tokens {body['max_tokens']} > {self.window}")
                reply = self.script(body)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            except BaseException:
                self.inflight -= 1
                raise
            if reply.status != 200:
                self.inflight -= 1
                return _error(reply.status, reply.error_type, reply.message, reply.retry_after)
            if not body.get("stream"):
                self.inflight -= 1
                return JSONResponse(self._final(body, reply))
            return StreamingResponse(self._events(body, reply), media_type="text/event-stream")

        async def count(request: Request):
            if not self.count_tokens_enabled:
                return _error(404, "not_found_error", "no count_tokens here")
            self.count_calls += 1
            return JSONResponse({"input_tokens": count_tokens(await request.json())})

        async def models(request: Request):
            return JSONResponse({"data": [{"id": "scripted", "type": "model", "display_name": "scripted",
                                           "created_at": "2025-01-01T00:00:00Z"}], "has_more": False,
                                 "first_id": "scripted", "last_id": "scripted"})

        async def model(request: Request):
            return JSONResponse({"id": request.path_params["mid"], "type": "model", "display_name": "scripted",
                                 "created_at": "2025-01-01T00:00:00Z", "max_input_tokens": self.window or 200000})

        return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"]),
                                 Route("/v1/messages/count_tokens", count, methods=["POST"]),
                                 Route("/v1/models", models), Route("/v1/models/{mid}", model)])

    def _stop_reason(self, reply: Reply) -> str:
        if reply.stop_reason:
            return reply.stop_reason
        return "tool_use" if any(b["type"] == "tool_use" for b in reply.content) else "end_turn"

    def _final(self, body: dict, reply: Reply) -> dict:
        return {"id": f"msg_{next(_ids):08d}", "type": "message", "role": "assistant", "content": reply.content,
                "model": body.get("model"), "stop_reason": self._stop_reason(reply), "stop_sequence": None,
                "usage": {"input_tokens": count_tokens(body), "output_tokens": 5}}

    async def _events(self, body: dict, reply: Reply):
        def frame(kind: str, data: dict) -> bytes:
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

        try:
            c = self.chunk
            yield frame("message_start", {"type": "message_start", "message": {
                "id": f"msg_{next(_ids):08d}", "type": "message", "role": "assistant", "content": [],
                "model": body.get("model"), "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": count_tokens(body), "output_tokens": 1}}})
            yield frame("ping", {"type": "ping"})
            if reply.stream_error:
                yield frame("error", {"type": "error", "error": {"type": reply.stream_error, "message": "scripted"}})
                return
            out_tokens = 1
            for i, block in enumerate(reply.content):
                kind = block["type"]
                if kind == "text":
                    start = {"type": "text", "text": ""}
                elif kind == "thinking":
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                else:
                    start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                yield frame("content_block_start", {"type": "content_block_start", "index": i, "content_block": start})
                if kind == "text":
                    pieces = [("text_delta", "text", block["text"][j:j + c]) for j in range(0, len(block["text"]), c)]
                elif kind == "thinking":
                    pieces = [("thinking_delta", "thinking", block["thinking"][j:j + c])
                              for j in range(0, len(block["thinking"]), c)]
                    pieces.append(("signature_delta", "signature", block["signature"]))
                else:
                    raw = reply.raw_json.get(i, json.dumps(block["input"]))
                    pieces = [("input_json_delta", "partial_json", raw[j:j + c]) for j in range(0, len(raw), c)]
                for dtype, key, value in pieces:
                    out_tokens += 1
                    yield frame("content_block_delta", {"type": "content_block_delta", "index": i,
                                                        "delta": {"type": dtype, key: value}})
                    await asyncio.sleep(0)
                yield frame("content_block_stop", {"type": "content_block_stop", "index": i})
            yield frame("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": self._stop_reason(reply), "stop_sequence": None}, "usage": {"output_tokens": out_tokens}})
            yield frame("message_stop", {"type": "message_stop"})
        finally:
            self.inflight -= 1

    # lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "ScriptedEndpoint":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", access_log=False,
                                timeout_keep_alive=30, backlog=2048, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted endpoint did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _error(status: int, error_type: str, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    return JSONResponse({"type": "error", "error": {"type": error_type, "message": message},
                         "request_id": "req_scripted"}, status_code=status, headers=headers)


def make_agent(url: str, workdir, store=None, *, approval: str = "yolo", prompt=None, task: str = "task",
               backoff: float = 0.01, max_retries: int = 4, extra_tools=(), only=None, hooks=None, **config):
    """An Agent (with its own client and an in-memory store unless one is given) for the endpoint;
    `hooks` is a hooks config dict ({"hooks": {...}})."""
    from moonlet.agent import Agent, AgentConfig, AnthropicClient, ApprovalPolicy, SessionStore, Workspace, make_tools
    from moonlet.agent.loop import Budgets
    from moonlet.agent.compress import CompactionConfig

    budgets = Budgets(**{k: config.pop(k) for k in ("max_steps", "max_hours") if k in config})
    if "token_budget" in config:
        budgets.max_tokens = config.pop("token_budget")
    compaction = CompactionConfig(**config.pop("compaction", {}))
    cfg = AgentConfig(model="scripted", budgets=budgets, compaction=compaction, **config)
    client = AnthropicClient(url, backoff_base=backoff, max_retries=max_retries)
    def factory(depth):
        reg = make_tools(depth, cfg.max_depth, list(extra_tools))
        if only is not None:
            reg.tools = {k: v for k, v in reg.tools.items() if k in only}
        return reg

    runner = None
    if hooks is not None:
        from moonlet.agent.hooks import HookRunner, HooksConfig
        runner = HookRunner(HooksConfig.parse(hooks, "test hooks"))
    return Agent(client, cfg, factory(0), Workspace(workdir), store or SessionStore(":memory:"), task=task,
                 approval=ApprovalPolicy(approval, prompt), tool_factory=factory, hooks=runner)
