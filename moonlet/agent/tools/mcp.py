"""MCP servers as tool providers, over stdio or HTTP. Speaks JSON-RPC 2.0: `initialize` (then the
`notifications/initialized` notification), `tools/list` (following `nextCursor`), `tools/call`; answers
the server's `ping` and `roots/list` (the agent's work directory, when the client was given roots) and
declines its other requests; re-reads `tools/list` when the server sends
`notifications/tools/list_changed`; hands log and progress notifications to the `logging` module and
keeps them for the agent's session events. How the messages travel — a child process's
stdin/stdout, Streamable HTTP, or the legacy HTTP+SSE transport — is `mcp_transport`'s business;
everything here is the same for all three. Each server tool becomes an agent tool named
`mcp__SERVER__TOOL`; tools whose annotations say `readOnlyHint: true` count as reads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import itertools
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..images import image_content, sniff
from .base import Tool, ToolContext, ToolError, ToolResult
from .mcp_transport import (McpError, SessionExpired, SseTransport, StdioTransport, StreamableHttpTransport,
                            Transport, shown_url)

__all__ = ["McpClient", "McpError", "McpServerConfig", "McpTool", "load_mcp_config", "start_mcp_servers"]

PROTOCOL_VERSION = "2025-06-18"
DEFAULT_TIMEOUT = 120.0          # seconds one request may take (tool calls included)
DEFAULT_STARTUP_TIMEOUT = 60.0   # seconds to start or connect, initialize and list the tools
MAX_NOTICES = 200                # log/progress notifications kept per server until the agent records them

log = logging.getLogger(__name__)
# MCP's syslog levels (notifications/message) mapped to Python's
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL, "alert": logging.CRITICAL,
           "emergency": logging.CRITICAL}

# the "type" values mcp.json files use, mapped to the transport each means
_TYPES = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamable_http": "http",
          "streamablehttp": "http", "sse": "sse"}


@dataclass
class McpServerConfig:
    """One MCP server: `command` (+ `env`, `cwd`) for stdio; `url` + `headers` for "http" (Streamable
    HTTP) and "sse" (HTTP+SSE). Timeouts in seconds; None: $MCP_TOOL_TIMEOUT / $MCP_TIMEOUT (in
    milliseconds, as Claude Code reads them), else 120 s per request and 60 s to start."""
    name: str
    command: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    type: str = "stdio"
    url: str | None = None
    headers: dict = field(default_factory=dict)
    timeout: float | None = None
    startup_timeout: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "McpServerConfig":
        """`NAME=COMMAND LINE` (stdio) or `NAME=URL` (an http:// or https:// URL: Streamable HTTP) as
        given to --mcp."""
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or not command.strip():
            raise ValueError(f"--mcp {spec!r}: expected NAME=COMMAND or NAME=URL, e.g. files=\"npx server-files .\" "
                             f"or docs=https://example.com/mcp")
        if re.match(r"(?i)https?://\S+$", command.strip()):
            return cls(name.strip(), type="http", url=command.strip())
        return cls(name.strip(), shlex.split(command))

    def where(self) -> str:
        """The server's address for messages: its URL or its command line."""
        return shown_url(self.url) if self.type != "stdio" else shlex.join(self.command)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def expand_env(value: str, where: str) -> str:
    """`${VAR}` and `${VAR:-default}` in a config string, as Claude Code expands them in mcp.json; an
    unset variable without a default is an error naming it."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        if name in os.environ:
            return ""
        raise ValueError(f"{where}: ${{{name}}} is not set; export {name} or write ${{{name}:-DEFAULT}}")
    return _VAR.sub(sub, value)


def _timeout(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _server_config(name: str, spec, where: str) -> McpServerConfig:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind is None:
        kind = "http" if spec.get("url") and not spec.get("command") else "stdio"
    elif not isinstance(kind, str) or kind.lower() not in _TYPES:
        raise ValueError(f"{where}.type: {kind!r} is not a transport moonlet speaks; use \"stdio\", \"http\" "
                         f"(Streamable HTTP) or \"sse\" (HTTP+SSE)")
    kind = _TYPES[kind.lower()]
    timeouts = dict(timeout=_timeout(spec.get("timeout"), f"{where}.timeout"),
                    startup_timeout=_timeout(spec.get("startupTimeout"), f"{where}.startupTimeout"))
    if kind == "stdio":
        if not spec.get("command") or not isinstance(spec["command"], str):
            raise ValueError(f"{where}: a stdio server needs a \"command\" (or give a \"url\" and \"type\": "
                             f"\"http\" for a remote server)")
        args = spec.get("args") or []
        env = spec.get("env") or {}
        if not isinstance(args, list) or not isinstance(env, dict):
            raise ValueError(f"{where}: \"args\" must be a list and \"env\" an object")
        command = [expand_env(str(c), f"{where}.command") for c in [spec["command"], *args]]
        env = {str(k): expand_env(str(v), f"{where}.env.{k}") for k, v in env.items()}
        cwd = expand_env(str(spec["cwd"]), f"{where}.cwd") if spec.get("cwd") else None
        return McpServerConfig(name, command, env, cwd, **timeouts)
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: a {kind!r} server needs a \"url\"")
    url = expand_env(url, f"{where}.url")
    if not re.match(r"(?i)https?://[^/\s]", url):
        raise ValueError(f"{where}.url: {url!r} is not an http:// or https:// URL")
    headers = spec.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError(f"{where}.headers: expected an object of header names to values")
    headers = {str(k): expand_env(str(v), f"{where}.headers.{k}") for k, v in headers.items()}
    return McpServerConfig(name, type=kind, url=url, headers=headers, **timeouts)


def load_mcp_config(path: str) -> list[McpServerConfig]:
    """The usual `{"mcpServers": {NAME: {...}}}` file: stdio servers `{"command", "args", "env", "cwd"}`,
    remote ones `{"type": "http" | "sse", "url", "headers"}`; `${VAR}` / `${VAR:-default}` in any of
    these strings is replaced from the environment. `timeout` / `startupTimeout` (seconds) are
    moonlet's own optional keys."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"{path}: expected an object with an \"mcpServers\" object")
    return [_server_config(name, spec, f"{path}: mcpServers.{name}") for name, spec in servers.items()]


def _env_seconds(name: str) -> float | None:
    """Claude Code's timeout variables hold milliseconds."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = float(raw) / 1000
    except ValueError:
        raise ValueError(f"${name}={raw!r}: expected milliseconds, e.g. {name}=30000") from None
    if value <= 0:
        raise ValueError(f"${name}={raw!r}: expected a positive number of milliseconds")
    return value


def root_uri(path: str | os.PathLike) -> dict:
    """An MCP root for a directory: its absolute `file://` URI (percent-encoded) and its name."""
    real = Path(os.path.realpath(path))
    return {"uri": real.as_uri(), "name": real.name or str(real)}


class McpClient:
    """One server's session: the handshake, requests matched to responses by id, the server's own
    requests answered, and — over Streamable HTTP — a new session when the server has dropped ours.

    It is also a tool source for `ToolRegistry`: `tools` holds the server's tools as agent tools and
    `tools_version` goes up each time a `notifications/tools/list_changed` made it read a different
    list; `settle()` waits for a re-read in progress. `roots`, when given (directories), are declared
    as the `roots` capability (no `listChanged`: they do not change during a session) and are the
    answer to the server's `roots/list`; None declines roots/list as "method not found"."""

    def __init__(self, config: McpServerConfig, timeout: float | None = None, startup_timeout: float | None = None,
                 roots: list[str] | None = None):
        self.config = config
        self.roots = [str(r) for r in roots] if roots is not None else None
        self.tools: list[McpTool] = []
        self.tools_version = 0
        self.tools_error: str | None = None      # why the last re-read failed (the old list stays)
        self.notices: collections.deque[dict] = collections.deque(maxlen=MAX_NOTICES)
        self._relist: asyncio.Task | None = None
        self._relist_again = False
        self.timeout = timeout or config.timeout or _env_seconds("MCP_TOOL_TIMEOUT") or DEFAULT_TIMEOUT
        self.startup_timeout = (startup_timeout or config.startup_timeout or _env_seconds("MCP_TIMEOUT")
                                or DEFAULT_STARTUP_TIMEOUT)
        self.server_info: dict = {}
        self.protocol_version: str | None = None
        self.sessions = 0                   # handshakes done (more than one: the server dropped a session)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._renewing = asyncio.Lock()
        self.transport: Transport = self._make_transport()

    def _make_transport(self) -> Transport:
        c = self.config
        if c.type == "stdio":
            return StdioTransport(c.name, c.command, c.env, c.cwd, self._on_message, self._on_closed)
        if c.type == "http":
            return StreamableHttpTransport(c.name, c.url, c.headers, self._on_message, self._on_closed)
        if c.type == "sse":
            return SseTransport(c.name, c.url, c.headers, self._on_message, self._on_closed)
        raise ValueError(f"MCP server {c.name!r}: unknown transport {c.type!r} (stdio, http or sse)")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def source_label(self) -> str:
        return f"MCP server {self.name!r}"

    @property
    def stderr_tail(self) -> list[str]:
        return getattr(self.transport, "stderr_tail", [])

    async def start(self) -> None:
        """Start or connect, and initialize; bounded by the startup timeout, so a server that never
        answers cannot hang the agent."""
        try:
            await asyncio.wait_for(self._start(), self.startup_timeout)
        except asyncio.TimeoutError:
            raise McpError(f"MCP server {self.name!r} ({self.config.where()}) did not start and answer initialize "
                           f"within {self.startup_timeout:g}s; check that it is an MCP server of type "
                           f"{self.config.type!r}, or allow more time with \"startupTimeout\" in mcp.json or "
                           f"MCP_TIMEOUT (milliseconds)") from None

    async def _start(self) -> None:
        await self.transport.open(self.startup_timeout)
        await self._handshake()

    async def _handshake(self) -> None:
        # the roots capability only when there are roots to give; tools/list_changed needs no client
        # capability (the server declares `tools.listChanged`; the client just listens)
        capabilities = {"roots": {"listChanged": False}} if self.roots is not None else {}
        result = await self._request_once("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": capabilities,
            "clientInfo": {"name": "moonlet-agent", "version": "0.1.0"}})
        self.server_info = result.get("serverInfo", {})
        self.protocol_version = str(result.get("protocolVersion") or PROTOCOL_VERSION)
        self.transport.protocol_version = self.protocol_version
        self.sessions += 1
        await self.transport.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await self.transport.listen()  # Streamable HTTP: the GET stream for messages outside requests

    async def _on_message(self, msg: dict) -> None:
        """Every message from the server, whichever transport brought it."""
        if "method" in msg and "id" in msg:  # a request from the server
            reply = {"jsonrpc": "2.0", "id": msg["id"]}
            if msg["method"] == "ping":
                reply["result"] = {}
            elif msg["method"] == "roots/list" and self.roots is not None:
                reply["result"] = {"roots": [root_uri(r) for r in self.roots]}
            else:
                reply["error"] = {"code": -32601, "message": f"method {msg['method']} not supported"}
            try:
                await self.transport.send(reply)
            except McpError:
                pass  # the server is gone or dropped the session; the waiting call reports that
        elif "id" in msg and "method" not in msg:
            fut = self._pending.pop(msg["id"], None)
            if fut is None or fut.done():
                return
            if "error" in msg:
                err = msg["error"] or {}
                fut.set_exception(McpError(f"MCP server {self.name!r}: {err.get('message')} (code {err.get('code')})"))
            else:
                fut.set_result(msg.get("result") or {})
        elif "method" in msg:
            self._on_notification(msg["method"], msg.get("params") or {})

    def _on_notification(self, method: str, params: dict) -> None:
        """A notification from the server: a changed tool list is read again (in a task of its own:
        the answer comes through the very reader that is calling this); log messages and progress go
        to the `logging` module and wait in `notices` for the agent to record them."""
        if method == "notifications/tools/list_changed":
            self.tools_changed()
        elif method == "notifications/message":
            level = str(params.get("level") or "info")
            data = params.get("data")
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            log.log(_LEVELS.get(level, logging.INFO), "MCP server %r%s: %s", self.name,
                    f" ({params['logger']})" if params.get("logger") else "", text[:2000])
            if len(text) > 4000:  # a chatty server must not fill the session's events
                data = text[:4000] + f"… [{len(text) - 4000} more characters]"
            self.notices.append({"server": self.name, "kind": "log", "level": level,
                                 "logger": params.get("logger"), "data": data})
        elif method == "notifications/progress":
            log.debug("MCP server %r progress %s/%s %s", self.name, params.get("progress"), params.get("total"),
                      params.get("message") or "")
            self.notices.append({"server": self.name, "kind": "progress",
                                 **{k: params.get(k) for k in ("progressToken", "progress", "total", "message")}})
        # other notifications (resources, prompts, cancelled) concern features moonlet does not use

    def drain_notices(self) -> list[dict]:
        """The log and progress notifications received since the last call (for the session events)."""
        out = list(self.notices)
        self.notices.clear()
        return out

    def tools_changed(self) -> None:
        """Read the tool list again soon; a change announced while a re-read is under way gets one
        more (that re-read's answer may predate it)."""
        if self._relist is not None and not self._relist.done():
            self._relist_again = True
            return
        self._relist = asyncio.ensure_future(self._relist_loop())

    async def _relist_loop(self) -> None:
        while True:
            self._relist_again = False
            try:
                await self.refresh_tools()
                self.tools_error = None
            except McpError as e:  # keep the old list; the next notification tries again
                self.tools_error = str(e)
                log.warning("MCP server %r announced a new tool list but reading it failed: %s", self.name, e)
            if not self._relist_again or self.transport.closed:
                return

    async def settle(self) -> None:
        """Wait until a tool list re-read under way is done (shielded: a cancelled step does not stop
        it; it has its own request timeout)."""
        if self._relist is not None and not self._relist.done():
            await asyncio.shield(self._relist)

    async def refresh_tools(self) -> list["McpTool"]:
        """Read the server's tools; `tools_version` goes up when they differ from the last list."""
        specs = await self.list_tools()
        tools = [McpTool(self, spec) for spec in specs if isinstance(spec, dict) and spec.get("name")]
        if [t.spec() for t in tools] != [t.spec() for t in self.tools] or \
                [t.read_only for t in tools] != [t.read_only for t in self.tools]:
            self.tools = tools
            self.tools_version += 1
        return self.tools

    def _on_closed(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(McpError(reason))
        self._pending.clear()

    async def _request_once(self, method: str, params: dict | None) -> dict:
        if self._renewing.locked() and method != "initialize":
            async with self._renewing:  # a new session is being set up: wait for its id
                pass
        if self.transport.closed:
            raise McpError(self.transport.closed)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut

        async def exchange() -> dict:
            await self.transport.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
            return await fut

        try:
            return await asyncio.wait_for(exchange(), self.timeout)
        except asyncio.TimeoutError:
            await self._cancelled(rid, method)
            raise McpError(f"MCP server {self.name!r} did not answer {method} within {self.timeout:g}s; a slower "
                           f"server needs a larger \"timeout\" in mcp.json or MCP_TOOL_TIMEOUT "
                           f"(milliseconds)") from None
        finally:
            self._pending.pop(rid, None)
            if not fut.done():
                fut.cancel()

    async def _cancelled(self, rid: int, method: str) -> None:
        """Tell the server we gave up on a request (best effort, never waits long)."""
        if method == "initialize" or self.transport.closed:
            return
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid,
                                                                                "reason": "timed out"}}
        try:
            await asyncio.wait_for(self.transport.send(note), 2)
        except (McpError, asyncio.TimeoutError):
            pass

    async def request(self, method: str, params: dict | None = None) -> dict:
        """One request. Over Streamable HTTP, if the server has dropped the session (404) the client
        initializes a new one and sends the request once more."""
        try:
            return await self._request_once(method, params)
        except SessionExpired as e:
            await self._renew(e.session_id)
        try:
            return await self._request_once(method, params)
        except SessionExpired:
            raise McpError(f"MCP server {self.name!r} dropped the new session at once; is more than one server "
                           f"behind {self.config.where()} without shared sessions?") from None

    async def _renew(self, stale: str) -> None:
        async with self._renewing:
            if self.transport.session_id != stale:
                return  # a call that failed at the same time renewed it already
            self.transport.new_session()
            try:
                await asyncio.wait_for(self._handshake(), self.startup_timeout)
            except asyncio.TimeoutError:
                raise McpError(f"MCP server {self.name!r} dropped our session and did not answer a new initialize "
                               f"within {self.startup_timeout:g}s") from None
        self.tools_changed()  # a restarted server may offer other tools

    async def list_tools(self) -> list[dict]:
        tools, cursor, seen = [], None, set()
        while True:
            result = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            tools.extend(result.get("tools") or [])
            cursor = result.get("nextCursor")
            if not cursor:
                return tools
            if cursor in seen:
                raise McpError(f"MCP server {self.name!r} repeated the tools/list cursor {cursor!r}; its tool list "
                               f"never ends")
            seen.add(cursor)

    async def call_tool(self, name: str, arguments: dict) -> dict:
        return await self.request("tools/call", {"name": name, "arguments": arguments})

    async def close(self) -> None:
        if self._relist is not None:
            self._relist.cancel()
            await asyncio.gather(self._relist, return_exceptions=True)
        await self.transport.close()
        self._on_closed(f"MCP server {self.name!r} is closed")


