"""Errors the server returns, in each API's own shape and status.

One exception type (``APIError``) carries a generic kind; the app renders it as Anthropic's
``{"type": "error", "error": {"type", "message"}, "request_id"}`` or OpenAI's
``{"error": {"message", "type", "param", "code"}}`` depending on which API the request spoke.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

# kind -> (HTTP status for Anthropic, Anthropic error type, HTTP status for OpenAI, OpenAI type, OpenAI code)
_KINDS = {
    "invalid_request": (400, "invalid_request_error", 400, "invalid_request_error", None),
    "authentication": (401, "authentication_error", 401, "authentication_error", "invalid_api_key"),
    "permission": (403, "permission_error", 403, "permission_error", None),
    "not_found": (404, "not_found_error", 404, "not_found_error", None),
    "method_not_allowed": (405, "invalid_request_error", 405, "invalid_request_error", None),
    "request_too_large": (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
    "rate_limit": (429, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
    "api_error": (500, "api_error", 500, "server_error", None),
    # Anthropic signals a busy server with 529; OpenAI-style servers use 503.
    "overloaded": (529, "overloaded_error", 503, "server_error", "overloaded"),
}


class APIError(Exception):
    """An error to send to the client. ``kind`` is one of the keys above; ``param`` names the field
    at fault (OpenAI shows it); ``code`` overrides the OpenAI code (e.g. ``context_length_exceeded``)."""

    def __init__(self, kind: str, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        if kind not in _KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind, self.message, self.param, self.code, self.retry_after = kind, message, param, code, retry_after


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError("invalid_request", message, param=param, code=code)


def api_of(request: Request) -> str:
    """Which API a request speaks: by path for each API's own routes, else by the Anthropic header
    (``/v1/models`` and unknown paths are shared)."""
    path = request.url.path
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/responses", "/v1/files", "/v1/batches", "/tokenize",
                        "/detokenize")):
        return "openai"
    return "anthropic" if "anthropic-version" in request.headers else "openai"


def error_body(api: str, kind: str, message: str, request_id: str | None = None, param: str | None = None,
               code: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) for an error of ``kind`` in ``api``'s shape."""
    a_status, a_type, o_status, o_type, o_code = _KINDS[kind]
    if api == "anthropic":
        body = {"type": "error", "error": {"type": a_type, "message": message}}
        if request_id:
            body["request_id"] = request_id
        return a_status, body
    return o_status, {"error": {"message": message, "type": o_type, "param": param, "code": code or o_code}}


def anthropic_stream_error(kind: str, message: str) -> dict:
    """The payload of an ``event: error`` frame sent after a stream has started."""
    return {"type": "error", "error": {"type": _KINDS[kind][1], "message": message}}


def openai_stream_error(kind: str, message: str) -> dict:
    _, _, _, o_type, o_code = _KINDS[kind]
    return {"error": {"message": message, "type": o_type, "param": None, "code": o_code}}


def error_response(request: Request, kind: str, message: str, param: str | None = None, code: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    status, body = error_body(api_of(request), kind, message, request_id, param, code)
    headers = {"retry-after": str(int(max(1, retry_after)))} if retry_after else None
    return JSONResponse(body, status_code=status, headers=headers)


def format_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable one-line message (and the first offending field) from FastAPI's validation error."""
    parts, first_param = [], None
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object (send it with Content-Type: application/json)")
            continue
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if first_param is None and where:
            first_param = where
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            parts.append(f"{where}: field required")
        else:
            parts.append(f"{where or 'body'}: {msg}")
    if not parts:
        parts = ["the request body is invalid"]
    return "; ".join(parts), first_param
