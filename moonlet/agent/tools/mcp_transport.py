"""How MCP's JSON-RPC messages travel between moonlet's client (`mcp.McpClient`) and one server.

Three transports, one interface: `open`, `send(message)`, `close`. Every message that arrives from
the server — responses, the server's own requests, notifications — goes to the client's
`on_message` callback, whatever carried it; the client matches responses to its requests and answers
the server's requests, so that logic exists once (mcp.py).

- `StdioTransport`: the server is a child process; one JSON message per line on its stdin/stdout.
- `StreamableHttpTransport` (MCP 2025-06-18 "Streamable HTTP"): each message is a POST to one
  endpoint with `Accept: application/json, text/event-stream`. A request is answered with a JSON
  body or with an SSE stream that carries the server's own notifications/requests for that request
  before the response; notifications and responses get 202. The `Mcp-Session-Id` the server gives
  with the initialize answer goes with every later POST, `MCP-Protocol-Version` too; a 404 to a
  POST that carried a session id means the session is gone (`SessionExpired`: the client
  initializes a new one); `close` DELETEs the session.
- `SseTransport` (the 2024-11-05 "HTTP+SSE" transport): a GET opens an SSE stream whose first
  `endpoint` event names the URL to POST messages to; all answers come on the stream."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from ..stream import iter_sse

OnMessage = Callable[[dict], Awaitable[None]]
OnClosed = Callable[[str], None]


class McpError(Exception):
    """A failure talking to an MCP server; the message names the server and what to do."""


class SessionExpired(McpError):
    """The server no longer knows the session (HTTP 404 to a POST that carried its id)."""

    def __init__(self, message: str, session_id: str):
        super().__init__(message)
        self.session_id = session_id


def _excerpt(body: bytes | str, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "") if text else "(empty body)"


def _messages(raw: str | bytes, server: str, where: str) -> list[dict]:
    """The JSON-RPC message(s) in one body or SSE event: an object, or a batch (a list of them)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise McpError(f"MCP server {server!r} sent {where} that is not JSON: {_excerpt(raw)}") from None
    items = data if isinstance(data, list) else [data]
    return [m for m in items if isinstance(m, dict)]


class Transport:
    """Base: `name` is the server's name (for messages); `on_message` gets every incoming message;
    `on_closed(reason)` is called once if the connection ends by itself (a process exit, a dropped
    stream), so the client can fail the calls still waiting. `closed` holds that reason."""

    def __init__(self, name: str, on_message: OnMessage, on_closed: OnClosed):
        self.name = name
        self.on_message = on_message
        self.on_closed = on_closed
        self.closed: str | None = None
        self.protocol_version: str | None = None   # set by the client after initialize
        self.session_id: str | None = None          # Streamable HTTP only

    async def open(self, timeout: float) -> None:
        raise NotImplementedError

    async def send(self, message: dict) -> None:
        raise NotImplementedError

    def new_session(self) -> None:
        """Forget the current session before the client initializes a new one."""
        self.session_id = None
        self.protocol_version = None

    async def close(self) -> None:
        raise NotImplementedError

    def _closed(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self.on_closed(reason)


class StdioTransport(Transport):
    def __init__(self, name: str, command: list[str], env: dict, cwd: str | None,
                 on_message: OnMessage, on_closed: OnClosed):
        super().__init__(name, on_message, on_closed)
        self.command, self.env, self.cwd = command, env, cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: list[str] = []
        self._reader: asyncio.Task | None = None
        self._err_reader: asyncio.Task | None = None

    async def open(self, timeout: float) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, **self.env}, cwd=self.cwd,
                limit=64 * 1024 * 1024)
        except OSError as e:
            raise McpError(f"MCP server {self.name!r}: cannot start {self.command!r}: {e}") from e
        self._reader = asyncio.ensure_future(self._read())
        self._err_reader = asyncio.ensure_future(self._read_stderr())

    async def send(self, message: dict) -> None:
        if self.proc is None or self.proc.stdin.is_closing():
            raise McpError(f"MCP server {self.name!r} is not running")
        try:
            self.proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise McpError(f"MCP server {self.name!r} has exited ({e})") from None

    async def _read(self) -> None:
        try:
            while line := await self.proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a server printing logs to stdout: not protocol, skip it
                if isinstance(msg, dict):
                    await self.on_message(msg)
        finally:
            if self._err_reader is not None:  # let the dying server's last stderr lines arrive
                await asyncio.wait([self._err_reader], timeout=1)
            tail = "\n".join(self.stderr_tail[-5:])
            self._closed(f"MCP server {self.name!r} exited" + (f"; its stderr:\n{tail}" if tail else ""))

    async def _read_stderr(self) -> None:
        while line := await self.proc.stderr.readline():
            self.stderr_tail = (self.stderr_tail + [line.decode("utf-8", "replace").rstrip()])[-50:]

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 2)
            except (asyncio.TimeoutError, ProcessLookupError, BrokenPipeError, ConnectionResetError):
                self.proc.kill()
                await self.proc.wait()
        for task in (self._reader, self._err_reader):
            if task is not None:
                task.cancel()