def _tool_name(server: str, tool: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", f"mcp__{server}__{tool}")
    return name[:64]


def sanitize_schema(schema) -> dict:
    """An input schema every provider accepts: an object schema at the top."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    schema = dict(schema)
    schema["type"] = "object"
    schema.setdefault("properties", {})
    return schema


def _image_blocks(item: dict, label: str, vision: bool) -> list[dict]:
    """An MCP image item under the same rule as image files (images.py): an image block (downscaled
    where needed) for a model with vision, a text note otherwise or when the data is not an image."""
    try:
        data = base64.b64decode(item["data"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        return [{"type": "text", "text": f"[image: {label}] the server sent image data that is not valid base64"}]
    media_type = sniff(data) or str(item.get("mimeType") or "application/octet-stream")
    return image_content(data, media_type, label, vision)


class McpTool(Tool):
    def __init__(self, client: McpClient, spec: dict):
        self.client = client
        self.remote_name = spec["name"]
        self.name = _tool_name(client.name, spec["name"])
        self.description = (spec.get("description") or f"{spec['name']} from MCP server {client.name}")[:4000]
        self.input_schema = sanitize_schema(spec.get("inputSchema"))
        self.read_only = bool((spec.get("annotations") or {}).get("readOnlyHint"))

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        if self.remote_name not in {t.remote_name for t in self.client.tools}:
            # the server's list changed after this step's request was built
            raise ToolError(f"MCP server {self.client.name!r} no longer offers the tool {self.remote_name!r} (its "
                            f"tool list changed); the tools it offers now: "
                            f"{', '.join(t.name for t in self.client.tools) or 'none'}")
        try:
            result = await self.client.call_tool(self.remote_name, args)
        except McpError as e:
            raise ToolError(str(e)) from None
        blocks = []
        for item in result.get("content") or []:
            kind = item.get("type")
            if kind == "text":
                blocks.append({"type": "text", "text": item.get("text", "")})
            elif kind == "image" and item.get("data"):
                blocks.extend(_image_blocks(item, f"{self.name} result", ctx.can_see))
            elif kind == "resource":
                res = item.get("resource") or {}
                blocks.append({"type": "text", "text": res.get("text") or f"[resource {res.get('uri')}]"})
            else:
                blocks.append({"type": "text", "text": json.dumps(item, ensure_ascii=False)[:2000]})
        if not blocks and result.get("structuredContent") is not None:
            blocks.append({"type": "text", "text": json.dumps(result["structuredContent"], ensure_ascii=False)})
        if all(b["type"] == "text" for b in blocks):
            return ToolResult("\n".join(b["text"] for b in blocks) or "[no output]", is_error=bool(result.get("isError")))
        return ToolResult(blocks, is_error=bool(result.get("isError")))

    # the client belongs to whoever started it, not to one agent's tool set


async def start_mcp_servers(configs: list[McpServerConfig], roots: list[str] | None = None
                            ) -> tuple[list[McpClient], list[McpTool]]:
    """Start every server and collect their tools (as first listed: a client's `tools` follows later
    changes); on any failure the started ones are closed. `roots`: the directories to answer
    `roots/list` with (the agent's work directory first); None declines it."""
    clients: list[McpClient] = []
    tools: list[McpTool] = []
    try:
        for config in configs:
            client = McpClient(config, roots=roots)
            clients.append(client)
            await client.start()
            tools.extend(await client.refresh_tools())
    except BaseException:
        for c in clients:
            await c.close()
        raise
    return clients, tools
