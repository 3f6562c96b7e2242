"""MCP servers over stdio as tool providers. Speaks JSON-RPC 2.0, one JSON message per line, over the
server process's stdin/stdout: `initialize` (then the `notifications/initialized` notification),
`tools/list` (following `nextCursor`), `tools/call`. Each server tool becomes an agent tool named
`mcp__SERVER__TOOL`; tools whose annotations say `readOnlyHint: true` count as reads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass, field

from ..images import image_content, sniff
from .base import Tool, ToolContext, ToolError, ToolResult

PROTOCOL_VERSION = "2025-06-18"


class McpError(Exception):
    pass


@dataclass
class McpServerConfig:
    name: str
    command: list[str]
    env: dict = field(default_factory=dict)
    cwd: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "McpServerConfig":
        """`NAME=COMMAND LINE` as given to --mcp."""
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or not command.strip():
            raise ValueError(f"--mcp {spec!r}: expected NAME=COMMAND, e.g. files=\"npx server-files .\"")
        return cls(name.strip(), shlex.split(command))


def load_mcp_config(path: str) -> list[McpServerConfig]:
    """The usual `{"mcpServers": {NAME: {"command", "args", "env", "cwd"}}}` file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"{path}: expected an object with an \"mcpServers\" object")
    out = []
    for name, spec in servers.items():
        if not isinstance(spec, dict) or not spec.get("command"):
            raise ValueError(f"{path}: MCP server {name!r} needs a \"command\" (stdio servers only)")
        out.append(McpServerConfig(name, [spec["command"], *spec.get("args", [])], spec.get("env") or {},
                                   spec.get("cwd")))
    return out


class McpClient:
    def __init__(self, config: McpServerConfig, timeout: float = 120.0):
        self.config = config
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.server_info: dict = {}
        self.stderr_tail: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._err_reader: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.config.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, **self.config.env}, cwd=self.config.cwd,
                limit=64 * 1024 * 1024)
        except OSError as e:
            raise McpError(f"MCP server {self.name!r}: cannot start {self.config.command!r}: {e}") from e
        self._reader = asyncio.ensure_future(self._read())
        self._err_reader = asyncio.ensure_future(self._read_stderr())
        result = await self.request("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "moonlet-agent", "version": "0.1.0"}})
        self.server_info = result.get("serverInfo", {})
        await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _send(self, message: dict) -> None:
        if self.proc is None or self.proc.stdin.is_closing():
            raise McpError(f"MCP server {self.name!r} is not running")
        self.proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode())
        await self.proc.stdin.drain()

    async def _read(self) -> None:
        try:
            while line := await self.proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a server printing logs to stdout: not protocol, skip it
                if not isinstance(msg, dict):
                    continue
                if "method" in msg and "id" in msg:  # a request from the server
                    reply = {"jsonrpc": "2.0", "id": msg["id"]}
                    if msg["method"] == "ping":
                        reply["result"] = {}
                    else:
                        reply["error"] = {"code": -32601, "message": f"method {msg['method']} not supported"}
                    await self._send(reply)
                elif "id" in msg and (fut := self._pending.pop(msg["id"], None)) is not None and not fut.done():
                    if "error" in msg:
                        err = msg["error"] or {}
                        fut.set_exception(McpError(f"MCP server {self.name!r}: {err.get('message')} "
                                                   f"(code {err.get('code')})"))
                    else:
                        fut.set_result(msg.get("result") or {})
        finally:
            if self._err_reader is not None:  # let the dying server's last stderr lines arrive
                await asyncio.wait([self._err_reader], timeout=1)
            tail = "\n".join(self.stderr_tail[-5:])
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(McpError(f"MCP server {self.name!r} exited" + (f"; its stderr:\n{tail}" if tail
                                                                                     else "")))
            self._pending.clear()

    async def _read_stderr(self) -> None:
        while line := await self.proc.stderr.readline():
            self.stderr_tail = (self.stderr_tail + [line.decode("utf-8", "replace").rstrip()])[-50:]

    async def request(self, method: str, params: dict | None = None) -> dict:
        if self._reader is not None and self._reader.done():
            raise McpError(f"MCP server {self.name!r} has exited")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise McpError(f"MCP server {self.name!r} did not answer {method} within {self.timeout:g}s") from None

    async def list_tools(self) -> list[dict]:
        tools, cursor = [], None
        while True:
            result = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            tools.extend(result.get("tools") or [])
            cursor = result.get("nextCursor")
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: dict) -> dict:
        return await self.request("tools/call", {"name": name, "arguments": arguments})

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


async def start_mcp_servers(configs: list[McpServerConfig]) -> tuple[list[McpClient], list[McpTool]]:
    """Start every server and collect their tools; on any failure the started ones are closed."""
    clients: list[McpClient] = []
    tools: list[McpTool] = []
    try:
        for config in configs:
            client = McpClient(config)
            clients.append(client)
            await client.start()
            tools.extend(McpTool(client, spec) for spec in await client.list_tools())
    except BaseException:
        for c in clients:
            await c.close()
        raise
    return clients, tools