def _origin(url) -> tuple[str, str]:
    parts = urlsplit(str(url))
    return parts.scheme.lower(), parts.netloc.lower()


def shown_url(url: str) -> str:
    """A URL for messages (which reach the model and the session log): a query string may hold a key."""
    parts = urlsplit(url)
    return parts._replace(query="…" if parts.query else "", fragment="").geturl()


def _http_client(name: str, url: str, connect_timeout: float) -> httpx.AsyncClient:
    """Redirects are followed on the server's own origin only (a Streamable HTTP server mounted at
    /mcp/ may redirect /mcp there): the configured headers carry credentials and must not travel to
    another host. No read timeout of its own: a tool may run for minutes with its SSE stream quiet;
    the client's per-request timeout (asyncio.wait_for around the whole exchange) bounds every wait."""
    async def same_origin(request: httpx.Request) -> None:
        if _origin(request.url) != _origin(url):
            raise McpError(f"MCP server {name!r} redirected to another origin ({shown_url(str(request.url))}); "
                           f"not followed, so its headers are not sent there — put that URL in the config "
                           f"if it is right")
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=connect_timeout), follow_redirects=True,
                             event_hooks={"request": [same_origin]})


def _unreachable(name: str, url: str, e: Exception) -> McpError:
    what = type(e).__name__ + (f": {e}" if str(e) else "")
    return McpError(f"MCP server {name!r}: cannot reach {shown_url(url)} ({what}); check that the server is "
                    f"running and the URL is right")


def _status_error(name: str, url: str, status: int, body: bytes, method: str) -> McpError:
    hint = {401: "; the server wants credentials: set them in the server's \"headers\" in mcp.json "
                 "(e.g. \"Authorization\": \"Bearer ${TOKEN}\")",
            403: "; the credentials in the server's \"headers\" are not allowed to do this",
            404: "; check the URL (Streamable HTTP servers usually serve at /mcp; an HTTP+SSE server "
                 "needs \"type\": \"sse\")",
            405: "; this URL does not take MCP POSTs: check the URL, or \"type\": \"sse\" for an HTTP+SSE server"}
    return McpError(f"MCP server {name!r} answered {method} with HTTP {status} from {shown_url(url)}: {_excerpt(body)}"
                    f"{hint.get(status, '')}")


