"""Token counting for compaction decisions.

The exact count comes from the server's `/v1/messages/count_tokens`. Asking on every step would
double the requests, so the agent first makes a conservative estimate — one token per 3 characters
of the request's JSON (system, messages, tools), which over-counts ordinary text for BPE
vocabularies of K2's size (about 4 characters per token) — and asks the server only when the estimate
comes near a limit. Without count_tokens the estimate is used as is.

Images are not counted by their base64 text (a 200 KB screenshot would look like 90,000 tokens): each
image block counts what K2.5 spends on an image of its size (`images.block_tokens`), and its data is
left out of the character count."""

from __future__ import annotations

import json
import math

from .images import block_tokens

CHARS_PER_TOKEN = 3.0


def estimate_text(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _without_images(value, found: list[dict]):
    """A copy of `value` whose image blocks' data is emptied; the image blocks go to `found`."""
    if isinstance(value, list):
        return [_without_images(v, found) for v in value]
    if isinstance(value, dict):
        if value.get("type") == "image" and isinstance(value.get("source"), dict):
            found.append(value)
            return {"type": "image"}
        if "content" in value and isinstance(value["content"], list):
            return dict(value, content=_without_images(value["content"], found))
    return value


def estimate_content(content) -> int:
    """Estimated tokens of one message's content (string or blocks, images counted as images)."""
    images: list[dict] = []
    stripped = _without_images(content, images)
    return estimate_text(json.dumps(stripped, ensure_ascii=False, separators=(",", ":"))) + \
        sum(block_tokens(b) for b in images)


def estimate_request(request: dict) -> int:
    parts = {k: request[k] for k in ("system", "messages", "tools") if k in request}
    images: list[dict] = []
    if "messages" in parts:
        parts["messages"] = _without_images(parts["messages"], images)
    return estimate_text(json.dumps(parts, ensure_ascii=False, separators=(",", ":"))) + \
        sum(block_tokens(b) for b in images)


class TokenCounter:
    def __init__(self, client=None):
        self.client = client

    async def count(self, request: dict, exact_above: int | None = 0) -> tuple[int, bool]:
        """(tokens, exact). The server is asked only when the estimate is at least `exact_above`
        (0: always; None: never)."""
        estimate = estimate_request(request)
        if self.client is None or exact_above is None or estimate < exact_above:
            return estimate, False
        exact = await self.client.count_tokens(request)
        return (exact, True) if exact is not None else (estimate, False)
