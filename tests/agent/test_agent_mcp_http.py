"""MCP over HTTP (and stdio) against an independent reference: servers built with the official MCP
Python SDK (`mcp_sdk_server.py`, run in a subprocess on a free loopback port) — Streamable HTTP with
SSE and with JSON answers, the legacy HTTP+SSE transport, and stdio. The SDK server logs every message
it receives with its HTTP headers, so the tests see what moonlet's client put on the wire. Failure
modes (unreachable, non-2xx, wrong content type, silence) use a small stdlib HTTP server written here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from agent_scripted import Reply, ScriptedEndpoint, last_results, result_text, text, tool

from moonlet.agent.tools import ToolContext, ToolError, Workspace
from moonlet.agent.tools.mcp import McpClient, McpError, McpServerConfig, load_mcp_config, start_mcp_servers

pytest.importorskip("mcp", reason="the official MCP SDK (pip install mcp) is the reference server")

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "mcp_sdk_server.py")
ALL_TOOLS = ["add", "fail", "picture", "ask_roots", "sleep", "grow", "shrink"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SdkServer:
    """`mcp_sdk_server.py TRANSPORT PORT` in a subprocess; `restart()` kills it and starts it again on
    the same port (every session it held is gone)."""

    def __init__(self, tmp_path, transport: str, *extra: str):
        self.transport, self.extra = transport, extra
        self.port = free_port()
        self.log = tmp_path / f"sdk-{transport}.log"
        self.proc: subprocess.Popen | None = None
        path = "/mcp" if transport == "streamable-http" else "/sse"
        self.url = f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "SdkServer":
        self.proc = subprocess.Popen([sys.executable, SERVER, self.transport, str(self.port), *self.extra],
                                     env={**os.environ, "MCP_SDK_LOG": str(self.log)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SDK server exited: {self.proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError("SDK server did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def received(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def sdk_server(tmp_path):
    servers = []

    def make(transport: str, *extra: str) -> SdkServer:
        servers.append(SdkServer(tmp_path, transport, *extra).start())
        return servers[-1]
    yield make
    for s in servers:
        s.stop()


def recording(client: McpClient) -> list[dict]:
    """Every message the client receives, in arrival order (the transport's callback, wrapped)."""
    seen = []
    inner = client.transport.on_message

    async def on_message(msg):
        seen.append(msg)
        await inner(msg)
    client.transport.on_message = on_message
    return seen


def check_picture(result) -> None:
    """The SDK server's picture: a text item, then a 3x2 red PNG — decoded with Pillow, not compared
    to the server's bytes."""
    from PIL import Image
    assert not result.is_error
    blocks = result.content
    assert blocks[0] == {"type": "text", "text": "a red picture"}
    image = next(b for b in blocks if b["type"] == "image")
    assert image["source"]["media_type"] == "image/png"
    img = Image.open(io.BytesIO(base64.b64decode(image["source"]["data"])))
    assert img.size == (3, 2) and img.convert("RGB").getpixel((1, 1)) == (200, 30, 40)


def test_streamable_http_lists_and_calls_the_sdk_servers_tools(sdk_server, tmp_path, monkeypatch):
    server = sdk_server("streamable-http")
    monkeypatch.setenv("MOONLET_TEST_MCP_TOKEN", "s3cret")
    monkeypatch.delenv("MOONLET_TEST_MCP_PORT", raising=False)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"sdk": {
        "type": "http", "url": server.url.replace(str(server.port), "${MOONLET_TEST_MCP_PORT:-%d}" % server.port),
        "headers": {"Authorization": "Bearer ${MOONLET_TEST_MCP_TOKEN}"}, "timeout": 20}}}))

    async def go():
        clients, tools = await start_mcp_servers(load_mcp_config(str(config)))
        client = clients[0]
        seen = recording(client)
        ctx = ToolContext(Workspace(tmp_path), vision=True)
        by_name = {t.name: t for t in tools}
        try:
            added = await by_name["mcp__sdk__add"].run({"a": 2, "b": 3.5}, ctx)
            added_seen = list(seen)
            failed = await by_name["mcp__sdk__fail"].run({}, ctx)
            picture = await by_name["mcp__sdk__picture"].run({}, ctx)
            roots = await by_name["mcp__sdk__ask_roots"].run({}, ctx)
            return client.transport.session_id, by_name, added, added_seen, failed, picture, roots
        finally:
            await client.close()

    session, tools, added, added_seen, failed, picture, roots = asyncio.run(go())
    assert list(tools) == [f"mcp__sdk__{t}" for t in ALL_TOOLS]  # four tools/list pages
    assert [t.read_only for t in tools.values()] == [True, False, True, False, False, False, False]
    assert tools["mcp__sdk__add"].input_schema["required"] == ["a", "b"]
    assert added.content == "5.5" and not added.is_error
    # on the call's own SSE stream: the server's log notification and ping came before the answer
    assert [m.get("method", "answer") for m in added_seen] == ["notifications/message", "ping", "answer"]
    assert failed.is_error and failed.content == "it broke"
    check_picture(picture)
    assert roots.content == "declined: -32601"  # roots/list declined as "method not found"

    received = server.received()
    posts = [r for r in received if r["http"] == "POST"]
    assert posts[0]["body"]["method"] == "initialize" and "mcp-session-id" not in posts[0]["headers"]
    assert posts[0]["body"]["params"]["protocolVersion"] == "2025-06-18"
    assert session and all(r["headers"].get("mcp-session-id") == session for r in received[1:])
    for r in posts:
        assert r["headers"]["accept"] == "application/json, text/event-stream"
        assert r["headers"]["authorization"] == "Bearer s3cret"
    assert all(r["headers"]["mcp-protocol-version"] == "2025-06-18" for r in posts[1:])
    methods = [r["body"].get("method") for r in posts]
    assert methods[:6] == ["initialize", "notifications/initialized"] + ["tools/list"] * 4
    assert [r["body"]["params"].get("cursor") for r in posts[2:6]] == [None, "2", "4", "6"]
    assert {"jsonrpc": "2.0", "id": 1, "result": {}} in [r["body"] for r in posts]  # the ping's answer
    assert received[-1]["http"] == "DELETE"  # the session ended on close


