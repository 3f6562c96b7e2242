"""SQLite sessions: everything an agent run does, written as it happens, so a run can be resumed after
a crash (or kill -9) and inspected afterwards.

Tables: sessions (one per agent; sub-agents point at their parent), messages (the append-only
transcript), tool_calls, checkpoints (one per step: how far the transcript is committed plus the
agent's state), compactions (what was kept and what was summarized, and the new context), usage
(one row per model call with timings), events (retries, approvals, budget stops, ...).

The working context at a checkpoint is rebuilt as: the context recorded by the latest compaction at
or before it (or nothing), followed by every later message up to the checkpoint that was not
discarded. Messages written after the last checkpoint belong to the step in flight; `resume`
marks them discarded, so a resumed run loses at most that step."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, parent_id TEXT, label TEXT, task TEXT, config TEXT, status TEXT,
  result TEXT, error TEXT, created_at REAL, updated_at REAL);
CREATE TABLE IF NOT EXISTS messages (
  session_id TEXT, seq INTEGER, step INTEGER, role TEXT, kind TEXT, content TEXT,
  created_at REAL, discarded INTEGER DEFAULT 0, PRIMARY KEY (session_id, seq));
CREATE TABLE IF NOT EXISTS tool_calls (
  session_id TEXT, step INTEGER, tool_use_id TEXT, name TEXT, input TEXT, approved INTEGER,
  result TEXT, is_error INTEGER, started_at REAL, finished_at REAL);
CREATE TABLE IF NOT EXISTS checkpoints (
  session_id TEXT, step INTEGER, last_seq INTEGER, state TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS compactions (
  session_id TEXT, step INTEGER, marker_seq INTEGER, reason TEXT, tokens_before INTEGER,
  tokens_after INTEGER, kept TEXT, summarized TEXT, summary TEXT, context TEXT, created_at REAL,
  discarded INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS usage (
  session_id TEXT, step INTEGER, purpose TEXT, model TEXT, input_tokens INTEGER,
  output_tokens INTEGER, cache_read_tokens INTEGER, stop_reason TEXT, started_at REAL, duration_s REAL);
CREATE TABLE IF NOT EXISTS events (
  session_id TEXT, step INTEGER, kind TEXT, data TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS subagents (
  parent_id TEXT, child_id TEXT, tool_use_id TEXT, idx INTEGER, item TEXT, status TEXT,
  result TEXT, error TEXT, started_at REAL, finished_at REAL);
CREATE TABLE IF NOT EXISTS file_snapshots (
  session_id TEXT, step INTEGER, tool_use_id TEXT, path TEXT, existed INTEGER, content BLOB, created_at REAL,
  blob TEXT);
CREATE TABLE IF NOT EXISTS file_blobs (hash TEXT PRIMARY KEY, size INTEGER, data BLOB);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, seq);
CREATE INDEX IF NOT EXISTS file_snapshots_by_session ON file_snapshots (session_id, step, path);
CREATE INDEX IF NOT EXISTS checkpoints_by_session ON checkpoints (session_id, step);
CREATE INDEX IF NOT EXISTS tool_calls_by_session ON tool_calls (session_id, tool_use_id);
CREATE INDEX IF NOT EXISTS sessions_by_parent ON sessions (parent_id);
CREATE INDEX IF NOT EXISTS subagents_by_parent ON subagents (parent_id);
"""


# A file larger than this is not snapshotted before a file tool changes it (rewind then says it cannot
# restore it) — a session editing a huge file many times would otherwise grow the store without bound.
SNAPSHOT_MAX_BYTES = 16 * 1024 * 1024
# ``existed`` values of a file snapshot
SNAP_ABSENT, SNAP_KEPT, SNAP_TOO_LARGE = 0, 1, 2


def default_db_path() -> Path:
    home = os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")
    return Path(home) / "agent" / "sessions.db"


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _load(text):
    return None if text is None else json.loads(text)


@dataclass
class Restored:
    """A session as `resume` needs it."""
    session: dict
    messages: list[dict]     # the working context; each dict has role, content, _seq, _kind
    state: dict
    step: int
    discarded: int           # messages of the step in flight that were dropped


