"""An MCP server built with the official MCP Python SDK (PyPI `mcp`), the independent reference the
MCP client tests run against. Written on the SDK's low-level `Server` so that tools/list can page
(the high-level MCPServer lists all tools at once).

    python mcp_sdk_server.py stdio
    python mcp_sdk_server.py streamable-http PORT [--json]   # endpoint http://127.0.0.1:PORT/mcp
    python mcp_sdk_server.py sse PORT                        # stream http://127.0.0.1:PORT/sse

Tools: `add` (read-only; logs a notification and pings the client before answering, both on the
request's own stream over HTTP), `fail` (an isError result), `picture` (a 3x2 PNG made with Pillow
plus a text item), `ask_roots` (asks the client for roots/list and reports how the client answered),
`sleep` (waits `seconds`), `grow` / `shrink` (add or remove the tool `extra`, which echoes its
`word`, then send `notifications/tools/list_changed` outside any request: over Streamable HTTP it
travels on the GET stream). Two tools per tools/list page. Every JSON-RPC message the server receives
goes, one JSON line each, to the file named by $MCP_SDK_LOG when it is set, with the HTTP headers
that came with it."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import warnings

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata

PAGE = 2
# logging notifications are deprecated from protocol 2026-07-28 on; the client here speaks 2025-06-18
warnings.filterwarnings("ignore", message="The logging capability is deprecated")

TOOLS = [
    types.Tool(name="add", description="add two numbers",
               input_schema={"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                             "required": ["a", "b"]},
               annotations=types.ToolAnnotations(read_only_hint=True)),
    types.Tool(name="fail", description="always fails", input_schema={"type": "object", "properties": {}}),
    types.Tool(name="picture", description="a tiny PNG", input_schema={"type": "object", "properties": {}},
               annotations=types.ToolAnnotations(read_only_hint=True)),
    types.Tool(name="ask_roots", description="asks the client for its roots",
               input_schema={"type": "object", "properties": {}}),
    types.Tool(name="sleep", description="waits", input_schema={"type": "object", "properties": {
        "seconds": {"type": "number"}}}),
    types.Tool(name="grow", description="adds the tool extra", input_schema={"type": "object", "properties": {}}),
    types.Tool(name="shrink", description="removes the tool extra", input_schema={"type": "object", "properties": {}}),
]
EXTRA = types.Tool(name="extra", description="echoes a word", input_schema={
    "type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]})


def png_bytes() -> bytes:
    from PIL import Image
    img = Image.new("RGB", (3, 2), (200, 30, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_message(record: dict) -> None:
    path = os.environ.get("MCP_SDK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


async def list_tools(ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    start = int(params.cursor) if params is not None and params.cursor else 0
    page = TOOLS[start:start + PAGE]
    more = start + PAGE < len(TOOLS)
    return types.ListToolsResult(tools=page, next_cursor=str(start + PAGE) if more else None)


async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    related = ServerMessageMetadata(related_request_id=ctx.request_id)
    if params.name == "add":
        await ctx.session.send_log_message("info", "adding", related_request_id=ctx.request_id)
        await ctx.session.send_request(types.PingRequest(), types.EmptyResult, metadata=related)
        return types.CallToolResult(content=[types.TextContent(text=str(args["a"] + args["b"]))])
    if params.name == "fail":
        return types.CallToolResult(content=[types.TextContent(text="it broke")], is_error=True)
    if params.name == "picture":
        data = base64.b64encode(png_bytes()).decode()
        return types.CallToolResult(content=[types.TextContent(text="a red picture"),
                                             types.ImageContent(data=data, mime_type="image/png")])
    if params.name == "ask_roots":
        try:
            roots = await ctx.session.send_request(types.ListRootsRequest(), types.ListRootsResult, metadata=related)
            answer = "answered: " + json.dumps([{"uri": str(r.uri), "name": r.name} for r in roots.roots])
        except MCPError as e:
            answer = f"declined: {e.error.code}"
        return types.CallToolResult(content=[types.TextContent(text=answer)])
    if params.name in ("grow", "shrink"):
        present = any(t.name == "extra" for t in TOOLS)
        if params.name == "grow" and not present:
            TOOLS.append(EXTRA)
        elif params.name == "shrink" and present:
            TOOLS.remove(EXTRA)
        await ctx.session.send_tool_list_changed()  # related to no request
        return types.CallToolResult(content=[types.TextContent(text=f"{params.name} done")])
    if params.name == "extra" and any(t.name == "extra" for t in TOOLS):
        return types.CallToolResult(content=[types.TextContent(text=f"extra: {args['word']}")])
    if params.name == "sleep":
        await anyio.sleep(float(args.get("seconds", 1)))
        return types.CallToolResult(content=[types.TextContent(text="slept")])
    raise MCPError(code=types.METHOD_NOT_FOUND, message=f"no tool {params.name}")


def make_server() -> Server:
    return Server("sdk-reference", version="1", on_list_tools=list_tools, on_call_tool=call_tool)


def logging_middleware(app):
    """ASGI middleware writing each POSTed body and its headers to $MCP_SDK_LOG."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        chunks = []

        async def recv():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
                    body = b"".join(chunks)
                    log_message({"http": scope["method"], "path": scope["path"], "headers": headers,
                                 "body": json.loads(body) if body else None})
            return message
        return await app(scope, recv, send)
    return wrapped


def main() -> None:
    transport = sys.argv[1]
    server = make_server()
    if transport == "stdio":
        from mcp.server.stdio import stdio_server

        async def run_stdio():
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
        anyio.run(run_stdio)
        return
    import uvicorn
    port = int(sys.argv[2])
    if transport == "streamable-http":
        app = server.streamable_http_app(json_response="--json" in sys.argv)
    elif transport == "sse":
        app = sse_app(server)
    else:
        raise SystemExit(f"unknown transport {transport!r}")
    uvicorn.run(logging_middleware(app), host="127.0.0.1", port=port, log_level="warning")


def sse_app(server: Server):
    """The legacy HTTP+SSE transport: GET /sse streams, POST /messages/ takes the client's messages."""
    from mcp.server.sse import SseServerTransport
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    sse = SseServerTransport("/messages/")

    async def handle_sse(request):
        async with sse.connect_sse(request.scope, request.receive, request._send) as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return Response()

    return Starlette(routes=[Route("/sse", endpoint=handle_sse, methods=["GET"]),
                             Mount("/messages/", app=sse.handle_post_message)])


if __name__ == "__main__":
    main()