def test_streamable_http_with_json_answers(sdk_server, tmp_path):
    server = sdk_server("streamable-http", "--json")

    async def go():
        clients, tools = await start_mcp_servers([McpServerConfig.parse(f"sdk={server.url}")])
        by_name = {t.name: t for t in tools}
        ctx = ToolContext(Workspace(tmp_path), vision=True)
        try:
            return (list(by_name), await by_name["mcp__sdk__fail"].run({}, ctx),
                    await by_name["mcp__sdk__picture"].run({}, ctx))
        finally:
            await clients[0].close()

    names, failed, picture = asyncio.run(go())
    assert names == [f"mcp__sdk__{t}" for t in ALL_TOOLS]
    assert failed.is_error and failed.content == "it broke"
    check_picture(picture)


def test_a_killed_session_is_replaced_by_a_new_one(sdk_server, tmp_path):
    server = sdk_server("streamable-http")

    async def go():
        import httpx
        clients, tools = await start_mcp_servers([McpServerConfig("sdk", type="http", url=server.url)])
        client = clients[0]
        add = {t.name: t for t in tools}["mcp__sdk__add"]
        ctx = ToolContext(Workspace(tmp_path))
        try:
            first = client.transport.session_id
            async with httpx.AsyncClient() as http:  # someone else ends our session on the server
                assert (await http.delete(server.url, headers={"Mcp-Session-Id": first})).status_code == 200
            after_delete = await add.run({"a": 1, "b": 2}, ctx)
            second = client.transport.session_id
            await asyncio.to_thread(server.restart)  # the server dies; all its sessions with it
            after_restart = await add.run({"a": 3, "b": 4}, ctx)
            third = client.transport.session_id
            async with httpx.AsyncClient() as http:
                await http.delete(server.url, headers={"Mcp-Session-Id": third})
            n_logged = len(server.received())
            # parallel calls that all meet the dead session: one new session, every call answered
            together = await asyncio.gather(*(add.run({"a": i, "b": 100}, ctx) for i in range(4)))
            return first, second, third, after_delete, after_restart, together, client.sessions, n_logged
        finally:
            await client.close()

    first, second, third, after_delete, after_restart, together, sessions, n_logged = asyncio.run(go())
    assert after_delete.content == "3" and after_restart.content == "7"
    assert [r.content for r in together] == ["100", "101", "102", "103"]
    assert len({first, second, third}) == 3 and sessions == 4
    later = [r["body"].get("method") for r in server.received()[n_logged:] if r["http"] == "POST"]
    assert later.count("initialize") == 1 and later.count("tools/call") >= 4
    posts = [r for r in server.received()[:n_logged] if r["http"] == "POST"]
    calls = [(r["body"].get("method"), r["headers"].get("mcp-session-id")) for r in posts
             if r["body"].get("method") in ("initialize", "tools/call")]
    # each call went out once with the dead session, then again after a fresh initialize
    assert calls == [("initialize", None), ("tools/call", first), ("initialize", None), ("tools/call", second),
                     ("tools/call", second), ("initialize", None), ("tools/call", third)]


