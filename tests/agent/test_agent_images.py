"""Images in the agent's context: read_file and MCP image content become Anthropic image blocks for a
model with vision and text notes otherwise; large images are downscaled; the file type comes from the
bytes; token estimates count images as K2.5 does; compaction keeps the images of the kept turns and
names older ones; sessions keep image blocks through resume. Images are written with Pillow and
checked by decoding what the endpoint received."""

import asyncio
import base64
import io
import json
import random
import subprocess
import sys

import pytest
from agent_scripted import Reply, ScriptedEndpoint, blocks, last_results, make_agent, text, tool, tool_results
from PIL import Image

from moonlet.agent import images
from moonlet.agent.store import SessionStore
from moonlet.agent.tokens import estimate_request, estimate_text
from moonlet.agent.tools import ToolContext, Workspace
from moonlet.agent.tools.files import ReadFileTool
from moonlet.agent.prompts import SUMMARY_SYSTEM


def png(path, size=(8, 6), color=(200, 30, 30), mode="RGB", noise=False) -> bytes:
    img = Image.new(mode, size, color)
    if noise:
        img = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def read(tmp_path, name, vision):
    return asyncio.run(ReadFileTool().run({"path": name}, ToolContext(Workspace(tmp_path), vision=vision)))


def image_blocks(content) -> list[dict]:
    return [b for b in content if b.get("type") == "image"] if isinstance(content, list) else []


def decoded(block) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block["source"]["data"])))


def test_read_file_png_is_an_image_block_with_vision_and_a_note_without(tmp_path):
    data = png(tmp_path / "shot.png", (8, 6))
    on = read(tmp_path, "shot.png", True)
    (img,) = image_blocks(on.content)
    assert img["source"]["type"] == "base64" and img["source"]["media_type"] == "image/png"
    assert base64.b64decode(img["source"]["data"]) == data           # the file itself, unchanged
    assert on.content[0]["type"] == "text" and "shot.png" in on.content[0]["text"] and "8x6" in on.content[0]["text"]
    off = read(tmp_path, "shot.png", False)
    assert isinstance(off.content, list) and not image_blocks(off.content)
    note = off.content[0]["text"]
    assert "this model cannot see images" in note and f"{len(data):,}-byte PNG, 8x6" in note


@pytest.mark.parametrize("fmt,media", [("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
                                       ("PNG", "image/png")])
def test_magic_bytes_and_header_sizes_match_pillow(tmp_path, fmt, media):
    buf = io.BytesIO()
    Image.new("RGB", (37, 21), (10, 200, 90)).save(buf, fmt)
    data = buf.getvalue()
    assert images.sniff(data) == media
    assert images.image_size(data) == Image.open(io.BytesIO(data)).size == (37, 21)
    (tmp_path / "picture.bin").write_bytes(data)                        # the name says nothing
    (img,) = image_blocks(read(tmp_path, "picture.bin", True).content)
    assert img["source"]["media_type"] == media and base64.b64decode(img["source"]["data"]) == data


def test_a_png_named_file_that_holds_text_is_read_as_text(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\nsecond line\n")
    out = read(tmp_path, "notes.png", True)
    assert out.content == "     1\tnot an image\n     2\tsecond line"


def test_large_images_are_downscaled_under_the_limit(tmp_path):
    png(tmp_path / "wide.png", (2400, 1200), noise=True)
    png(tmp_path / "tall.png", (20, 9000))                              # over the server's 8000 px a side
    for name, expect in (("wide.png", (1568, 784)), ("tall.png", (3, 1568))):
        out = read(tmp_path, name, True)
        (img,) = image_blocks(out.content)
        small = decoded(img)
        assert small.size == expect and max(small.size) <= images.MAX_LONG_SIDE
        assert len(base64.b64decode(img["source"]["data"])) <= images.MAX_IMAGE_BYTES
        assert f"downscaled to {expect[0]}x{expect[1]}" in out.content[0]["text"]
    # the picture survives the downscale: the top-left pixel of a two-colour image keeps its colour
    im = Image.new("RGB", (3200, 1600), (0, 0, 255))
    im.paste((255, 255, 0), (1600, 0, 3200, 1600))
    im.save(tmp_path / "halves.png")
    small = decoded(image_blocks(read(tmp_path, "halves.png", True).content)[0]).convert("RGB")
    assert small.getpixel((10, 10)) == (0, 0, 255) and small.getpixel((small.width - 10, 10)) == (255, 255, 0)


def test_image_token_estimate_follows_the_k25_processor():
    from moonlet.multimodal import plan_resize
    for w, h in [(1, 1), (8, 6), (27, 29), (640, 480), (1568, 784), (1920, 1080), (4000, 3000), (7000, 20), (20, 9000)]:
        assert images.image_tokens(w, h) == plan_resize(w, h).num_tokens, (w, h)


def test_request_estimate_counts_an_image_by_its_size_not_its_base64(tmp_path):
    data = png(tmp_path / "big.png", (1000, 800), noise=True)
    b64 = base64.b64encode(data).decode()
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    req = {"system": "s", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "x"}, block]}]}]}
    empty = {"system": "s", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}]}]}
    assert len(b64) > 1_000_000
    assert estimate_request(req) == estimate_request(empty) + images.image_tokens(1000, 800)
    assert estimate_request(req) < estimate_text(b64) / 100


