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
  initializes a new one); `close` DELETEs the session. A request's stream that ends before its
  response is resumed with a GET carrying `Last-Event-ID` when the server gave its events ids
  (bounded retries with backoff). After initialize a GET opens the stream for the server's
  messages that belong to no request (`notifications/tools/list_changed`, for one), if it has one.
- `SseTransport` (the 2024-11-05 "HTTP+SSE" transport): a GET opens an SSE stream whose first
  `endpoint` event names the URL to POST messages to; all answers come on the stream."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from ..stream import iter_sse

OnMessage = Callable[[dict], Awaitable[None]]
OnClosed = Callable[[str], None]

log = logging.getLogger(__name__)

RESUME_ATTEMPTS = 5        # reconnections in a row that bring no new event before a stream is given up
RESUME_DELAY = 0.25        # seconds before the first reconnection (a server's `retry:` replaces it) ...
RESUME_MAX_DELAY = 5.0     # ... doubled after each fruitless one, up to this


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

    async def listen(self) -> None:
        """After initialize: start receiving messages that come outside any request, where the
        transport needs a step for that (Streamable HTTP's GET stream). Others already do."""

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
        self._listener: asyncio.Task | None = None
        self.resumed = 0          # request streams resumed with Last-Event-ID (for tests and logs)

    async def open(self, timeout: float) -> None:
        self.http = _http_client(self.name, self.url, min(self.connect_timeout, timeout))

    def new_session(self) -> None:
        self._stop_listening()
        super().new_session()

    async def listen(self) -> None:
        self._stop_listening()
        self._listener = asyncio.ensure_future(self._listen(self.session_id))

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    def _get_headers(self, last_event_id: str | None) -> dict:
        h = {k: v for k, v in self._headers().items() if k != "Content-Type"}
        h["Accept"] = "text/event-stream"
        if last_event_id:
            h["Last-Event-ID"] = last_event_id
        return h

    async def _listen(self, session: str | None) -> None:
        """The GET stream for the server's messages outside requests. A server without one answers
        405 and that is the end of it; one that has forgotten the session answers 404 (the next POST
        finds out and starts a new session, which listens again). A stream that drops is opened again
        (from its last event id, if it gave ids) after a pause that doubles while reconnections bring
        nothing, up to RESUME_ATTEMPTS of them in a row."""
        last_id, retry, fruitless = None, None, 0
        while not self.closed and self.session_id == session:
            opened, progressed = time.monotonic(), False
            try:
                async with self.http.stream("GET", self.url, headers=self._get_headers(last_id)) as resp:
                    if resp.status_code in (404, 405):
                        await resp.aread()
                        log.debug("MCP server %r: no GET stream (HTTP %s)", self.name, resp.status_code)
                        return
                    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                    if 200 <= resp.status_code < 300 and ctype == "text/event-stream":
                        async for event in iter_sse(resp.aiter_lines(), ids=True):
                            if event.id and event.id != last_id:
                                last_id, progressed = event.id, True
                            if event.retry is not None:
                                retry = event.retry
                            if event.event == "message" and event.data.strip():
                                progressed = True
                                for msg in _messages(event.data, self.name, "an SSE event"):
                                    await self.on_message(msg)
                    else:
                        await resp.aread()
                        log.debug("MCP server %r answered the GET stream with HTTP %s (%s)", self.name,
                                  resp.status_code, ctype or "no content type")
            except (httpx.TransportError, McpError) as e:
                log.debug("MCP server %r: GET stream lost: %s", self.name, e)
            fruitless = 0 if progressed or time.monotonic() - opened > 30 else fruitless + 1
            if fruitless >= RESUME_ATTEMPTS:
                log.warning("MCP server %r: its GET stream (messages outside requests, such as tool list changes) "
                            "could not be kept open; given up after %d tries", self.name, fruitless)
                return
            await asyncio.sleep(_backoff(retry, fruitless))

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
        last_id, retry, fruitless = None, None, 0
        stream: httpx.Response | None = resp
        while True:
            progressed, why = False, "ended the SSE stream"
            try:
                if stream is not None:
                    async for event in iter_sse(stream.aiter_lines(), ids=True):
                        if event.id and event.id != last_id:
                            last_id, progressed = event.id, True
                        if event.retry is not None:
                            retry = event.retry
                        if event.event != "message" or not event.data.strip():
                            continue  # priming events (an id, no data) and unknown event types carry no message
                        answered = False
                        for msg in _messages(event.data, self.name, "an SSE event"):
                            answered |= "method" not in msg and msg.get("id") == rid
                            await self.on_message(msg)
                        if answered:
                            return  # the answer is in; the server ends the stream, we need not wait for it
                else:
                    why = "could not be reached again"
            except httpx.TransportError as e:
                why = f"broke off the SSE stream ({type(e).__name__})"
            finally:
                if stream is not None and stream is not resp:
                    await stream.aclose()
            if not last_id:
                raise McpError(f"MCP server {self.name!r} {why} of {method} without answering it; it gave its "
                               f"events no ids, so the stream cannot be resumed and the call's outcome is unknown")
            fruitless = 0 if progressed else fruitless + 1
            if fruitless >= RESUME_ATTEMPTS:
                raise McpError(f"MCP server {self.name!r} {why} of {method} without answering it, and {fruitless} "
                               f"reconnections in a row with Last-Event-ID {last_id!r} brought nothing new")
            await asyncio.sleep(_backoff(retry, fruitless))
            stream = await self._resume(last_id, method)

    async def _resume(self, last_id: str, method: str) -> httpx.Response | None:
        """GET the rest of a request's stream after `last_id` (MCP's resumption). None when the server
        cannot be reached (the caller tries again); an error when it refuses."""
        request = self.http.build_request("GET", self.url, headers=self._get_headers(last_id))
        try:
            resp = await self.http.send(request, stream=True)
        except httpx.TransportError as e:
            log.debug("MCP server %r: resuming %s failed: %s", self.name, method, e)
            return None
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if 200 <= resp.status_code < 300 and ctype == "text/event-stream":
            self.resumed += 1
            log.info("MCP server %r: resuming the SSE stream of %s after event %r", self.name, method, last_id)
            return resp
        body = await resp.aread()
        await resp.aclose()
        if resp.status_code in (429,) or resp.status_code >= 500:
            return None
        why = {404: "it no longer knows the session", 405: "it does not offer resumption (GET)"}.get(
            resp.status_code, f"HTTP {resp.status_code}, content type {ctype or 'none'!r}: {_excerpt(body)}")
        raise McpError(f"MCP server {self.name!r} dropped the SSE stream of {method} before answering it and refused "
                       f"to resume it with Last-Event-ID {last_id!r} ({why}); the call's outcome is unknown")

    async def close(self) -> None:
        if self.http is None:
            return
        if self._listener is not None:
            task = self._listener
            self._stop_listening()
            await asyncio.gather(task, return_exceptions=True)
        if self.session_id and not self.closed:
            try:  # end the session; a server may refuse (405), which is fine
                await asyncio.wait_for(self.http.delete(self.url, headers=self._headers()), 5)
            except (httpx.HTTPError, asyncio.TimeoutError):
                pass
        self.closed = self.closed or f"MCP server {self.name!r} is closed"
        await self.http.aclose()


def _backoff(retry_ms: int | None, fruitless: int) -> float:
    """Seconds before a reconnection: the server's `retry:` or RESUME_DELAY, doubled per fruitless try."""
    base = retry_ms / 1000 if retry_ms is not None else RESUME_DELAY
    return min(base * 2 ** fruitless, max(RESUME_MAX_DELAY, base))


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