def test_legacy_http_sse_transport(sdk_server, tmp_path):
    server = sdk_server("sse")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"old": {"type": "sse", "url": server.url,
                                                         "headers": {"X-Team": "moon"}}}}))

    async def go():
        clients, tools = await start_mcp_servers(load_mcp_config(str(config)))
        by_name = {t.name: t for t in tools}
        ctx = ToolContext(Workspace(tmp_path), vision=True)
        try:
            return (list(by_name), await by_name["mcp__old__add"].run({"a": 40, "b": 2}, ctx),
                    await by_name["mcp__old__fail"].run({}, ctx), await by_name["mcp__old__picture"].run({}, ctx),
                    await by_name["mcp__old__ask_roots"].run({}, ctx))
        finally:
            await clients[0].close()

    names, added, failed, picture, roots = asyncio.run(go())
    assert names == [f"mcp__old__{t}" for t in ALL_TOOLS]
    assert added.content == "42" and failed.is_error and failed.content == "it broke"
    check_picture(picture)
    assert roots.content == "declined: -32601"
    received = server.received()
    assert received[0]["http"] == "GET" and received[0]["headers"]["x-team"] == "moon"
    posts = [r for r in received if r["http"] == "POST"]
    assert posts and all(r["headers"]["x-team"] == "moon" and r["path"].startswith("/messages/") for r in posts)


def test_official_stdio_server_against_the_stdio_client(tmp_path):
    async def go():
        clients, tools = await start_mcp_servers([McpServerConfig("sdk", [sys.executable, SERVER, "stdio"])])
        by_name = {t.name: t for t in tools}
        ctx = ToolContext(Workspace(tmp_path), vision=True)
        try:
            return (list(by_name), await by_name["mcp__sdk__add"].run({"a": 0.5, "b": 2}, ctx),
                    await by_name["mcp__sdk__fail"].run({}, ctx), await by_name["mcp__sdk__picture"].run({}, ctx),
                    await by_name["mcp__sdk__ask_roots"].run({}, ctx), clients[0].server_info)
        finally:
            await clients[0].close()

    names, added, failed, picture, roots, info = asyncio.run(go())
    assert names == [f"mcp__sdk__{t}" for t in ALL_TOOLS]
    assert added.content == "2.5" and failed.is_error and failed.content == "it broke"
    check_picture(picture)
    assert roots.content == "declined: -32601" and info["name"] == "sdk-reference"


def test_agent_run_with_an_http_server_from_mcp_config(sdk_server, tmp_path):
    server = sdk_server("streamable-http")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"sdk": {"type": "http", "url": server.url}}}))

    def script(body):
        results = last_results(body)
        if not results:
            return Reply([tool("mcp__sdk__add", {"a": 40, "b": 2})])
        return Reply([text(f"sum is {result_text(results[0])}")])

    with ScriptedEndpoint(script) as ep:
        out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "add 40 and 2", "--base-url", ep.url,
                              "--model-name", "scripted", "--mcp-config", str(config), "--workdir", str(tmp_path),
                              "--db", str(tmp_path / "s.db"), "-q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sum is 42"
    assert "mcp__sdk__add" in [t["name"] for t in ep.requests[0]["tools"]]
    calls = [r["body"] for r in server.received() if r["http"] == "POST" and r["body"].get("method") == "tools/call"]
    assert calls == [{"jsonrpc": "2.0", "id": calls[0]["id"], "method": "tools/call",
                      "params": {"name": "add", "arguments": {"a": 40, "b": 2}}}]
    assert server.received()[-1]["http"] == "DELETE"  # the CLI closed the session on exit


