"""web_fetch against a real HTTP server on localhost (the standard library's http.server): HTML
converted to text, other text types as they are, charsets, redirects, errors, images, binary
refusals, windows over long content and the download cap; and the tool inside the agent loop."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moonlet.agent.images import sniff
from moonlet.agent.tools import ToolContext, ToolError, Workspace
from moonlet.agent.tools.web import WebFetchTool, html_to_text

PAGE = """<!doctype html><html><head><title>Guide  page</title><style>p { color: red }</style>
<script>document.write("hidden")</script></head><body>
<nav><a href="/">Home</a></nav>
<h1>Install <em>moonlet</em></h1>
<p>Run   the <a href="docs/setup.html">setup</a> first, then <code>moonlet serve</code>.</p>
<ul><li>CPU</li><li>GPU<ol><li>H100</li><li>H200</li></ol></li></ul>
<pre>pip install moonlet
  moonlet serve</pre>
<table><tr><th>flag</th><th>default</th></tr><tr><td>-tp</td><td>1</td></tr></table>
<p>Fish &amp; chips &lt;3<br>next line</p><img src="a.png" alt="architecture">
</body></html>"""

EXPECTED = """Title: Guide page

[Home](BASE/)

# Install moonlet

Run the [setup](BASE/guide/docs/setup.html) first, then `moonlet serve`.

- CPU
- GPU
  1. H100
  2. H200

```
pip install moonlet
  moonlet serve
```

| flag | default |
| -tp | 1 |

Fish & chips <3
next line

![architecture]"""

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82")

ROUTES = {
    "/guide/page.html": (200, "text/html; charset=utf-8", PAGE.encode()),
    "/data.json": (200, "application/json", json.dumps({"a": [1, 2], "b": "ü"}).encode()),
    "/latin1.txt": (200, "text/plain; charset=iso-8859-1", "café crème".encode("latin-1")),
    "/long.txt": (200, "text/plain", ("0123456789" * 1000).encode()),
    "/missing": (404, "text/html", b"<html><body><h1>Not found</h1><p>No such page.</p></body></html>"),
    "/img": (200, "image/png", PNG),
    "/archive.zip": (200, "application/zip", b"PK\x03\x04" + bytes(200)),
    "/huge.txt": (200, "text/plain", b"y" * 300_000),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/old":
            self.send_response(301)
            self.send_header("Location", "/guide/page.html")
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        status, ctype, body = ROUTES.get(self.path, (404, "text/plain", b"nothing here"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(args, vision=False, tool=None):
    ctx = ToolContext(Workspace("."), vision=vision)
    return asyncio.run((tool or WebFetchTool()).run(args, ctx))


def test_html_page_becomes_readable_text(base):
    out = fetch({"url": f"{base}/guide/page.html"})
    assert not out.is_error
    header, body = out.content.split("\n\n", 1)
    assert header.startswith(f"{base}/guide/page.html · HTTP 200 · text/html")
    assert body == EXPECTED.replace("BASE", base)
    assert "hidden" not in body and "color" not in body
    raw = fetch({"url": f"{base}/guide/page.html", "raw": True})
    assert "<script>" in raw.content


def test_redirects_text_types_and_charsets(base):
    moved = fetch({"url": f"{base}/old"})
    assert f"{base}/guide/page.html (redirected from {base}/old)" in moved.content
    assert "# Install moonlet" in moved.content
    data = fetch({"url": f"{base}/data.json"})
    assert json.loads(data.content.split("\n\n", 1)[1]) == {"a": [1, 2], "b": "ü"}
    assert "café crème" in fetch({"url": f"{base}/latin1.txt"}).content


def test_long_content_comes_in_windows(base):
    first = fetch({"url": f"{base}/long.txt", "max_chars": 4000})
    assert "10,000 characters (showing 0–4,000)" in first.content
    assert first.content.endswith("[6,000 more characters: call web_fetch again with start=4000]")
    pieces = []
    start = 0
    while True:
        out = fetch({"url": f"{base}/long.txt", "max_chars": 4000, "start": start}).content
        pieces.append(out.split("\n\n")[1])
        if "call web_fetch again" not in out:
            break
        start = int(out.rsplit("start=", 1)[1].rstrip("]"))
    assert "".join(pieces) == "0123456789" * 1000
    with pytest.raises(ToolError, match="start=20000 is past the end"):
        fetch({"url": f"{base}/long.txt", "start": 20000})
    capped = fetch({"url": f"{base}/huge.txt"}, tool=WebFetchTool(max_bytes=100_000))
    assert "download stopped at 100,000 bytes" in capped.content


def test_errors_images_and_binary(base):
    missing = fetch({"url": f"{base}/missing"})
    assert missing.is_error and "HTTP 404" in missing.content and "No such page." in missing.content
    with pytest.raises(ToolError, match="more than 5 redirects"):
        fetch({"url": f"{base}/loop"})
    with pytest.raises(ToolError, match="not an http"):
        fetch({"url": "file:///etc/passwd"})
    with pytest.raises(ToolError, match="application/zip content .* is binary"):
        fetch({"url": f"{base}/archive.zip"})
    with pytest.raises(ToolError, match="could not fetch it"):
        fetch({"url": "http://127.0.0.1:9/"})
    seen = fetch({"url": f"{base}/img"}, vision=True)
    assert sniff(PNG) == "image/png"
    assert any(b.get("type") == "image" for b in seen.content)
    described = fetch({"url": f"{base}/img"}, vision=False)
    assert not any(b.get("type") == "image" for b in described.content)


def test_html_conversion_details():
    assert html_to_text("<p>a <a href='javascript:void(0)'>b</a> <a href='#x'>c</a></p>") == "a b c"
    assert html_to_text("<div>one</div><div>two</div>") == "one\n\ntwo"
    assert html_to_text("<p>x<span>\n\n  y</span></p>") == "x y"


def test_agent_uses_web_fetch(base, tmp_path):
    from agent_scripted import Reply, ScriptedEndpoint, last_results, make_agent, result_text, text, tool

    def script(body):
        results = last_results(body)
        if results:
            return Reply([text("page says: " + result_text(results[0]).split("\n")[2])])
        return Reply([tool("web_fetch", {"url": f"{base}/guide/page.html"})])

    async def go(url):
        agent = make_agent(url, tmp_path)
        try:
            return await agent.run("read the guide")
        finally:
            await agent.close()

    with ScriptedEndpoint(script) as ep:
        result = asyncio.run(go(ep.url))
    assert "web_fetch" in [t["name"] for t in ep.requests[0]["tools"]]
    assert result.text == "page says: Title: Guide page"