def test_agent_sends_the_image_to_a_vision_model_and_a_note_otherwise(tmp_path):
    data = png(tmp_path / "plot.png", (12, 10), (0, 128, 255))

    def script(body):
        if not tool_results(body):
            return Reply([tool("read_file", {"path": "plot.png"})])
        return Reply([text("seen")])

    for vision in (True, False):
        with ScriptedEndpoint(script) as ep:
            agent = make_agent(ep.url, tmp_path, only={"read_file"}, vision=vision)
            asyncio.run(agent.run("look at plot.png"))
            asyncio.run(agent.client.aclose())
        (result,) = last_results(ep.requests[1])
        sent = image_blocks(result["content"])
        if vision:
            assert len(sent) == 1 and set(sent[0]) == {"type", "source"}     # the private _source is not sent
            assert base64.b64decode(sent[0]["source"]["data"]) == data
        else:
            assert sent == [] and "cannot see images" in json.dumps(result)
        call = agent.store.tool_calls(agent.session_id)[0]
        if vision:  # the call record keeps the size, the transcript message keeps the bytes
            assert "bytes of base64" in image_blocks(call["result"])[0]["source"]["data"]


MCP_SERVER = r'''
import base64, json, sys
PNG = base64.b64decode(sys.argv[1])
def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    msg = json.loads(line)
    method, mid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": msg["params"]["protocolVersion"],
              "capabilities": {"tools": {}}, "serverInfo": {"name": "cam", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": [{"name": "snap", "inputSchema": {"type": "object"}}]}})
    elif method == "tools/call":
        send({"jsonrpc": "2.0", "id": mid, "result": {"content": [
            {"type": "text", "text": "a snapshot"},
            {"type": "image", "data": base64.b64encode(PNG).decode(), "mimeType": "image/png"},
            {"type": "image", "data": "%%% not base64", "mimeType": "image/png"}]}})
'''


def test_mcp_image_content_passes_through_under_the_same_rule(tmp_path):
    from moonlet.agent.tools.mcp import McpServerConfig, start_mcp_servers

    data = png(tmp_path / "p.png", (9, 7), (1, 2, 3))
    (tmp_path / "cam.py").write_text(MCP_SERVER)

    async def go():
        clients, tools = await start_mcp_servers(
            [McpServerConfig("cam", [sys.executable, str(tmp_path / "cam.py"), base64.b64encode(data).decode()])])
        try:
            (snap,) = tools
            return [await snap.run({}, ToolContext(Workspace(tmp_path), vision=v)) for v in (True, False)]
        finally:
            for c in clients:
                await c.close()

    on, off = asyncio.run(go())
    (img,) = image_blocks(on.content)
    assert img["source"]["media_type"] == "image/png" and base64.b64decode(img["source"]["data"]) == data
    texts = [b["text"] for b in on.content if b["type"] == "text"]
    assert texts[0] == "a snapshot" and any("not valid base64" in t for t in texts)
    assert isinstance(off.content, str) and "cannot see images" in off.content and "9x7" in off.content


def test_compaction_keeps_tail_images_and_names_older_ones(tmp_path):
    for i in range(8):
        png(tmp_path / f"shot{i}.png", (6 + i, 5), (i * 30, 0, 0))
        (tmp_path / f"part{i}.txt").write_text("".join(f"part {i} line {j} " + "z" * 100 + "\n" for j in range(10)))
    agent_calls, summaries = [], []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            summaries.append(body)
            return Reply([text("## Current focus\n- screenshots")])
        k = len(agent_calls)
        agent_calls.append(body)
        if k < 8:
            return Reply([tool("read_file", {"path": f"part{k}.txt"}), tool("read_file", {"path": f"shot{k}.png"})])
        return Reply([text("done")])

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, context_window=3000, max_tokens=200, vision=True)
        try:
            return agent, await agent.run("look at every screenshot")
        finally:
            await agent.client.aclose()

    with ScriptedEndpoint(script, window=3000) as ep:
        agent, result = asyncio.run(go(ep.url))
    assert result.text == "done" and ep.oversized == [] and summaries
    summarized = "\n".join(m["content"] for s in summaries for m in s["messages"])
    assert "[image: shot0.png]" in summarized and "base64" not in summarized
    last = agent_calls[-1]["messages"]
    assert "Context compacted" in json.dumps(last[0])
    # every image result in the kept tail still carries its image, and it is the right file
    kept = [(b["tool_use_id"], r) for m in last for b in blocks(m) if b["type"] == "tool_result"
            for r in image_blocks(b["content"])]
    assert kept
    names = {b["id"]: b["input"]["path"] for m in last if m["role"] == "assistant" for b in blocks(m)
             if b["type"] == "tool_use"}
    for use_id, img in kept:
        assert base64.b64decode(img["source"]["data"]) == (tmp_path / names[use_id]).read_bytes()
    assert any(k.get("images") for c in agent.store.compactions(agent.session_id) for k in c["kept"])