async def announced(client: McpClient, tool, version: int) -> None:
    """Call `grow`/`shrink` until the client has read a changed tool list. Over Streamable HTTP the
    server's announcement travels on the GET stream, which may not be open yet for the first call
    (the SDK drops messages for a stream that is not there): then the next call's reaches it."""
    for _ in range(10):
        assert not (await tool.run({}, ToolContext(Workspace(".")))).is_error
        for _ in range(100):
            await client.settle()
            if client.tools_version != version:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"the client never read a changed tool list after {tool.name}")


@pytest.mark.parametrize("transport", ["streamable-http", "sse", "stdio"])
def test_a_changed_tool_list_is_read_again_and_roots_are_answered(sdk_server, tmp_path, transport):
    """The SDK server adds and removes a tool and sends notifications/tools/list_changed outside any
    request; an agent's registry offers the new list (read again over four pages) and drops the
    removed tool; a registry limited to some tools does not take the new one in. roots/list is
    answered with the work directory as a file:// URI the SDK parses."""
    from urllib.parse import quote

    from moonlet.agent.tools import make_tools
    if transport == "stdio":
        config = McpServerConfig("sdk", [sys.executable, SERVER, "stdio"])
    else:
        config = McpServerConfig("sdk", type="http" if transport == "streamable-http" else "sse",
                                 url=sdk_server(transport).url)
    work = tmp_path / "my work"
    work.mkdir()

    async def go():
        clients, _ = await start_mcp_servers([config], roots=[str(work)])
        client = clients[0]
        try:
            registry = make_tools(sources=clients)
            limited = make_tools(sources=clients)
            limited.restrict(["mcp__sdk__add", "mcp__sdk__grow"])
            before = registry.names()
            by_name = dict(registry.tools)
            roots = await by_name["mcp__sdk__ask_roots"].run({}, ToolContext(Workspace(tmp_path)))
            await announced(client, by_name["mcp__sdk__grow"], client.tools_version)
            grown = await registry.refresh()
            extra = registry.get("mcp__sdk__extra")
            echoed = await extra.run({"word": "moon"}, ToolContext(Workspace(tmp_path)))
            limited_grown = await limited.refresh()
            await announced(client, by_name["mcp__sdk__shrink"], client.tools_version)
            shrunk = await registry.refresh()
            with pytest.raises(ToolError, match=r"'sdk' no longer offers the tool 'extra' \(its tool list changed\)"):
                await extra.run({"word": "moon"}, ToolContext(Workspace(tmp_path)))
            return before, roots, grown, echoed, limited_grown, limited.names(), shrunk, registry
        finally:
            await client.close()

    before, roots, grown, echoed, limited_grown, limited_names, shrunk, registry = asyncio.run(go())
    assert "mcp__sdk__extra" not in before
    assert (grown.added, grown.removed) == (["mcp__sdk__extra"], [])
    assert echoed.content == "extra: moon" and not echoed.is_error
    assert limited_grown.added == [] and limited_names == ["mcp__sdk__add", "mcp__sdk__grow"]
    assert (shrunk.added, shrunk.removed) == ([], ["mcp__sdk__extra"])
    assert registry.names() == before
    assert "no longer available" in registry.missing("mcp__sdk__extra")
    uri = "file://" + quote(os.path.realpath(work))
    assert roots.content == "answered: " + json.dumps([{"uri": uri, "name": "my work"}])


