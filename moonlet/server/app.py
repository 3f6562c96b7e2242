"""The FastAPI app: routes of both APIs, auth, request ids, body limits, errors, health, metrics.

``create_app(engine, ...)`` takes a started-or-not ``moonlet.engine.AsyncLLM`` (anything with its
interface) and returns an ASGI app; ``moonlet serve`` runs it under uvicorn.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, PlainTextResponse, Response

from . import anthropic as anthropic_api
from . import batches as batches_api
from . import openai as openai_api
from . import openai_batches, openai_completions
from . import responses as responses_api
from . import tokenize as tokenize_api
from .errors import APIError, api_of, error_body, error_response, format_validation_error
from .files import FileStore
from .generation import supports_images
from .metrics import CONTENT_TYPE, BatchCollector, ServerMetrics
from .state import ServerState, state_of

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
_GENERATION_PATHS = ("/v1/messages", "/v1/chat/completions", "/v1/completions", "/v1/responses")
_OPEN_PATHS = ("/health", "/metrics")


class BodyTooLarge(Exception):
    pass


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body): a PEFT adapter directory on the server's disk."""
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""
    lora_name: str


class RequestContext:
    """Pure ASGI middleware (it must not buffer streams): gives each request an id (``request-id``
    and ``x-request-id`` headers), checks the API key, limits body size and concurrent generations."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, max_concurrent: int | None):
        self.app, self.api_key, self.max_body_bytes, self.max_concurrent = app, api_key, max_body_bytes, max_concurrent
        self.in_flight = 0

    async def _reject(self, scope, send, request_id: str, status_kind: str, message: str, headers=None):
        status, body = error_body(api_of(Request(scope)), status_kind, message, request_id)
        response = JSONResponse(body, status_code=status, headers=headers)
        response.headers["request-id"] = response.headers["x-request-id"] = request_id
        await response(scope, None, send)

    def _authorized(self, scope) -> bool:
        if not self.api_key:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        key = headers.get("x-api-key")
        if key is None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        return key is not None and secrets.compare_digest(key.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        if path not in _OPEN_PATHS and not self._authorized(scope):
            return await self._reject(scope, send, request_id, "authentication",
                                      "invalid x-api-key: send the server's API key in the x-api-key header or "
                                      "as 'Authorization: Bearer <key>'")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._reject(scope, send, request_id, "request_too_large",
                                      f"request body of {int(length)} bytes exceeds this server's limit of "
                                      f"{self.max_body_bytes} bytes")
        generation = scope.get("method") == "POST" and path in _GENERATION_PATHS
        if generation and self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return await self._reject(scope, send, request_id, "rate_limit",
                                      f"too many concurrent requests ({self.in_flight}, limit "
                                      f"{self.max_concurrent}); retry shortly", headers={"retry-after": "1"})

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(received)
            return message

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"request-id", request_id.encode()),
                                                                 (b"x-request-id", request_id.encode())]
            await send(message)

        if generation:
            self.in_flight += 1
        try:
            await self.app(scope, counted_receive, send_with_id)
        finally:
            if generation:
                self.in_flight -= 1


def _model_card(state: ServerState, api: str, name: str | None = None) -> dict:
    """The card of the served model, or (``name`` an adapter's) of a LoRA adapter over it: OpenAI's with
    vLLM's ``parent`` (the base model id) and ``root`` (the adapter's directory)."""
    base = state.served_model_name
    name = name or base
    # vision: whether image input is accepted (an extension field; moonlet's agent reads it)
    vision = supports_images(state.engine)
    if api == "anthropic":
        created = datetime.fromtimestamp(state.created, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        # max_input_tokens / max_tokens: the context window, so clients can size their conversations
        card = {"id": name, "type": "model", "display_name": name, "created_at": created,
                "max_input_tokens": state.max_model_len, "max_tokens": state.max_model_len, "vision": vision}
    else:
        card = {"id": name, "object": "model", "created": int(state.created), "owned_by": "moonlet",
                "max_model_len": state.max_model_len, "vision": vision}
    if name != base:  # a LoRA adapter
        card.update(parent=base, root=state.loras().get(name))
    return card


def create_app(engine, served_model_name: str | None = None, api_key: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrent_requests: int | None = None,
               shutdown_engine_on_exit: bool = False, batch_dir: str | None = None,
               batch_concurrency: int = 8, batch_retention_days: float = 29.0,
               allow_runtime_lora: bool = False) -> FastAPI:
    """The server app for ``engine`` (an AsyncLLM). ``served_model_name`` is what /v1/models lists
    (default: the engine's model name); generation requests naming any model are served by this one.
    ``api_key``: when set, every /v1 request must carry it. ``max_concurrent_requests``: generation
    requests beyond it get 429. The engine is started with the app and, if
    ``shutdown_engine_on_exit``, shut down with it. Message batches (``batches.py``) and OpenAI
    batches (``openai_batches.py``) are kept in ``batch_dir`` (None: in memory only), the OpenAI
    Files API's files in ``batch_dir/files``; together they run ``batch_concurrency`` requests at a time.
    An ended batch's requests and results are deleted ``batch_retention_days`` after its creation.
    An engine serving LoRA adapters (multi-LoRA) lists them in /v1/models and requests select one by its
    name in ``model``; ``allow_runtime_lora`` adds POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    if getattr(engine, "tokenizer", None) is None:
        raise ValueError("the engine has no tokenizer; the server renders chat messages and needs one "
                         "(use a checkpoint directory that ships tiktoken.model)")
    name = served_model_name or getattr(engine, "model_name", None) or "moonlet"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(engine, "start", None)
        if start is not None:
            start()
        await app.state.batches.start()  # unfinished batches of an earlier run go on
        try:
            yield
        finally:
            try:
                background = getattr(app.state, "background_responses", None)
                if background is not None:  # background Responses still running end as cancelled
                    await background.close()
                await app.state.batches.stop()
            finally:
                if shutdown_engine_on_exit and getattr(engine, "shutdown", None) is not None:
                    engine.shutdown()

    app = FastAPI(title="moonlet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.moonlet = ServerState(engine=engine, served_model_name=name, metrics=ServerMetrics(engine),
                                    api_key=api_key, allow_runtime_lora=allow_runtime_lora)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.kind, exc.message, exc.param, exc.code, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = format_validation_error(exc)
        return error_response(request, "invalid_request", message, param)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return error_response(request, "request_too_large", f"request body exceeds this server's limit of "
                                                            f"{max_body_bytes} bytes")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit"}
        kind = kinds.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "api_error")
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        return error_response(request, kind, str(message))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, "api_error", f"internal server error ({type(exc).__name__}); the "
                                                    f"request id is {getattr(request.state, 'request_id', '?')}")

    @app.get("/health")
    async def health(request: Request):
        stats = state_of(request).engine.stats() or {}
        if stats.get("engine_alive", True) is False:
            return JSONResponse({"status": "error", "detail": "the engine loop is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request, after_id: str | None = None, before_id: str | None = None,
                          limit: int = Query(20, ge=1, le=1000)):
        st, api = state_of(request), api_of(request)
        ids = [st.served_model_name, *sorted(st.loras())]  # the base model, then its LoRA adapters
        lo, hi = 0, len(ids)
        for cursor, which in ((after_id, "after_id"), (before_id, "before_id")):
            if cursor is not None and cursor not in ids:
                raise APIError("invalid_request", f"{which}={cursor!r} is not a model id here; this server lists "
                                                  f"{', '.join(ids)}", param=which)
        if after_id is not None:
            lo = ids.index(after_id) + 1
        if before_id is not None:
            hi = ids.index(before_id)
            lo = max(lo, hi - limit)
        page = ids[lo:hi][:limit]
        has_more = lo + len(page) < hi if before_id is None else lo > 0
        data = [_model_card(st, api, model_id) for model_id in page]
        if api == "anthropic":
            return {"data": data, "has_more": has_more, "first_id": page[0] if page else None,
                    "last_id": page[-1] if page else None}
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        st = state_of(request)
        if model_id != st.served_model_name and model_id not in st.loras():
            names = ", ".join(repr(n) for n in [st.served_model_name, *sorted(st.loras())])
            raise APIError("not_found", f"model {model_id!r} not found; this server serves {names}", param="model")
        return _model_card(st, api_of(request), model_id)

    if allow_runtime_lora:  # vLLM's runtime adapter routes (it gates them behind an environment variable)
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoraRequest, request: Request):
            st = state_of(request)
            if not st.lora_enabled:
                raise APIError("invalid_request", "this server serves no LoRA adapters: start it with --enable-lora "
                                                  "(or --lora-modules) to load adapters at run time")
            if body.lora_name == st.served_model_name:
                raise APIError("invalid_request", f"lora_name {body.lora_name!r} is the base model's name; choose "
                                                  "another", param="lora_name")
            try:
                await st.engine.add_lora(body.lora_name, body.lora_path)
            except ValueError as e:
                raise APIError("invalid_request", str(e), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
            st = state_of(request)
            if body.lora_name not in st.loras():
                raise APIError("not_found", f"LoRA adapter {body.lora_name!r} is not loaded; loaded: "
                                            f"{', '.join(sorted(st.loras())) or 'none'}", param="lora_name")
            try:
                await st.engine.remove_lora(body.lora_name)
            except ValueError as e:
                raise APIError("invalid_request", str(e), param="lora_name") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(batches_api.router)
    app.include_router(openai_batches.router)
    app.include_router(anthropic_api.router)
    app.include_router(openai_api.router)
    app.include_router(openai_completions.router)
    app.include_router(responses_api.router)
    app.include_router(tokenize_api.router)
    app.add_middleware(RequestContext, api_key=api_key, max_body_bytes=max_body_bytes,
                       max_concurrent=max_concurrent_requests)
    app.state.files = FileStore(None if batch_dir is None else os.path.join(batch_dir, "files"))
    app.state.batches = batches_api.BatchManager(app, batch_dir, batch_concurrency, api_key, files=app.state.files,
                                                 retention_s=batch_retention_days * 86400)
    app.state.moonlet.metrics.registry.register(BatchCollector(app.state.batches))
    return app
