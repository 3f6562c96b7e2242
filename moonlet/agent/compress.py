"""The context compressor.

A compacted context is one synthesized user message (the "head") followed by the last K turns
verbatim. The head holds, in order: the user's original task and later user messages verbatim (up to
a token cap; the first task always), the summary of everything else in six fixed sections, the pinned
notes and the to-do list. The kept tail always starts at an assistant message, so a tool_use is never
separated from its tool_result. The summary is written by the model; the transcript it summarizes
is cut into chunks that each fit the window with room for the reply, and folded in one after
another (each request carries the summary so far), so the compression request cannot overflow."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .client import APIError
from .prompts import COMPACTED_HEADER, SUMMARY_INSTRUCTIONS, SUMMARY_SECTIONS, SUMMARY_SYSTEM
from .tokens import estimate_content, estimate_request

if TYPE_CHECKING:
    from .loop import Agent


@dataclass
class CompactionConfig:
    threshold: float = 0.85          # compact when the context reaches this fraction of the window
    keep_turns: int = 2              # assistant turns (with their tool results) kept verbatim
    target_fraction: float = 0.5     # the compacted context aims to stay under this fraction
    summary_max_tokens: int = 4096   # reply budget of each summarization call (capped at window/4)
    user_prompts_max_tokens: int = 20_000  # verbatim user messages kept in the head (capped at window/4)

    def __post_init__(self):
        if not 0.1 <= self.threshold <= 1.0:
            raise ValueError(f"compaction threshold {self.threshold} must be between 0.1 and 1.0")
        if self.keep_turns < 0:
            raise ValueError(f"keep_turns {self.keep_turns} must be >= 0")


@dataclass
class CompactionResult:
    head: dict
    tail: list[dict]
    summary: str
    kept: list[dict]          # {seq, role, kind, why}
    summarized: list[int]     # seqs folded into the summary
    usages: list[dict] = field(default_factory=list)
    started_at: float = 0.0
    chunks: int = 0
    images_dropped: list[str] = field(default_factory=list)   # tail images replaced by a note (window too small)


def _blocks(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _block_text(block: dict) -> str:
    """A content block as the summarizer reads it; an image is named by where it came from, so the
    summary can say "[image: PATH]" (its bytes never go to the summarizer)."""
    t = block.get("type")
    if t == "text":
        return block.get("text", "")
    if t == "image":
        return f"[image: {block.get('_source') or 'attached by the user'}]"
    return f"[{t} block]"


def _drop_images(message: dict, dropped: list[str]) -> dict:
    """A copy of a message with its image blocks (top level and inside tool results) replaced by a
    note naming them; what was removed is added to `dropped`."""
    def swap(blocks):
        out = []
        for x in blocks:
            if isinstance(x, dict) and x.get("type") == "image":
                name = x.get("_source") or "attached by the user"
                dropped.append(name)
                out.append({"type": "text", "text": f"[image: {name} — removed by compaction: the context window "
                                                    "cannot hold it; read it again if it is still needed]"})
            elif isinstance(x, dict) and x.get("type") == "tool_result" and isinstance(x.get("content"), list):
                out.append(dict(x, content=swap(x["content"])))
            else:
                out.append(x)
        return out
    if isinstance(message["content"], str):
        return message
    return dict(message, content=swap(message["content"]))


def _has_images(message: dict) -> bool:
    content = message["content"]
    if isinstance(content, str):
        return False
    return any(b.get("type") == "image" or (b.get("type") == "tool_result" and isinstance(b.get("content"), list)
                                            and any(x.get("type") == "image" for x in b["content"]))
               for b in content)


def _count_images(message: dict) -> int:
    return sum(1 for b in _blocks(message["content"]) for x in
               ([b] if b.get("type") == "image" else b.get("content") if b.get("type") == "tool_result"
                and isinstance(b.get("content"), list) else []) if x.get("type") == "image")


def _render(message: dict, names: dict[str, str], limit: int = 4000) -> str:
    """One transcript entry as plain text for the summarizer."""
    role = message["role"]
    kind = message.get("_kind")
    parts = []
    for b in _blocks(message["content"]):
        t = b.get("type")
        if t == "text":
            parts.append(("USER: " if role == "user" else "ASSISTANT: ") + b["text"][:limit])
        elif t == "tool_use":
            parts.append(f"TOOL CALL {b.get('name')}: {json.dumps(b.get('input'), ensure_ascii=False)[:limit]}")
        elif t == "tool_result":
            content = b.get("content")
            text = content if isinstance(content, str) else "\n".join(_block_text(x) for x in content or [])
            err = " (error)" if b.get("is_error") else ""
            parts.append(f"TOOL RESULT{err} of {names.get(b.get('tool_use_id'), '?')}: {text[:limit]}")
        elif t in ("image", "document"):
            parts.append(_block_text(b))
    if kind == "prompt":
        parts.insert(0, "[user message]")
    return "\n".join(parts)


def parse_sections(text: str) -> dict[str, str]:
    """Split a summary reply into the fixed sections; text outside them goes to Important context."""
    found: dict[str, list[str]] = {s: [] for s in SUMMARY_SECTIONS}
    current = None
    stray: list[str] = []
    lookup = {s.lower(): s for s in SUMMARY_SECTIONS}
    for line in text.splitlines():
        m = re.match(r"^\s*#{1,6}\s*(.+?)\s*:?\s*$", line) or re.match(r"^\s*\*\*(.+?)\*\*\s*:?\s*$", line)
        if m and m.group(1).strip().lower() in lookup:
            current = lookup[m.group(1).strip().lower()]
            continue
        if re.match(r"^\s*#{1,6}\s", line):  # another heading would break the fixed shape: demote it
            line = "**" + line.lstrip().lstrip("#").strip() + "**"
        (found[current] if current else stray).append(line)
    if any(s.strip() for s in stray):
        found["Important context"] = [l for l in stray if l.strip()] + found["Important context"]
    return {k: "\n".join(v).strip() for k, v in found.items()}


def render_summary(sections: dict[str, str]) -> str:
    return "\n\n".join(f"## {name}\n{sections.get(name) or '- (none)'}" for name in SUMMARY_SECTIONS)


def _truncate_result_blocks(message: dict, max_chars: int) -> dict:
    """A copy of a tool-results message whose long text results are cut in the middle, with a note."""
    def cut(text: str) -> str:
        if len(text) <= max_chars:
            return text
        half = max_chars // 2
        return f"{text[:half]}\n[... {len(text) - 2 * half} characters removed by compaction ...]\n{text[-half:]}"

    if isinstance(message["content"], str):
        return dict(message, content=cut(message["content"]))
    blocks = []
    for b in message["content"]:
        b = dict(b)
        if b.get("type") == "tool_result":
            if isinstance(b.get("content"), str):
                b["content"] = cut(b["content"])
            elif isinstance(b.get("content"), list):
                b["content"] = [dict(x, text=cut(x["text"])) if x.get("type") == "text" else x for x in b["content"]]
        elif b.get("type") == "text":
            b["text"] = cut(b["text"])
        blocks.append(b)
    return dict(message, content=blocks)


class Compressor:
    def __init__(self, client, counter, agent_config):
        self.client = client
        self.counter = counter
        self.agent_config = agent_config

    @property
    def cfg(self) -> CompactionConfig:
        return self.agent_config.compaction

    @property
    def window(self) -> int:
        return self.agent_config.context_window

    def summary_budget(self) -> int:
        return max(64, min(self.cfg.summary_max_tokens, self.window // 4))

    # choosing what stays -------------------------------------------------------------------------
    @staticmethod
    def _tail(body: list[dict], k: int) -> list[dict]:
        if k == 0 and body and body[-1]["_kind"] == "results":
            k = 1  # results cannot be kept without the call they answer
        if k == 0:
            return []
        starts = [i for i, m in enumerate(body) if m["role"] == "assistant"]
        if not starts:
            return []
        return body[starts[-k] if len(starts) >= k else starts[0]:]

    def _pick_prompts(self, prompts: list[dict], exclude: set[int]) -> tuple[list[dict], list[dict]]:
        """(kept verbatim, dropped for the cap). The first prompt is always kept, newest next."""
        cap = max(256, min(self.cfg.user_prompts_max_tokens, self.window // 4))
        candidates = [p for p in prompts if p["_seq"] not in exclude]
        if not candidates:
            return [], []
        first, rest = candidates[0], candidates[1:]
        used = estimate_content(first["content"])
        if used > cap:  # a huge task: keep its start and end
            first = _truncate_result_blocks(first, int(cap * 3))
            used = cap
        kept, dropped = [first], []
        for p in reversed(rest):
            n = estimate_content(p["content"])
            if used + n <= cap:
                kept.insert(1, p)
                used += n
            else:
                dropped.insert(0, p)
        return kept, dropped

    def _head(self, prompts: list[dict], summary: str, agent: "Agent", pending_last: bool) -> dict:
        blocks: list[dict] = []
        for i, p in enumerate(prompts):
            if pending_last and i == len(prompts) - 1:
                break
            if i > 0:
                blocks.append({"type": "text", "text": "[A later message from the user:]"})
            blocks.extend(_blocks(p["content"]))
        text = f"{COMPACTED_HEADER}\n\n{summary}"
        if agent.state.notes:
            text += "\n\n## Pinned notes\n" + "\n".join(f"- {n}" for n in agent.state.notes)
        if agent.state.todos:
            text += "\n\n## To-do list\n" + "\n".join(
                f"- [{'x' if t.get('status') == 'done' else '~' if t.get('status') == 'in_progress' else ' '}] "
                f"{t.get('title', '')}" for t in agent.state.todos)
        blocks.append({"type": "text", "text": text})
        if pending_last and prompts:
            blocks.append({"type": "text", "text": "[The user's latest message, not yet answered:]"})
            blocks.extend(_blocks(prompts[-1]["content"]))
        return {"role": "user", "content": blocks}

    # the compaction ------------------------------------------------------------------------------
    async def compact(self, agent: "Agent", instructions: str | None = None) -> CompactionResult:
        started = time.time()
        body = [m for m in agent.messages if m["_kind"] != "head"]
        old_heads = [m for m in agent.messages if m["_kind"] == "head"]
        prompts = agent.prompts()
        target = int(self.window * self.cfg.target_fraction)
        system_tools = {"system": agent._system(), "tools": agent.tool_specs()}
        placeholder = "x" * (self.summary_budget() * 3)

        result_dropped: list[str] = []
        for k in range(self.cfg.keep_turns, -1, -1):
            tail = self._tail(body, k)
            tail_seqs = {m["_seq"] for m in tail}
            kept_prompts, dropped = self._pick_prompts(prompts, tail_seqs)
            pending = bool(body) and body[-1]["_kind"] == "prompt" and not tail
            head = self._head(kept_prompts, placeholder, agent, pending)
            if estimate_request(dict(system_tools, messages=[head] + tail)) <= target or k == 0 or \
                    len(self._tail(body, k - 1)) == len(tail):
                break
        estimate = estimate_request(dict(system_tools, messages=[head] + tail))
        if estimate > target and tail:
            # even the minimum tail is too big: cut its long tool results down to share the room left
            room = max(1000, (target - (estimate - estimate_request({"messages": tail}))) * 3)
            per = max(500, room // max(1, sum(1 for m in tail for _ in _blocks(m["content"]))))
            tail = [_truncate_result_blocks(m, per) if m["role"] == "user" else m for m in tail]
            # images are kept in the tail; only if the context still cannot hold them with room for a
            # reply (a hard limit, not the target) are the oldest replaced by a note naming them (never
            # silently), newest kept longest
            hard = self.window - min(self.agent_config.max_tokens, self.window // 4)
            for i, m in enumerate(tail):
                if estimate_request(dict(system_tools, messages=[head] + tail)) <= hard:
                    break
                if m["role"] == "user" and _has_images(m):
                    tail[i] = _drop_images(m, result_dropped)

        tail_seqs = {m["_seq"] for m in tail}
        kept_seqs = {p["_seq"] for p in kept_prompts}
        middle = [m for m in body if m["_seq"] not in tail_seqs]
        names = {b.get("id"): b.get("name") for m in body if m["role"] == "assistant"
                 for b in _blocks(m["content"]) if b.get("type") == "tool_use"}
        pieces = [_render(m, names) for m in middle]
        pieces += [_render(p, names) for p in dropped if p["_seq"] not in {m["_seq"] for m in middle}]
        result = CompactionResult(head={}, tail=tail, summary="", kept=[], summarized=[], started_at=started,
                                  images_dropped=result_dropped)
        if pieces:
            summary = await self._summarize(agent.state.summary, pieces, instructions, result)
        else:
            summary = agent.state.summary or render_summary({})
        head = self._head(kept_prompts, summary, agent, bool(body) and body[-1]["_kind"] == "prompt" and not tail)
        result.head, result.summary = head, summary
        result.kept = ([{"seq": p["_seq"], "role": "user", "kind": "prompt", "why": "user message (verbatim in head)"}
                        for p in kept_prompts] +
                       [{"seq": m["_seq"], "role": m["role"], "kind": m["_kind"], "why": "recent turn",
                         **({"images": _count_images(m)} if _has_images(m) else {})} for m in tail])
        result.summarized = [m["_seq"] for m in old_heads] + [m["_seq"] for m in middle if m["_seq"] not in kept_seqs] \
            + [p["_seq"] for p in dropped]
        return result

    # summarization ------------------------------------------------------------------------------
    def _chunks(self, pieces: list[str], budget_tokens: int) -> list[str]:
        limit_chars = max(300, int(budget_tokens * 3))
        chunks, current = [], ""
        for piece in pieces:
            while len(piece) > limit_chars:  # one entry bigger than a chunk: split it
                if current:
                    chunks.append(current)
                    current = ""
                chunks.append(piece[:limit_chars])
                piece = piece[limit_chars:]
            if current and len(current) + len(piece) + 2 > limit_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
        if current:
            chunks.append(current)
        return chunks

    def _request(self, previous: str | None, chunk: str, part: str, instructions: str | None) -> dict:
        text = ""
        if previous:
            text += f"Summary of the work before this part of the transcript:\n{previous}\n\n"
        text += f"Transcript{part}:\n<transcript>\n{chunk}\n</transcript>\n\n{SUMMARY_INSTRUCTIONS}"
        if instructions:
            text += f"\n\nThe user asks the summary to focus on: {instructions}"
        return {"model": self.agent_config.model, "max_tokens": self.summary_budget(), "system": SUMMARY_SYSTEM,
                "messages": [{"role": "user", "content": text}]}

    async def _summarize(self, previous: str | None, pieces: list[str], instructions: str | None,
                         result: CompactionResult) -> str:
        overhead = estimate_request(self._request(previous or "x" * (self.summary_budget() * 3), "", " (part 99 of 99)",
                                                  instructions))
        margin = 32 + self.window // 50
        budget = self.window - self.summary_budget() - overhead - margin
        if budget < 100:
            raise ValueError(f"context window {self.window} is too small to summarize in (needs room for a "
                             f"{self.summary_budget()}-token summary plus instructions); raise --context-window")
        chunks = self._chunks(pieces, budget)
        summary = previous
        for i, chunk in enumerate(chunks):
            part = f" (part {i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
            summary = await self._fold(summary, chunk, part, instructions, result)
        return summary

    async def _fold(self, previous: str | None, chunk: str, part: str, instructions: str | None,
                    result: CompactionResult) -> str:
        req = self._request(previous, chunk, part, instructions)
        tokens, _ = await self.counter.count(req, exact_above=0)
        if tokens + req["max_tokens"] > self.window and len(chunk) > 200:
            half = len(chunk) // 2  # the estimate was low for this text: split and fold both halves
            mid = await self._fold(previous, chunk[:half], part, instructions, result)
            return await self._fold(mid, chunk[half:], part, instructions, result)
        result.chunks += 1
        try:
            message = await self.client.stream_message(req)
        except APIError as e:
            if e.context_overflow and len(chunk) > 200:
                half = len(chunk) // 2
                mid = await self._fold(previous, chunk[:half], part, instructions, result)
                return await self._fold(mid, chunk[half:], part, instructions, result)
            raise
        result.usages.append(message.get("usage") or {})
        text = "".join(b.get("text", "") for b in message["content"] if b.get("type") == "text")
        return render_summary(parse_sections(text))
