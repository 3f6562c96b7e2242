"""Agent sessions as chat conversations: `moonlet agent export-chat`, so an agent's own runs become
fine-tuning data (`moonlet data chat`, see docs/training.md).

One session -> one JSON line in the Anthropic Messages shape, ``{"system", "messages", "tools",
"metadata"}``:

- ``messages``: the session's transcript as the model and the tools wrote it — every committed
  message in order (user prompts, assistant turns with their text, thinking and tool_use blocks, tool
  results), block keys private to the agent (``_source``) removed. "Committed" means up to the last
  checkpoint: the messages of a step still in flight when a process died are left out, as `resume`
  would drop them. Compaction summaries (the ``head`` messages compaction inserts) are left out too:
  compaction never deletes transcript messages, so the transcript without them is the whole
  conversation, not the shortened context a compacted step saw.
- ``system`` and ``tools``: the system prompt and tool declarations the session's model calls were
  sent with, as the agent records them (an event of kind ``context``, written when they change);
  the latest ones are used. Sessions recorded before moonlet kept that record cannot be exported and
  are reported as such.
- ``metadata``: session id, parent id, status, task and model (ignored by the converter).

Sub-agents are sessions of their own; ``include_subagents`` adds the children of every selected
session (recursively), each as its own conversation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TextIO

from .store import SessionStore
from .stream import wire_message


class NotExportable(ValueError):
    """A session that cannot become a conversation (the reason says why)."""


def session_conversation(store: SessionStore, sid: str) -> dict:
    """The conversation of one session (see the module docstring); NotExportable when it has no
    recorded context or no committed assistant message."""
    session = store.get_session(sid)
    if session is None:
        raise NotExportable(f"no session {sid!r} in {store.path}")
    contexts = [e["data"] for e in store.events(sid) if e["kind"] == "context"]
    if not contexts:
        raise NotExportable("no recorded system prompt and tools (a session from before moonlet recorded them, "
                            "or one that never called the model)")
    checkpoints = store.checkpoints(sid)
    last_seq = checkpoints[-1]["last_seq"] if checkpoints else 0
    messages = [wire_message(m) for m in store.messages(sid, include_discarded=False)
                if m["seq"] <= last_seq and m["kind"] != "head"]
    if not any(m["role"] == "assistant" for m in messages):
        raise NotExportable("no committed assistant message")
    context = contexts[-1]
    record = {"system": context.get("system"), "messages": messages}
    if context.get("tools"):
        record["tools"] = context["tools"]
    record["metadata"] = {"session_id": sid, "parent_id": session["parent_id"], "status": session["status"],
                          "task": session["task"], "model": ((session["config"] or {}).get("agent") or {}).get("model")}
    return record


@dataclass
class ExportReport:
    written: list[str] = field(default_factory=list)               # session ids
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (session id, reason)


def select_sessions(store: SessionStore, ids: list[str] | None = None, statuses: list[str] | None = None,
                    include_subagents: bool = False) -> list[str]:
    """Session ids to export, oldest first: the given ids (or unique prefixes), else every top-level
    session; only those whose status is in ``statuses`` (None: any); with ``include_subagents``, each
    one's sub-agent sessions after it (recursively, the same status filter applied)."""
    if ids:
        roots = [store.find_session(i)["id"] for i in ids]
    else:
        roots = [s["id"] for s in reversed(store.list_sessions(limit=-1))]
    out: list[str] = []

    def add(sid: str) -> None:
        if sid in out:
            return
        if statuses is None or store.get_session(sid)["status"] in statuses:
            out.append(sid)
        if include_subagents:
            for child in store.children(sid):
                add(child["id"])

    for sid in roots:
        add(sid)
    return out


def export_conversations(store: SessionStore, session_ids: list[str], out: TextIO) -> ExportReport:
    """Write one JSON line per exportable session to ``out``; the rest are reported with the reason."""
    report = ExportReport()
    for sid in session_ids:
        try:
            record = session_conversation(store, sid)
        except NotExportable as e:
            report.skipped.append((sid, str(e)))
            continue
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        report.written.append(sid)
    return report


def cmd_export_chat(args) -> int:
    """`moonlet agent export-chat [SESSION ...]`."""
    from .cli import _store

    if args.status is None:
        statuses = None if args.session else ["done"]
    else:
        statuses = None if args.status == "any" else [s.strip() for s in args.status.split(",") if s.strip()]
    store = _store(args)
    try:
        ids = select_sessions(store, args.session, statuses, args.subagents)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            report = export_conversations(store, ids, out)
        finally:
            if args.output:
                out.close()
    finally:
        store.close()
    where = args.output or "stdout"
    print(f"wrote {len(report.written)} conversations to {where}; skipped {len(report.skipped)}", file=sys.stderr)
    for sid, reason in report.skipped[:10]:
        print(f"  skipped {sid}: {reason}", file=sys.stderr)
    return 0


def register(asub) -> None:
    """Add `export-chat` to the `moonlet agent` actions."""
    p = asub.add_parser("export-chat", help="write sessions as Anthropic-shape JSONL conversations (training data "
                                            "for `moonlet data chat`)",
                        description="Write agent sessions as chat conversations, one JSON line each: system prompt, "
                                    "the committed transcript (thinking, tool calls and results included) and the "
                                    "tools the session had. Default: every finished (status done) top-level session.")
    p.add_argument("session", nargs="*", help="session ids or unique prefixes (default: all top-level sessions)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.add_argument("--status", help="comma-separated statuses to keep, or 'any' (default: done when no SESSION is "
                                    "given, any for named sessions)")
    p.add_argument("--subagents", action="store_true", help="also export each session's sub-agent sessions")
    p.add_argument("--db", help="session database (default: $MOONLET_HOME/agent/sessions.db)")
    p.set_defaults(func=cmd_export_chat)