# -- failure modes --------------------------------------------------------------------------------
class Misbehaving(BaseHTTPRequestHandler):
    """/500: an error with a body; /hop, /away: redirects to /500 on the same origin and on another;
    /401: wants credentials; /html: 200 with a web page; /silent: answers nothing for 3 s; /noanswer:
    an SSE stream that ends without the response; /elsewhere: an HTTP+SSE stream whose endpoint is on
    another origin."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.path = self.path.split("?")[0]
        if self.path == "/silent":
            time.sleep(3)
            return self._reply(504, "text/plain", b"late")
        if self.path == "/500":
            return self._reply(500, "text/plain", b"database exploded\n  while reading the tool table")
        if self.path == "/401":
            return self._reply(401, "application/json", b'{"error": "invalid_token"}')
        if self.path == "/html":
            return self._reply(200, "text/html", b"<html><body>Welcome to our homepage</body></html>")
        if self.path in ("/hop", "/away"):  # a redirect on the same origin, and one to another host
            port = self.server.server_address[1]
            target = "/500" if self.path == "/hop" else f"http://localhost:{port}/500"
            self.send_response(307)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if self.path == "/elsewhere":  # an HTTP+SSE stream naming a message endpoint on another host
            return self._reply(200, "text/event-stream", b"event: endpoint\ndata: http://elsewhere.invalid/m\n\n")
        if self.path == "/noanswer":
            return self._reply(200, "text/event-stream", b"event: message\ndata: {\"jsonrpc\": \"2.0\", "
                                                         b"\"method\": \"notifications/message\"}\n\n")
        return self._reply(404, "text/plain", b"no such page")

    do_GET = do_POST

    def _reply(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def misbehaving():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def start_error(config: McpServerConfig) -> str:
    async def go():
        with pytest.raises(McpError) as e:
            await start_mcp_servers([config])
        return str(e.value)
    return asyncio.run(go())


@pytest.mark.parametrize("path, expected", [
    ("/500", r"'bad' answered initialize with HTTP 500 from http://.*/500: database exploded while reading"),
    ("/401", r"HTTP 401 .*invalid_token.*\"headers\" in mcp.json"),
    ("/html", r"content type 'text/html'.*Welcome to our homepage.*is http://\S+/html an MCP endpoint"),
    ("/noanswer", r"ended the SSE stream of initialize without answering it"),
    ("/nothing", r"HTTP 404 .*no such page.*serve at /mcp"),
    ("/hop", r"HTTP 500 from http://127.0.0.1:\d+/500: database exploded"),
    ("/away", r"redirected to another origin \(http://localhost:\d+/500\); not followed"),
    ("/500?key=SECRET", r"HTTP 500 from http://127.0.0.1:\d+/500\?…: database"),
])
def test_http_errors_name_the_server_and_what_went_wrong(misbehaving, path, expected):
    import re
    message = start_error(McpServerConfig("bad", type="http", url=misbehaving + path))
    assert re.search(expected, message) and "SECRET" not in message, message


def test_a_server_that_never_answers_initialize_times_out(misbehaving):
    config = McpServerConfig("mute", type="http", url=misbehaving + "/silent", startup_timeout=0.5)
    message = start_error(config)
    assert "'mute'" in message and "did not start and answer initialize within 0.5s" in message
    assert "startupTimeout" in message


def test_unreachable_server_and_wrong_sse_server(misbehaving):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    message = start_error(McpServerConfig("gone", type="http", url=dead))
    assert f"'gone': cannot reach {dead} (ConnectError" in message and "server is running" in message
    message = start_error(McpServerConfig("old", type="sse", url=misbehaving + "/html"))
    assert "content type 'text/html'" in message and "\"type\": \"http\"" in message
    message = start_error(McpServerConfig("evil", type="sse", url=misbehaving + "/elsewhere", headers={"A": "b"}))
    assert "'evil' named a message endpoint on another origin (http://elsewhere.invalid/m); refused" in message


def test_a_tool_call_that_takes_too_long_is_an_error_not_a_hang(sdk_server, tmp_path):
    server = sdk_server("streamable-http")

    async def go():
        clients, tools = await start_mcp_servers([McpServerConfig("sdk", type="http", url=server.url, timeout=0.5)])
        sleep = {t.name: t for t in tools}["mcp__sdk__sleep"]
        try:
            with pytest.raises(ToolError, match=r"'sdk' did not answer tools/call within 0.5s.*\"timeout\""):
                await sleep.run({"seconds": 30}, ToolContext(Workspace(tmp_path)))
            return await sleep.run({"seconds": 0}, ToolContext(Workspace(tmp_path)))  # the session still works
        finally:
            await clients[0].close()

    assert asyncio.run(go()).content == "slept"
    cancelled = [r["body"] for r in server.received() if r["http"] == "POST"
                 and r["body"].get("method") == "notifications/cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["params"]["reason"] == "timed out"


# -- configuration ----------------------------------------------------------------------------------
def test_mcp_json_entries_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONLET_TEST_TOKEN", "tok")
    monkeypatch.delenv("MOONLET_TEST_UNSET", raising=False)
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "local": {"command": "python3", "args": ["-m", "srv", "${MOONLET_TEST_TOKEN}"],
                  "env": {"K": "${MOONLET_TEST_TOKEN}"}},
        "remote": {"type": "http", "url": "https://mcp.example.com/${MOONLET_TEST_UNSET:-v1}/mcp",
                   "headers": {"Authorization": "Bearer ${MOONLET_TEST_TOKEN}"}, "timeout": 30, "startupTimeout": 5},
        "guess": {"url": "http://127.0.0.1:9/mcp"},
        "legacy": {"type": "sse", "url": "http://127.0.0.1:9/sse"},
        "alias": {"type": "streamable-http", "url": "http://127.0.0.1:9/mcp"},
    }}))
    local, remote, guess, legacy, alias = load_mcp_config(str(path))
    assert local.type == "stdio" and local.command == ["python3", "-m", "srv", "tok"] and local.env == {"K": "tok"}
    assert (remote.type, remote.url, remote.headers) == ("http", "https://mcp.example.com/v1/mcp",
                                                         {"Authorization": "Bearer tok"})
    assert (remote.timeout, remote.startup_timeout) == (30.0, 5.0)
    assert (guess.type, legacy.type, alias.type) == ("http", "sse", "http")

    cli = McpServerConfig.parse("docs=https://mcp.example.com/mcp")
    assert (cli.name, cli.type, cli.url, cli.command) == ("docs", "http", "https://mcp.example.com/mcp", [])
    assert McpServerConfig.parse("files=npx -y server-files .").command == ["npx", "-y", "server-files", "."]

    def bad(spec, match):
        path.write_text(json.dumps({"mcpServers": {"x": spec}}))
        with pytest.raises(ValueError, match=match):
            load_mcp_config(str(path))
    bad({"type": "http"}, r"mcpServers.x: a 'http' server needs a \"url\"")
    bad({"type": "websocket", "url": "ws://h"}, r"mcpServers.x.type: 'websocket' is not a transport")
    bad({"type": "http", "url": "ftp://h/mcp"}, r"mcpServers.x.url: 'ftp://h/mcp' is not an http")
    bad({"type": "http", "url": "http://h/mcp", "headers": {"A": "${MOONLET_TEST_UNSET}"}},
        r"mcpServers.x.headers.A: \$\{MOONLET_TEST_UNSET\} is not set; export MOONLET_TEST_UNSET")
    bad({"type": "sse", "url": "http://h/sse", "timeout": -1}, r"mcpServers.x.timeout: expected a positive number")
    bad({"args": ["a"]}, r"a stdio server needs a \"command\"")


def test_timeouts_come_from_claude_code_variables(monkeypatch):
    monkeypatch.setenv("MCP_TOOL_TIMEOUT", "2500")
    monkeypatch.setenv("MCP_TIMEOUT", "700")
    client = McpClient(McpServerConfig("x", type="http", url="http://127.0.0.1:9/mcp"))
    assert (client.timeout, client.startup_timeout) == (2.5, 0.7)
    client = McpClient(McpServerConfig("x", type="http", url="http://127.0.0.1:9/mcp", timeout=9, startup_timeout=3))
    assert (client.timeout, client.startup_timeout) == (9, 3)


# -- resuming a dropped Streamable HTTP stream ------------------------------------------------------
class Resumable(BaseHTTPRequestHandler):
    """A Streamable HTTP server written here, whose tools/call answer is an SSE stream that breaks
    before the response: /close ends the connection cleanly in the middle of the third event (the
    response; an SSE event cut off by the end of the stream is not dispatched); /chunked breaks the
    chunked body at the same place and answers the first resumption with 503; /noids sends its events without ids; /refuse has ids but answers the resumption with
    405. A GET with Last-Event-ID `e2` gets the rest (the response, in full) — the events after e2
    of that stream. Every request is recorded in `server.seen` (method, path, headers, body)."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.server.seen.append(("POST", self.path, dict(self.headers), body))
        method, rid = body.get("method"), body.get("id")
        if method == "initialize":
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                "serverInfo": {"name": "resumable", "version": "1"}}}, {"Mcp-Session-Id": "s-1"})
        if rid is None:
            self.send_response(202)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if method == "tools/list":
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": [
                {"name": "long", "inputSchema": {"type": "object"}}]}})
        self.server.call_id = rid
        mode = self.path.strip("/")
        ids = mode != "noids"
        log = {"jsonrpc": "2.0", "method": "notifications/message",
               "params": {"level": "info", "logger": "long", "data": "working"}}
        progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": "t", "progress": 1, "total": 2}}
        frames = self._frame("e1", log, ids) + self._frame("e2", progress, ids)
        if mode in ("close", "chunked"):
            frames += self._frame("e3", self._answer(), ids)[:30]  # cut in the middle of the response
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frames), frames))  # and no final chunk
        else:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(frames)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        self.server.seen.append(("GET", self.path, dict(self.headers), None))
        last = self.headers.get("Last-Event-ID")
        mode = self.path.strip("/")
        if last is None or mode == "refuse":
            return self._reply(405, "text/plain", b"no GET stream here")
        if mode == "chunked" and sum(s[0] == "GET" and "Last-Event-ID" in s[2] for s in self.server.seen) == 1:
            return self._reply(503, "text/plain", b"busy, come back")
        assert last == "e2", last
        rest = self._frame("e3", self._answer(), True)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)

    def _answer(self) -> dict:
        return {"jsonrpc": "2.0", "id": self.server.call_id,
                "result": {"content": [{"type": "text", "text": "the long answer " + "x" * 200}]}}

    @staticmethod
    def _frame(event_id: str, msg: dict, ids: bool) -> bytes:
        return ((f"id: {event_id}\n" if ids else "") + "event: message\ndata: " + json.dumps(msg) + "\n\n").encode()

    def _json(self, msg: dict, headers: dict | None = None) -> None:
        data = json.dumps(msg).encode()
        self.send_response(200)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _reply(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def resumable():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Resumable)
    httpd.daemon_threads = True
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def call_long(httpd, mode: str):
    """Start a client on the server's /MODE, call `long`; (result or the ToolError, the client's
    drained notices, the number of resumed streams)."""
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{mode}"

    async def go():
        clients, tools = await start_mcp_servers([McpServerConfig("res", type="http", url=url, timeout=30)])
        try:
            try:
                result = await tools[0].run({}, ToolContext(Workspace(".")))
            except ToolError as e:
                result = e
            return result, clients[0].drain_notices(), clients[0].transport.resumed
        finally:
            await clients[0].close()
    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["close", "chunked"])