class StreamableHttpTransport(Transport):
    def __init__(self, name: str, url: str, headers: dict, on_message: OnMessage, on_closed: OnClosed,
                 connect_timeout: float = 10.0):
        super().__init__(name, on_message, on_closed)
        self.url, self.headers, self.connect_timeout = url, dict(headers), connect_timeout
        self.http: httpx.AsyncClient | None = None

    async def open(self, timeout: float) -> None:
        self.http = _http_client(self.name, self.url, min(self.connect_timeout, timeout))

    def _headers(self) -> dict:
        h = {**self.headers, "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self.session_id:
            h["Mcp-Session-Id"] = self.session_id
        if self.protocol_version:
            h["MCP-Protocol-Version"] = self.protocol_version
        return h

    async def send(self, message: dict) -> None:
        if self.http is None or self.closed:
            raise McpError(self.closed or f"MCP server {self.name!r} is not connected")
        method = message.get("method") or "a response"
        is_request = "method" in message and "id" in message
        sent_session = self.session_id
        try:
            async with self.http.stream("POST", self.url, json=message, headers=self._headers()) as resp:
                if resp.status_code == 404 and sent_session:
                    await resp.aread()
                    raise SessionExpired(f"MCP server {self.name!r} no longer knows session {sent_session}",
                                         sent_session)
                if not 200 <= resp.status_code < 300:
                    raise _status_error(self.name, str(resp.url), resp.status_code, await resp.aread(), method)
                if not is_request:
                    await resp.aread()  # 202 Accepted for notifications and our answers to the server
                    return
                if method == "initialize":
                    self.session_id = resp.headers.get("mcp-session-id") or None
                await self._read_answer(resp, message["id"], method)
        except httpx.TransportError as e:
            raise _unreachable(self.name, self.url, e) from None

    async def _read_answer(self, resp: httpx.Response, rid, method: str) -> None:
        """Hand every message of a request's answer to the client: a JSON body, or the SSE stream up
        to the response to `rid` (the server's notifications and requests may come before it)."""
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            answered = False
            for msg in _messages(await resp.aread(), self.name, f"a {method} answer"):
                answered |= "method" not in msg and msg.get("id") == rid
                await self.on_message(msg)
            if answered:
                return
            raise McpError(f"MCP server {self.name!r} answered {method} with a JSON body that holds no response "
                           f"to it")
        if ctype != "text/event-stream":
            body = await resp.aread()
            raise McpError(f"MCP server {self.name!r} answered {method} with HTTP {resp.status_code} and content "
                           f"type {ctype or 'none'!r}, not application/json or text/event-stream: {_excerpt(body)}; "
                           f"is {shown_url(self.url)} an MCP endpoint?")
        async for event in iter_sse(resp.aiter_lines()):
            if event.event != "message" or not event.data.strip():
                continue  # priming events (an id, no data) and unknown event types carry no message
            answered = False
            for msg in _messages(event.data, self.name, "an SSE event"):
                answered |= "method" not in msg and msg.get("id") == rid
                await self.on_message(msg)
            if answered:
                return  # the answer is in; the server ends the stream, we need not wait for it
        raise McpError(f"MCP server {self.name!r} ended the SSE stream of {method} without answering it")

    async def close(self) -> None:
        if self.http is None:
            return
        if self.session_id and not self.closed:
            try:  # end the session; a server may refuse (405), which is fine
                await asyncio.wait_for(self.http.delete(self.url, headers=self._headers()), 5)
            except (httpx.HTTPError, asyncio.TimeoutError):
                pass
        self.closed = self.closed or f"MCP server {self.name!r} is closed"
        await self.http.aclose()


class SseTransport(Transport):
    def __init__(self, name: str, url: str, headers: dict, on_message: OnMessage, on_closed: OnClosed,
                 connect_timeout: float = 10.0):
        super().__init__(name, on_message, on_closed)
        self.url, self.headers, self.connect_timeout = url, dict(headers), connect_timeout
        self.http: httpx.AsyncClient | None = None
        self.post_url: str | None = None
        self._reader: asyncio.Task | None = None

    async def open(self, timeout: float) -> None:
        self.http = _http_client(self.name, self.url, min(self.connect_timeout, timeout))
        endpoint = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read(endpoint))
        try:
            self.post_url = await asyncio.wait_for(asyncio.shield(endpoint), timeout)
        except asyncio.TimeoutError:
            raise McpError(f"MCP server {self.name!r}: {shown_url(self.url)} sent no `endpoint` event within "
                           f"{timeout:g}s; is it an HTTP+SSE server (a Streamable HTTP server needs \"type\": "
                           f"\"http\")?") from None

    async def _read(self, endpoint: asyncio.Future) -> None:
        reason = f"MCP server {self.name!r} closed its SSE stream ({shown_url(self.url)})"
        try:
            headers = {**self.headers, "Accept": "text/event-stream"}
            async with self.http.stream("GET", self.url, headers=headers) as resp:
                if not 200 <= resp.status_code < 300:
                    raise _status_error(self.name, self.url, resp.status_code, await resp.aread(), "GET")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "text/event-stream":
                    raise McpError(f"MCP server {self.name!r}: {shown_url(self.url)} answered with content type "
                                   f"{ctype or 'none'!r}, not text/event-stream: {_excerpt(await resp.aread())}; "
                                   f"a Streamable HTTP server needs \"type\": \"http\"")
                async for event in iter_sse(resp.aiter_lines()):
                    if event.event == "endpoint":
                        if not endpoint.done():
                            endpoint.set_result(self._endpoint_url(event.data.strip()))
                    elif event.event == "message" and event.data.strip():
                        for msg in _messages(event.data, self.name, "an SSE event"):
                            await self.on_message(msg)
        except McpError as e:
            reason = str(e)
        except httpx.TransportError as e:
            reason = str(_unreachable(self.name, self.url, e))
        finally:
            if not endpoint.done():
                endpoint.set_exception(McpError(reason))
            self._closed(reason)

    def _endpoint_url(self, data: str) -> str:
        """The POST URL the `endpoint` event names, resolved against the stream's URL. It must stay on
        the stream's origin: the configured headers (credentials) go with every POST."""
        url = urljoin(self.url, data)
        if _origin(url) != _origin(self.url):
            raise McpError(f"MCP server {self.name!r} named a message endpoint on another origin ({shown_url(url)}); "
                           f"refused, so its headers are not sent elsewhere")
        return url

    async def send(self, message: dict) -> None:
        if self.closed:
            raise McpError(self.closed)
        method = message.get("method") or "a response"
        try:
            resp = await self.http.post(self.post_url, json=message, headers={**self.headers,
                                                                               "Content-Type": "application/json"})
        except httpx.TransportError as e:
            raise _unreachable(self.name, self.post_url, e) from None
        if not 200 <= resp.status_code < 300:
            raise _status_error(self.name, self.post_url, resp.status_code, resp.content, method)

    async def close(self) -> None:
        self.closed = self.closed or f"MCP server {self.name!r} is closed"
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