def test_resume_keeps_the_image_block(tmp_path):
    data = png(tmp_path / "diagram.png", (10, 4), (5, 250, 5))
    db = tmp_path / "s.db"

    def script(body):
        n = len(tool_results(body))
        return Reply([tool("read_file", {"path": "diagram.png"})]) if n == 0 else Reply([text(f"answer {n}")])

    with ScriptedEndpoint(script) as ep:
        async def first():
            agent = make_agent(ep.url, tmp_path, SessionStore(db), only={"read_file"}, vision=True)
            await agent.run("describe diagram.png")
            await agent.client.aclose()
            agent.store.close()
            return agent.session_id

        sid = asyncio.run(first())
        (tmp_path / "diagram.png").unlink()           # the transcript holds the image, not a reference

        async def second():
            from moonlet.agent import Agent, AnthropicClient, ApprovalPolicy, Workspace, make_tools
            store = SessionStore(db)
            client = AnthropicClient(ep.url)
            agent = Agent.restore(store, sid, client, make_tools(), Workspace(tmp_path),
                                  approval=ApprovalPolicy("yolo"))
            await agent.run("and again?")
            await client.aclose()
            store.close()
            return agent

        agent = asyncio.run(second())
    assert agent.config.vision
    resent = [r for m in ep.requests[-1]["messages"] for b in blocks(m) if b["type"] == "tool_result"
              for r in image_blocks(b["content"])]
    assert len(resent) == 1 and base64.b64decode(resent[0]["source"]["data"]) == data
    export = subprocess.run([sys.executable, "-m", "moonlet", "agent", "export", sid, "--db", str(db)],
                            capture_output=True, text=True, timeout=60).stdout
    rows = [json.loads(l) for l in export.splitlines()]
    stored = [r for row in rows if row["type"] == "message" and row["kind"] == "results"
              for b in row["content"] for r in image_blocks(b["content"])]
    assert base64.b64decode(stored[0]["source"]["data"]) == data


def test_cli_vision_flag_and_model_info(tmp_path):
    from moonlet.agent.cli import vision_from_model_info
    assert vision_from_model_info({"id": "m", "max_input_tokens": 5}) is None
    assert vision_from_model_info({"capabilities": {"vision": True}}) is True
    assert vision_from_model_info({"input_modalities": ["text"]}) is False
    assert vision_from_model_info({"capabilities": ["tools", "vision"]}) is True

    data = png(tmp_path / "x.png", (4, 4))

    def script(body):
        if not tool_results(body):
            return Reply([tool("read_file", {"path": "x.png"})])
        return Reply([text("ok")])

    with ScriptedEndpoint(script) as ep:
        for flag in ("--vision", None):
            out = subprocess.run([sys.executable, "-m", "moonlet", "agent", "run", "see x.png", "--base-url", ep.url,
                                  "--model-name", "scripted", "--workdir", str(tmp_path), "--db", str(tmp_path / "s.db"),
                                  "-q", "--no-hooks"] + ([flag] if flag else []),
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
    with_flag, without = ep.requests[1], ep.requests[3]
    (img,) = image_blocks(last_results(with_flag)[0]["content"])
    assert base64.b64decode(img["source"]["data"]) == data
    assert "cannot see images" in json.dumps(last_results(without)[0])


def test_an_image_the_window_cannot_hold_is_replaced_by_a_note_not_dropped_silently(tmp_path):
    png(tmp_path / "huge.png", (1568, 1568), (9, 9, 9))       # 3,136 tokens by the K2.5 rule
    assert images.image_tokens(1568, 1568) == 3136
    seen = []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            return Reply([text("## Current focus\n- the picture")])
        seen.append(body)
        return Reply([tool("read_file", {"path": "huge.png"})]) if len(seen) == 1 else Reply([text("ok")])

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, context_window=3500, max_tokens=200, vision=True)
        try:
            return agent, await agent.run("look")
        finally:
            await agent.client.aclose()

    with ScriptedEndpoint(script) as ep:
        agent, result = asyncio.run(go(ep.url))
    assert result.text == "ok"
    (dropped,) = [e["data"] for e in agent.store.events(agent.session_id) if e["kind"] == "images_dropped"]
    assert dropped["images"] == ["huge.png"]
    final = json.dumps(seen[-1]["messages"], ensure_ascii=False)
    assert '"type": "image"' not in final and "[image: huge.png — removed by compaction" in final
    # the transcript itself still holds the image (only the working context lost it)
    assert any(image_blocks(b["content"]) for m in agent.store.messages(agent.session_id) if m["kind"] == "results"
               for b in m["content"])