def test_a_dropped_stream_is_resumed_with_last_event_id(resumable, mode):
    result, notices, resumed = call_long(resumable, mode)
    assert not isinstance(result, Exception), result
    assert result.content == "the long answer " + "x" * 200 and not result.is_error
    assert resumed == 1
    # the events before the drop were handled once; nothing was delivered twice
    assert [(n["kind"], n.get("data"), n.get("progress")) for n in notices] == [("log", "working", None),
                                                                                 ("progress", None, 1)]
    resumes = [s for s in resumable.seen if s[0] == "GET" and s[2].get("Last-Event-ID")]
    assert len(resumes) == (2 if mode == "chunked" else 1)  # the 503 was retried
    for _, _, headers, _ in resumes:
        assert headers["Last-Event-ID"] == "e2" and headers["Mcp-Session-Id"] == "s-1"
        assert headers["MCP-Protocol-Version"] == "2025-06-18" and headers["Accept"] == "text/event-stream"
    calls = [s for s in resumable.seen if s[0] == "POST" and s[3].get("method") == "tools/call"]
    assert len(calls) == 1  # resumed, not sent again


def test_a_dropped_stream_without_ids_or_refused_resumption_fails_clearly(resumable):
    result, notices, resumed = call_long(resumable, "noids")
    assert isinstance(result, ToolError) and resumed == 0
    assert "'res' ended the SSE stream of tools/call without answering it; it gave its events no ids, so the " \
           "stream cannot be resumed" in str(result)
    assert not [s for s in resumable.seen if s[0] == "GET" and s[2].get("Last-Event-ID")]
    result, _, _ = call_long(resumable, "refuse")
    assert isinstance(result, ToolError)
    assert "refused to resume it with Last-Event-ID 'e2' (it does not offer resumption (GET))" in str(result)
