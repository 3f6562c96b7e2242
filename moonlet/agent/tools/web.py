"""web_fetch: read a web page or any http(s) resource as text.

HTML becomes a compact Markdown-like text (headings, paragraphs, list items, links with absolute
URLs, code blocks kept verbatim; scripts, styles and other non-content elements dropped) so that the
model reads the page rather than its markup. Other text types (plain, JSON, XML, CSV, JavaScript)
come back as they are, decoded with the charset the server declares; images as image blocks for
models with vision (else described, see images.py); any other binary type is refused with its type
and size. Redirects are followed (at most ``MAX_REDIRECTS``), downloads stop at ``MAX_BYTES``, and
long texts come in windows of ``max_chars`` with the ``start`` of the next window named, as
read_file pages through long files. The fetch needs approval under the ``reads`` policy: it reaches
the network.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

from ..images import image_content, sniff
from .base import Tool, ToolContext, ToolError, ToolResult

MAX_BYTES = 5_000_000
MAX_REDIRECTS = 5
DEFAULT_CHARS = 40_000
MAX_CHARS = 200_000
TIMEOUT = 30.0

_SKIP = {"script", "style", "noscript", "template", "svg", "head", "iframe", "canvas", "form", "button", "select"}
_BLOCK = {"p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "table", "dl", "dt",
          "dd", "blockquote", "figure", "figcaption", "details", "summary", "hr", "address"}
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-javascript",
               "application/ecmascript", "application/x-yaml", "application/yaml", "application/toml",
               "application/ld+json", "application/rss+xml", "application/atom+xml", "application/csv")


class _PageText(HTMLParser):
    """HTML -> Markdown-like text. Whitespace collapses outside <pre>; block elements start new
    paragraphs; <a href> becomes [text](absolute url); <img alt> becomes ![alt]."""

    def __init__(self, base_url: str):
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.links: list[tuple[str | None, int]] = []  # (href, position in out where the link text starts)
        self.title = ""
        self._in_title = False
        self.lists: list[list] = []  # per open list: [ordered, next number]
        self.started = False  # some text was written (no blank lines before the first)

    def _ending(self, n: int) -> str:
        """The last ``n`` characters written (without joining the whole page: pages can be megabytes)."""
        tail = ""
        for piece in reversed(self.out):
            tail = piece + tail
            if len(tail) >= n:
                break
        return tail[-n:]

    def _newlines(self, n: int) -> None:
        tail = self._ending(n)
        have = len(tail) - len(tail.rstrip("\n"))
        if self.started and have < n:
            self.out.append("\n" * (n - have))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "title":
            self._in_title = True
        if tag in _SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._newlines(2)
            self.out.append("#" * int(tag[1]) + " ")
        elif tag == "pre":
            self._newlines(2)
            self.out.append("```\n")
            self.pre += 1
        elif tag in ("ul", "ol"):
            self._newlines(1)
            self.lists.append([tag == "ol", 1])
        elif tag == "li":
            self._newlines(1)
            indent = "  " * max(0, len(self.lists) - 1)
            if self.lists and self.lists[-1][0]:
                self.out.append(f"{indent}{self.lists[-1][1]}. ")
                self.lists[-1][1] += 1
            else:
                self.out.append(f"{indent}- ")
        elif tag == "br":
            self.out.append("\n")
        elif tag == "tr":
            self._newlines(1)
        elif tag in ("td", "th"):
            self.out.append("| " if self._ending(1) in ("\n", "") else " | ")
        elif tag in _BLOCK:
            self._newlines(2)
        elif tag == "a":
            self.links.append((a.get("href"), len(self.out)))
        elif tag == "img" and a.get("alt"):
            self.out.append(f"![{a['alt']}]")
        elif tag == "code" and not self.pre:
            self.out.append("`")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._newlines(2)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            if not self._ending(1) == "\n":
                self.out.append("\n")
            self.out.append("```")
            self._newlines(2)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._newlines(2 if not self.lists else 1)
        elif tag == "tr":
            self.out.append(" |")
            self._newlines(1)
        elif tag in _BLOCK:
            self._newlines(2)
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = "".join(self.out[start:]).strip()
            del self.out[start:]
            if href and not href.startswith(("javascript:", "#")):
                url = urljoin(self.base_url, href)
                self.out.append(f"[{label or url}]({url})")
            else:
                self.out.append(label)
        elif tag == "code" and not self.pre:
            self.out.append("`")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self.skip:
            return
        if self.pre:
            self.out.append(data)
            self.started = True
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip():
            if text and self.out and not self.out[-1].endswith((" ", "\n")):
                self.out.append(" ")
            return
        if self._ending(1) in ("\n", ""):
            text = text.lstrip()
        self.out.append(text)
        self.started = True

    def text(self) -> str:
        body = "".join(self.out)
        lines = [line.rstrip() for line in body.split("\n")]
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        title = re.sub(r"\s+", " ", self.title).strip()
        return f"Title: {title}\n\n{body}" if title else body


def html_to_text(html: str, base_url: str = "") -> str:
    """The readable text of an HTML page (see ``_PageText``)."""
    parser = _PageText(base_url)
    parser.feed(html)
    parser.close()
    return parser.text()


class WebFetchTool(Tool):
    name = "web_fetch"
    description = ("Fetch an http(s) URL as text (HTML converted to readable text with absolute links; JSON, XML "
                   "and plain text as is; images as images). Long content comes in windows: the reply names the "
                   "`start` that reads on.")
    input_schema = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "an http:// or https:// URL"},
            "start": {"type": "integer", "minimum": 0, "description": "character offset (default 0)"},
            "max_chars": {"type": "integer", "minimum": 1, "maximum": MAX_CHARS,
                          "description": f"default {DEFAULT_CHARS}"},
            "raw": {"type": "boolean", "description": "HTML as it is (default false)"},
        },
        "required": ["url"],
    }
    read_only = False  # reaches the network: asks under the `reads` policy
    parallel_safe = True

    def __init__(self, timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES):
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def _download(self, url: str) -> tuple[object, bytes, bool]:
        import httpx

        headers = {"User-Agent": "moonlet-agent (web_fetch)", "Accept": "text/html,text/*;q=0.9,*/*;q=0.8"}
        try:
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS,
                                         timeout=self.timeout, headers=headers) as client:
                async with client.stream("GET", url) as response:
                    chunks, size, cut = [], 0, False
                    async for chunk in response.aiter_bytes():
                        chunks.append(chunk)
                        size += len(chunk)
                        if size >= self.max_bytes:
                            cut = True
                            break
                    return response, b"".join(chunks)[:self.max_bytes], cut
        except httpx.TooManyRedirects:
            raise ToolError(f"{url}: more than {MAX_REDIRECTS} redirects") from None
        except httpx.TimeoutException:
            raise ToolError(f"{url}: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise ToolError(f"{url}: could not fetch it ({type(e).__name__}: {e})") from None

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        url = args["url"].strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ToolError(f"{url!r} is not an http(s) URL; give a full URL such as https://example.com/page")
        start = args.get("start", 0)
        limit = args.get("max_chars", DEFAULT_CHARS)
        response, data, cut = await self._download(url)
        final = str(response.url)
        ctype = response.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        head = f"{final}" + (f" (redirected from {url})" if final != url else "") + f" · HTTP {response.status_code}"
        if response.status_code >= 400:
            excerpt = data[:2000].decode(response.encoding or "utf-8", errors="replace")
            if media in ("text/html", "application/xhtml+xml"):
                excerpt = html_to_text(excerpt, final)[:1000]
            return ToolResult(f"{head} · the server refused or failed the request\n\n{excerpt.strip()}", is_error=True)
        image = sniff(data)
        if image is not None or media.startswith("image/"):
            if image is None:
                raise ToolError(f"{head}: {media} content of {len(data)} bytes is not an image format the model reads "
                                "(PNG, JPEG, GIF, WebP)")
            return ToolResult(image_content(data, image, final, ctx.can_see))
        is_text = (media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml"))
                   or (not media and b"\x00" not in data[:4096]))
        if not is_text:
            raise ToolError(f"{head}: {media or 'unknown'} content ({len(data):,} bytes) is binary and cannot be shown "
                            "as text")
        encoding = response.charset_encoding or ("utf-8" if media != "text/html" else response.encoding) or "utf-8"
        try:
            text = data.decode(encoding, errors="replace")
        except LookupError:
            text = data.decode("utf-8", errors="replace")
        if media in ("text/html", "application/xhtml+xml") and not args.get("raw"):
            text = html_to_text(text, final)
        total = len(text)
        if start >= total and total:
            raise ToolError(f"start={start} is past the end: the content has {total:,} characters")
        window = text[start:start + limit]
        notes = [f"{head} · {media or 'no content type'} · {total:,} characters"
                 + (f" (showing {start:,}–{start + len(window):,})" if start or len(window) < total else "")]
        if cut:
            notes.append(f"[the download stopped at {self.max_bytes:,} bytes; the rest of the resource is not here]")
        body = "\n\n".join([notes[0], window] + notes[1:])
        if start + len(window) < total:
            body += f"\n\n[{total - start - len(window):,} more characters: call web_fetch again with start={start + len(window)}]"
        return ToolResult(body)