class SessionStore:
    """One SQLite file (or ":memory:"). Safe to share between the agents of one process; each write
    is its own transaction, so what is written survives the process being killed."""

    def __init__(self, path: str | os.PathLike = ":memory:"):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process death
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(file_snapshots)")}
            if "blob" not in columns:  # a database written before snapshots were content-addressed
                self._db.execute("ALTER TABLE file_snapshots ADD COLUMN blob TEXT")
        self._seq: dict[str, int] = {}
        self.snapshot_max_bytes = SNAPSHOT_MAX_BYTES

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args=()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _all(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args=()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    # sessions --------------------------------------------------------------------------------
    def create_session(self, task: str, config: dict, *, parent_id: str | None = None,
                       label: str | None = None, session_id: str | None = None) -> str:
        sid = session_id or uuid.uuid4().hex[:12]
        if self.get_session(sid):
            raise ValueError(f"session {sid!r} already exists in {self.path}; pick another id or resume it")
        now = time.time()
        self._exec("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (sid, parent_id, label, task, _dump(config), "running", None, None, now, now))
        self._seq[sid] = 0
        return sid

    def get_session(self, sid: str) -> dict | None:
        row = self._one("SELECT * FROM sessions WHERE id=?", (sid,))
        if row:
            row["config"] = _load(row["config"])
        return row

    def find_session(self, prefix: str) -> dict:
        """A session by id or unique id prefix; ValueError naming the problem otherwise."""
        rows = self._all("SELECT id FROM sessions WHERE id LIKE ? ORDER BY created_at", (prefix + "%",))
        exact = [r for r in rows if r["id"] == prefix]
        if exact:
            rows = exact
        if not rows:
            raise ValueError(f"no session {prefix!r} in {self.path}; `moonlet agent list` shows the sessions")
        if len(rows) > 1:
            raise ValueError(f"session id {prefix!r} is ambiguous ({', '.join(r['id'] for r in rows[:5])}...)")
        return self.get_session(rows[0]["id"])

    def list_sessions(self, limit: int = 50, include_children: bool = False) -> list[dict]:
        where = "" if include_children else "WHERE parent_id IS NULL"
        return self._all(f"SELECT id, parent_id, label, task, status, created_at, updated_at FROM sessions "
                         f"{where} ORDER BY created_at DESC LIMIT ?", (limit,))

    def children(self, sid: str) -> list[dict]:
        return self._all("SELECT * FROM sessions WHERE parent_id=? ORDER BY created_at", (sid,))

    def set_status(self, sid: str, status: str, *, result: str | None = None, error: str | None = None) -> None:
        self._exec("UPDATE sessions SET status=?, result=COALESCE(?, result), error=?, updated_at=? WHERE id=?",
                   (status, result, error, time.time(), sid))

    def update_config(self, sid: str, config: dict) -> None:
        self._exec("UPDATE sessions SET config=? WHERE id=?", (_dump(config), sid))

    # transcript -------------------------------------------------------------------------------
    def _next_seq(self, sid: str) -> int:
        if sid not in self._seq:
            row = self._one("SELECT MAX(seq) AS m FROM messages WHERE session_id=?", (sid,))
            self._seq[sid] = (row["m"] or 0) if row else 0
        self._seq[sid] += 1
        return self._seq[sid]

    def append_message(self, sid: str, message: dict, step: int, kind: str) -> int:
        seq = self._next_seq(sid)
        self._exec("INSERT INTO messages VALUES (?,?,?,?,?,?,?,0)",
                   (sid, seq, step, message["role"], kind, _dump(message["content"]), time.time()))
        return seq

    def messages(self, sid: str, include_discarded: bool = True) -> list[dict]:
        cond = "" if include_discarded else "AND discarded=0"
        rows = self._all(f"SELECT * FROM messages WHERE session_id=? {cond} ORDER BY seq", (sid,))
        for r in rows:
            r["content"] = _load(r["content"])
        return rows

    def record_tool_call(self, sid: str, step: int, tool_use_id: str, name: str, args, approved: bool) -> None:
        self._exec("INSERT INTO tool_calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (sid, step, tool_use_id, name, _dump(args), int(approved), None, None, time.time(), None))

    def finish_tool_call(self, sid: str, tool_use_id: str, result, is_error: bool) -> None:
        self._exec("UPDATE tool_calls SET result=?, is_error=?, finished_at=? WHERE session_id=? AND tool_use_id=? "
                   "AND finished_at IS NULL", (_dump(result), int(is_error), time.time(), sid, tool_use_id))

    def tool_calls(self, sid: str) -> list[dict]:
        rows = self._all("SELECT * FROM tool_calls WHERE session_id=? ORDER BY started_at", (sid,))
        for r in rows:
            r["input"], r["result"] = _load(r["input"]), _load(r["result"])
        return rows

    # checkpoints, compactions, usage, events -------------------------------------------------------
    def checkpoint(self, sid: str, step: int, last_seq: int, state: dict) -> None:
        now = time.time()
        self._exec("INSERT INTO checkpoints VALUES (?,?,?,?,?)", (sid, step, last_seq, _dump(state), now))
        self._exec("UPDATE sessions SET updated_at=? WHERE id=?", (now, sid))

    def checkpoints(self, sid: str) -> list[dict]:
        rows = self._all("SELECT * FROM checkpoints WHERE session_id=? ORDER BY rowid", (sid,))
        for r in rows:
            r["state"] = _load(r["state"])
        return rows

    def record_compaction(self, sid: str, step: int, *, marker_seq: int, reason: str, tokens_before: int,
                          tokens_after: int, kept: list, summarized: list, summary: str, context: list[int]) -> None:
        self._exec("INSERT INTO compactions VALUES (?,?,?,?,?,?,?,?,?,?,?,0)",
                   (sid, step, marker_seq, reason, tokens_before, tokens_after, _dump(kept), _dump(summarized),
                    summary, _dump(context), time.time()))

    def compactions(self, sid: str) -> list[dict]:
        rows = self._all("SELECT * FROM compactions WHERE session_id=? AND discarded=0 ORDER BY marker_seq", (sid,))
        for r in rows:
            for k in ("kept", "summarized", "context"):
                r[k] = _load(r[k])
        return rows

    def record_usage(self, sid: str, step: int, purpose: str, model: str, usage: dict, stop_reason,
                     started_at: float, duration_s: float) -> None:
        self._exec("INSERT INTO usage VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (sid, step, purpose, model, int(usage.get("input_tokens") or 0),
                    int(usage.get("output_tokens") or 0), int(usage.get("cache_read_input_tokens") or 0),
                    stop_reason, started_at, duration_s))

    def usage(self, sid: str) -> list[dict]:
        return self._all("SELECT * FROM usage WHERE session_id=? ORDER BY started_at", (sid,))

    def record_file_snapshot(self, sid: str, step: int, tool_use_id: str, path: str, content: bytes | None) -> None:
        """The content ``path`` (absolute) had before a file tool changed it at ``step`` (None: it did not
        exist), for ``moonlet agent rewind``.

        Rewind restores a path to its content before the first change of the step it rewinds from, so
        only the first snapshot of a path in a step is kept (later ones in the same step are skipped).
        Contents are stored once per distinct content (``file_blobs``: blake2b hash -> zlib-compressed
        bytes), so a file edited and restored many times costs one copy per version, compressed. A file
        over ``snapshot_max_bytes`` is recorded as too large to keep."""
        if self._one("SELECT 1 AS x FROM file_snapshots WHERE session_id=? AND step=? AND path=? LIMIT 1",
                     (sid, step, path)):
            return
        digest, existed = None, SNAP_ABSENT
        if content is not None:
            existed = SNAP_TOO_LARGE if len(content) > self.snapshot_max_bytes else SNAP_KEPT
        if existed == SNAP_KEPT:
            digest = hashlib.blake2b(content, digest_size=20).hexdigest()
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO file_blobs VALUES (?,?,?)",
                                 (digest, len(content), zlib.compress(content, 6)))
        self._exec("INSERT INTO file_snapshots VALUES (?,?,?,?,?,?,?,?)",
                   (sid, step, tool_use_id, path, existed, None, time.time(), digest))

    def file_snapshots(self, sid: str, from_step: int = 0) -> list[dict]:
        """Snapshots taken at ``from_step`` or later, oldest first (without their contents: see
        ``snapshot_content``)."""
        return self._all("SELECT session_id, step, tool_use_id, path, existed, created_at, blob, "
                         "content IS NOT NULL AS legacy FROM file_snapshots WHERE session_id=? AND step>=? "
                         "ORDER BY rowid", (sid, from_step))

    def snapshot_content(self, row: dict) -> bytes | None:
        """The bytes a snapshot row recorded (None: the file did not exist). ValueError for a file that was
        too large to keep."""
        if row["existed"] == SNAP_ABSENT:
            return None
        if row["existed"] == SNAP_TOO_LARGE:
            raise ValueError(f"{row['path']} was larger than {self.snapshot_max_bytes} bytes when the agent changed it "
                             "(step {}); its earlier content was not kept".format(row["step"]))
        if row.get("legacy"):  # written before content-addressed snapshots: the bytes are in the row
            found = self._one("SELECT content FROM file_snapshots WHERE session_id=? AND step=? AND path=? AND "
                              "tool_use_id=? AND content IS NOT NULL", (row["session_id"], row["step"], row["path"],
                                                                         row["tool_use_id"]))
            return found["content"]
        found = self._one("SELECT data FROM file_blobs WHERE hash=?", (row["blob"],))
        if found is None:
            raise ValueError(f"the stored content of {row['path']} (step {row['step']}) is missing from the store")
        return zlib.decompress(found["data"])

    def event(self, sid: str, step: int, kind: str, data: dict | None = None) -> None:
        self._exec("INSERT INTO events VALUES (?,?,?,?,?)", (sid, step, kind, _dump(data or {}), time.time()))

    def events(self, sid: str) -> list[dict]:
        rows = self._all("SELECT * FROM events WHERE session_id=? ORDER BY created_at", (sid,))
        for r in rows:
            r["data"] = _load(r["data"])
        return rows

    # sub-agents -------------------------------------------------------------------------------
    def start_subagent(self, parent_id: str, child_id: str, tool_use_id: str, idx: int, item: str) -> None:
        self._exec("INSERT INTO subagents VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (parent_id, child_id, tool_use_id, idx, item, "running", None, None, time.time(), None))

    def finish_subagent(self, child_id: str, status: str, result: str | None, error: str | None) -> None:
        self._exec("UPDATE subagents SET status=?, result=?, error=?, finished_at=? WHERE child_id=?",
                   (status, result, error, time.time(), child_id))

    def subagents(self, parent_id: str) -> list[dict]:
        return self._all("SELECT * FROM subagents WHERE parent_id=? ORDER BY started_at, idx", (parent_id,))

    # resume -----------------------------------------------------------------------------------
    def restore(self, sid: str) -> Restored:
        """The working context and state at the session's last checkpoint; later messages, tool calls
        and compactions (the step in flight) are marked discarded."""
        session = self.get_session(sid)
        if session is None:
            raise ValueError(f"no session {sid!r} in {self.path}")
        cp = self._one("SELECT * FROM checkpoints WHERE session_id=? ORDER BY rowid DESC LIMIT 1", (sid,))
        last_seq = cp["last_seq"] if cp else 0
        state = _load(cp["state"]) if cp else {}
        with self._lock:
            cur = self._db.execute("UPDATE messages SET discarded=1 WHERE session_id=? AND seq>? AND discarded=0",
                                   (sid, last_seq))
            dropped = cur.rowcount
            self._db.execute("UPDATE compactions SET discarded=1 WHERE session_id=? AND marker_seq>?", (sid, last_seq))
        row = self._one("SELECT MAX(seq) AS m FROM messages WHERE session_id=?", (sid,))
        self._seq[sid] = (row["m"] or 0) if row else 0
        comp = self._one("SELECT * FROM compactions WHERE session_id=? AND discarded=0 AND marker_seq<=? "
                         "ORDER BY marker_seq DESC LIMIT 1", (sid, last_seq))
        by_seq = {r["seq"]: r for r in self.messages(sid, include_discarded=False)}
        if comp:
            seqs = list(_load(comp["context"])) + [s for s in sorted(by_seq) if comp["marker_seq"] < s <= last_seq
                                                    and s not in set(_load(comp["context"]))]
        else:
            seqs = [s for s in sorted(by_seq) if s <= last_seq]
        messages = [{"role": by_seq[s]["role"], "content": by_seq[s]["content"], "_seq": s,
                     "_kind": by_seq[s]["kind"]} for s in seqs if s in by_seq]
        return Restored(session, messages, state, cp["step"] if cp else 0, dropped)

    def fork(self, sid: str, step: int | None = None, new_id: str | None = None) -> str:
        """A new session that starts where ``sid`` was at its checkpoint of ``step`` (default: its
        latest): the same task and configuration, its transcript up to that checkpoint (compactions
        included), and the checkpoint itself, so ``resume`` continues the copy while the original stays
        as it is. Returns the new id. ValueError for an unknown step or a sub-agent session."""
        session = self.find_session(sid)
        sid = session["id"]
        if session["parent_id"]:
            raise ValueError(f"session {sid} is a sub-agent of {session['parent_id']}; fork the top session")
        cps = self.checkpoints(sid)
        if step is not None:
            cps = [c for c in cps if c["step"] <= step]
        if not cps:
            raise ValueError(f"session {sid} has no checkpoint" + (f" at or before step {step}" if step is not None
                                                                   else "") + "; nothing to fork from")
        cp = cps[-1]
        new = self.create_session(session["task"], session["config"], label=session["label"], session_id=new_id)
        last_seq = cp["last_seq"]
        with self._lock:
            self._db.execute("INSERT INTO messages SELECT ?, seq, step, role, kind, content, created_at, 0 "
                             "FROM messages WHERE session_id=? AND seq<=? AND discarded=0", (new, sid, last_seq))
            self._db.execute("INSERT INTO compactions SELECT ?, step, marker_seq, reason, tokens_before, tokens_after, "
                             "kept, summarized, summary, context, created_at, 0 FROM compactions "
                             "WHERE session_id=? AND marker_seq<=? AND discarded=0", (new, sid, last_seq))
            self._db.execute("INSERT INTO checkpoints VALUES (?,?,?,?,?)",
                             (new, cp["step"], last_seq, _dump(cp["state"]), time.time()))
            self._db.execute("UPDATE sessions SET status='stopped' WHERE id=?", (new,))
        row = self._one("SELECT MAX(seq) AS m FROM messages WHERE session_id=?", (new,))
        self._seq[new] = (row["m"] or 0) if row else 0
        self.event(new, cp["step"], "forked", {"from": sid, "step": cp["step"]})
        return new

    # deleting ---------------------------------------------------------------------------------------
    def session_tree(self, sid: str) -> list[str]:
        """``sid`` and all its sub-agents (and theirs), parents first."""
        ids = [sid]
        for s in ids:
            ids.extend(c["id"] for c in self._all("SELECT id FROM sessions WHERE parent_id=?", (s,)))
        return ids

    def delete_session(self, sid: str) -> list[str]:
        """Delete a top-level session with its sub-agents and every record of theirs (one transaction),
        then the file contents no snapshot refers to any more. Returns the deleted ids."""
        session = self.get_session(sid)
        if session is None:
            raise ValueError(f"no session {sid!r} in {self.path}")
        if session["parent_id"]:
            raise ValueError(f"session {sid} is a sub-agent of {session['parent_id']}; delete the top session")
        ids = self.session_tree(sid)
        marks = ",".join("?" * len(ids))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for table in ("messages", "tool_calls", "checkpoints", "compactions", "usage", "events",
                              "file_snapshots"):
                    self._db.execute(f"DELETE FROM {table} WHERE session_id IN ({marks})", ids)
                self._db.execute(f"DELETE FROM subagents WHERE parent_id IN ({marks}) OR child_id IN ({marks})",
                                 ids + ids)
                self._db.execute(f"DELETE FROM sessions WHERE id IN ({marks})", ids)
                self._db.execute("DELETE FROM file_blobs WHERE hash NOT IN "
                                 "(SELECT blob FROM file_snapshots WHERE blob IS NOT NULL)")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for s in ids:
            self._seq.pop(s, None)
        return ids

    def stale_sessions(self, older_than_s: float, now: float | None = None) -> list[dict]:
        """Top-level sessions whose last activity (their own or any sub-agent's) is more than
        ``older_than_s`` seconds ago, oldest first."""
        now = time.time() if now is None else now
        out = []
        for s in self._all("SELECT id, task, status, created_at, updated_at FROM sessions WHERE parent_id IS NULL "
                           "ORDER BY updated_at"):
            tree = self.session_tree(s["id"])
            marks = ",".join("?" * len(tree))
            last = self._one(f"SELECT MAX(updated_at) AS t FROM sessions WHERE id IN ({marks})", tree)["t"]
            if last is not None and last < now - older_than_s:
                out.append({**s, "last_active": last})
        return out

    def vacuum(self) -> None:
        """Give the space of deleted records back to the file system."""
        with self._lock:
            self._db.execute("VACUUM")

    # export -----------------------------------------------------------------------------------
    def trace(self, sid: str, recursive: bool = True):
        """Every record of a session (and its sub-agents), as dicts with a `type`, in time order."""
        session = self.get_session(sid)
        if session is None:
            raise ValueError(f"no session {sid!r}")
        rows: list[tuple[float, dict]] = [(session["created_at"], {"type": "session", **session})]
        for m in self.messages(sid):
            rows.append((m["created_at"], {"type": "message", **m}))
        for t in self.tool_calls(sid):
            rows.append((t["started_at"], {"type": "tool_call", **t}))
        for c in self.checkpoints(sid):
            rows.append((c["created_at"], {"type": "checkpoint", **c}))
        for c in self.compactions(sid):
            rows.append((c["created_at"], {"type": "compaction", **c}))
        for u in self.usage(sid):
            rows.append((u["started_at"], {"type": "model_call", **u}))
        for e in self.events(sid):
            rows.append((e["created_at"], {"type": "event", **e}))
        for s in self.subagents(sid):
            rows.append((s["started_at"], {"type": "subagent", **s}))
        rows.sort(key=lambda r: r[0])
        yield from (r for _, r in rows)
        if recursive:
            for child in self.children(sid):
                yield from self.trace(child["id"], recursive=True)
