"""MCP over stdio: a tiny MCP server written here (JSON-RPC 2.0, one message per line) provides tools
to the agent — directly, and through `moonlet agent run --mcp-config`."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
from agent_scripted import Reply, ScriptedEndpoint, last_results, result_text, text, tool

from moonlet.agent.tools import ToolContext, ToolError, Workspace
from moonlet.agent.tools.mcp import McpServerConfig, start_mcp_servers

SERVER = r'''
import json, sys
log = open(sys.argv[1], "a")
def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n"); sys.stdout.flush()
TOOLS = [
  {"name": "add", "description": "add two numbers", "annotations": {"readOnlyHint": True},
   "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "$schema": "http://json-schema.org/draft-07/schema#"}},
  {"name": "fail", "description": "always fails", "inputSchema": {"type": "object"}},
  {"name": "crash", "description": "exits", "inputSchema": {"type": "object"}},
]
pending_call = None
for line in sys.stdin:
    msg = json.loads(line)
    log.write(json.dumps(msg) + "\n"); log.flush()
    method, mid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": msg["params"]["protocolVersion"],
              "capabilities": {"tools": {}}, "serverInfo": {"name": "tiny", "version": "1"}}})
    elif method == "tools/list":
        page = 1 if msg["params"].get("cursor") == "p2" else 0
        result = {"tools": TOOLS[:2] if page == 0 else TOOLS[2:]}
        if page == 0:
            result["nextCursor"] = "p2"
        send({"jsonrpc": "2.0", "id": mid, "result": result})
    elif method == "tools/call":
        name, args = msg["params"]["name"], msg["params"]["arguments"]
        if name == "crash":
            sys.stderr.write("tiny server: crashing on purpose\n"); sys.stderr.flush(); sys.exit(3)
        if name == "add":
            pending_call = (mid, args)
            send({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"})  # the client must answer this
            continue
        send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": "it broke"}],
                                                        "isError": True}})
    elif mid == "srv-1" and pending_call:
        cid, args = pending_call
        send({"jsonrpc": "2.0", "id": cid, "result": {"content": [{"type": "text",
              "text": str(args["a"] + args["b"])}]}})
        pending_call = None
    elif mid is not None and method:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "unknown method"}})
'''


@pytest.fixture
def server(tmp_path):
    script = tmp_path / "tiny_mcp.py"
    script.write_text(SERVER)
    return [sys.executable, str(script), str(tmp_path / "mcp.log")], tmp_path / "mcp.log"


def test_mcp_tools_are_listed_called_and_failures_reported(server, tmp_path):
    command, log = server

    async def go():
        clients, tools = await start_mcp_servers([McpServerConfig("tiny", command)])
        ctx = ToolContext(Workspace(tmp_path))
        try:
            by_name = {t.name: t for t in tools}
            added = await by_name["mcp__tiny__add"].run({"a": 2, "b": 3.5}, ctx)
            failed = await by_name["mcp__tiny__fail"].run({}, ctx)
            with pytest.raises(ToolError, match="(?s)exited.*crashing on purpose"):
                await by_name["mcp__tiny__crash"].run({}, ctx)
            return by_name, added, failed
        finally:
            for c in clients:
                await c.close()

    tools, added, failed = asyncio.run(go())
    assert list(tools) == ["mcp__tiny__add", "mcp__tiny__fail", "mcp__tiny__crash"]  # both pages
    assert tools["mcp__tiny__add"].read_only and not tools["mcp__tiny__fail"].read_only
    assert tools["mcp__tiny__add"].input_schema["required"] == ["a", "b"]
    assert tools["mcp__tiny__fail"].input_schema == {"type": "object", "properties": {}}
    assert added.content == "5.5" and not added.is_error
    assert failed.is_error and failed.content == "it broke"
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m.get("method") for m in sent[:4]] == ["initialize", "notifications/initialized", "tools/list", "tools/list"]
    init = sent[0]
    assert init["jsonrpc"] == "2.0" and init["params"]["clientInfo"]["name"] and "id" not in sent[1]
    assert {"jsonrpc": "2.0", "id": "srv-1", "result": {}} in sent  # the server's ping was answered


def test_agent_uses_mcp_tools_from_a_config_file(server, tmp_path):
    command, _ = server
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"tiny": {"command": command[0], "args": command[1:]}}}))

    def script(body):
        results = last_results(body)
        if not results:
            return Reply([tool("mcp__tiny__add", {"a": 40, "b": 2})])
        return Reply([text(f"sum is {result_text(results[0])}")])

    with ScriptedEndpoint(script) as ep:
        out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "add 40 and 2", "--base-url", ep.url,
                              "--model-name", "scripted", "--mcp-config", str(config), "--workdir", str(tmp_path),
                              "--db", str(tmp_path / "s.db"), "-q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sum is 42"
    assert "mcp__tiny__add" in [t["name"] for t in ep.requests[0]["tools"]]


CHANGING = r'''
import json, sys
log = open(sys.argv[1], "a")
def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n"); sys.stdout.flush()
def tool(name, **props):
    return {"name": name, "description": name, "inputSchema": {"type": "object", "properties": props}}
tools = [tool("grow"), tool("shrink"), tool("where")]
EXTRA = tool("extra", n={"type": "integer"})
asked = {}
for line in sys.stdin:
    msg = json.loads(line)
    log.write(json.dumps(msg) + "\n"); log.flush()
    method, mid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": msg["params"]["protocolVersion"],
              "capabilities": {"tools": {"listChanged": True}, "logging": {}},
              "serverInfo": {"name": "changing", "version": "1"}}})
    elif method == "tools/list":  # one tool per page
        i = int(msg["params"].get("cursor") or 0)
        result = {"tools": tools[i:i + 1]}
        if i + 1 < len(tools):
            result["nextCursor"] = str(i + 1)
        send({"jsonrpc": "2.0", "id": mid, "result": result})
    elif method == "tools/call":
        name, args = msg["params"]["name"], msg["params"]["arguments"]
        if name in ("grow", "shrink"):
            if name == "grow":
                tools.append(EXTRA)
            else:
                tools.remove(EXTRA)
            send({"jsonrpc": "2.0", "method": "notifications/message",
                  "params": {"level": "warning", "logger": "changer", "data": name + " changes the tools"}})
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": name + " done"}]}})
        elif name == "extra" and EXTRA in tools:
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text",
                  "text": "extra ran with %d" % args["n"]}]}})
        elif name == "where":
            asked["roots-1"] = mid
            send({"jsonrpc": "2.0", "id": "roots-1", "method": "roots/list"})
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32602, "message": "unknown tool " + name}})
    elif mid in asked:  # the client's answer to roots/list
        send({"jsonrpc": "2.0", "id": asked.pop(mid), "result": {"content": [{"type": "text",
              "text": json.dumps(msg.get("result") or msg.get("error"))}]}})
'''


def test_agent_offers_a_changed_tool_list_from_the_next_step(tmp_path):
    """A stdio server adds a tool during a call and announces it: the next request to the model
    lists it and a call to it works; then it removes it: the next request no longer lists it and a
    call to it is a clear error. The server's roots/list gets the work directory; its log message
    and the changes are in the session's events."""
    from urllib.parse import quote

    from moonlet.agent.store import SessionStore
    script_path = tmp_path / "changing_mcp.py"
    script_path.write_text(CHANGING)
    log = tmp_path / "changing.log"
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"ch": {"command": sys.executable,
                                                        "args": [str(script_path), str(log)]}}}))
    work = tmp_path / "work dir"
    work.mkdir()
    replies = [tool("mcp__ch__grow", {}), tool("mcp__ch__extra", {"n": 7}), tool("mcp__ch__shrink", {}),
               tool("mcp__ch__extra", {"n": 1}), tool("mcp__ch__where", {}), text("done")]

    def script(body):
        return Reply([replies[sum(m["role"] == "assistant" for m in body["messages"])]])

    with ScriptedEndpoint(script) as ep:
        out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "change tools", "--base-url", ep.url,
                              "--model-name", "scripted", "--mcp-config", str(config), "--workdir", str(work),
                              "--db", str(tmp_path / "s.db"), "--yolo", "-q"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    offered = [{t["name"] for t in r["tools"] if t["name"].startswith("mcp__")} for r in ep.requests]
    base = {"mcp__ch__grow", "mcp__ch__shrink", "mcp__ch__where"}
    assert offered == [base, base | {"mcp__ch__extra"}, base | {"mcp__ch__extra"}, base, base, base]
    results = [result_text(last_results(r)[0]) for r in ep.requests[1:]]
    assert results[:3] == ["grow done", "extra ran with 7", "shrink done"]
    assert "'mcp__ch__extra' is no longer available: MCP server 'ch' no longer offers it" in results[3]
    assert last_results(ep.requests[4])[0].get("is_error")
    uri = "file://" + quote(os.path.realpath(work))
    assert json.loads(results[4]) == {"roots": [{"uri": uri, "name": "work dir"}]}

    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert sent[0]["params"]["capabilities"] == {"roots": {"listChanged": False}}
    calls = [m["params"]["name"] for m in sent if m.get("method") == "tools/call"]
    assert calls == ["grow", "extra", "shrink", "where"]  # the stale call never reached the server
    lists = [m["params"].get("cursor") for m in sent if m.get("method") == "tools/list"]
    assert lists == [None, "1", "2", None, "1", "2", "3", None, "1", "2"]  # every page, each time

    store = SessionStore(tmp_path / "s.db")
    events = store.events(store.list_sessions()[0]["id"])
    changes = [e["data"] for e in events if e["kind"] == "tools_changed"]
    assert changes == [{"added": ["mcp__ch__extra"], "removed": []}, {"added": [], "removed": ["mcp__ch__extra"]}]
    logged = [e["data"] for e in events if e["kind"] == "mcp_notification"]
    assert [(n["server"], n["level"], n["logger"], n["data"]) for n in logged] == [
        ("ch", "warning", "changer", "grow changes the tools"), ("ch", "warning", "changer", "shrink changes the tools")]
