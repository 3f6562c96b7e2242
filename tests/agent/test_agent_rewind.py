"""`moonlet agent rewind`: the file tools record what a file held before they change it, and rewind
restores it — for the session's own steps and its sub-agents' — while shell changes are not tracked."""

import asyncio

import pytest

from agent_scripted import Reply, ScriptedEndpoint, first_user_text, last_results, make_agent, text, tool

from moonlet.agent.store import SessionStore
from moonlet.cli import main


def test_rewind_restores_files_step_by_step(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.txt").write_text("b0\n")
    db = tmp_path / "s.db"

    def script(body):
        task = first_user_text(body)
        if task == "child":
            if last_results(body):
                return Reply([text("child done")])
            return Reply([tool("write_file", {"path": "c.txt", "content": "from the sub-agent\n"})])
        results = last_results(body)
        n = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if n == 0:
            return Reply([tool("write_file", {"path": "a.txt", "content": "a1\n"}),
                          tool("str_replace", {"path": "b.txt", "old": "b0", "new": "b1"})])
        if n == 1:
            return Reply([tool("str_replace", {"path": "b.txt", "old": "b1", "new": "b2"}),
                          tool("task", {"prompt": "child"})])
        assert results
        return Reply([text("done")])

    async def go(url):
        store = SessionStore(db)
        agent = make_agent(url, work, store=store, task="edit")
        try:
            await agent.run("edit")
            return agent.session_id
        finally:
            await agent.close()
            store.close()

    with ScriptedEndpoint(script) as ep:
        sid = asyncio.run(go(ep.url))
    assert (work / "b.txt").read_text() == "b2\n" and (work / "c.txt").exists() and (work / "a.txt").exists()

    assert main(["agent", "rewind", sid, "--db", str(db), "--dry-run"]) == 0
    assert (work / "b.txt").read_text() == "b2\n"  # a dry run changes nothing

    assert main(["agent", "rewind", sid, "--db", str(db)]) == 0  # the last step: b back to b1, c gone
    assert (work / "b.txt").read_text() == "b1\n" and not (work / "c.txt").exists()
    assert (work / "a.txt").read_text() == "a1\n"

    first = min(r["step"] for r in SessionStore(db).file_snapshots(sid))
    assert main(["agent", "rewind", sid, "--db", str(db), "--step", str(first)]) == 0  # everything
    assert (work / "b.txt").read_text() == "b0\n" and not (work / "a.txt").exists()


def _tables(db):
    import sqlite3

    con = sqlite3.connect(db)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: con.execute(f"SELECT * FROM {n}").fetchall() for n in names}
    finally:
        con.close()


def test_snapshots_keep_the_first_per_step_once_per_content_compressed(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    sid = store.create_session("t", {})
    big = b"line of a large source file\n" * 4000  # 112 kB, compresses well
    store.record_file_snapshot(sid, 1, "tu1", "/w/a.py", big)
    store.record_file_snapshot(sid, 1, "tu2", "/w/a.py", b"changed in the same step")  # not the step's first
    store.record_file_snapshot(sid, 2, "tu3", "/w/a.py", b"v2")
    store.record_file_snapshot(sid, 3, "tu4", "/w/b.py", big)  # same content elsewhere: one stored copy
    store.record_file_snapshot(sid, 3, "tu5", "/w/new.py", None)
    rows = store.file_snapshots(sid)
    assert [(r["step"], r["path"]) for r in rows] == [(1, "/w/a.py"), (2, "/w/a.py"), (3, "/w/b.py"), (3, "/w/new.py")]
    assert [store.snapshot_content(r) for r in rows] == [big, b"v2", big, None]
    blobs = _tables(tmp_path / "s.db")["file_blobs"]
    assert len(blobs) == 2 and sum(len(b[2]) for b in blobs) < len(big) // 20
    store.snapshot_max_bytes = 1000
    store.record_file_snapshot(sid, 4, "tu6", "/w/a.py", big)
    with pytest.raises(ValueError, match="larger than 1000 bytes"):
        store.snapshot_content(store.file_snapshots(sid, from_step=4)[0])
    store.close()


def test_rewind_says_what_it_cannot_restore_and_restores_the_rest(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    db = tmp_path / "s.db"
    store = SessionStore(db)
    sid = store.create_session("t", {})
    store.append_message(sid, {"role": "user", "content": "go"}, 1, "user")
    store.snapshot_max_bytes = 10
    (work / "small.txt").write_text("new small\n")
    (work / "huge.txt").write_text("new huge content\n")
    store.record_file_snapshot(sid, 1, "a", str(work / "small.txt"), b"old\n")
    store.record_file_snapshot(sid, 1, "b", str(work / "huge.txt"), b"old content over the cap\n")
    store.close()
    assert main(["agent", "rewind", sid, "--db", str(db), "--step", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot restore" in err and "huge.txt" in err
    assert (work / "small.txt").read_text() == "old\n" and (work / "huge.txt").read_text() == "new huge content\n"


def test_a_database_from_before_content_addressed_snapshots_still_rewinds(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE file_snapshots (session_id TEXT, step INTEGER, tool_use_id TEXT, path TEXT, "
                "existed INTEGER, content BLOB, created_at REAL)")
    con.execute("INSERT INTO file_snapshots VALUES ('s1', 2, 'tu', '/w/x', 1, ?, 1.0)", (b"old bytes",))
    con.commit()
    con.close()
    store = SessionStore(db)
    [row] = store.file_snapshots("s1")
    assert store.snapshot_content(row) == b"old bytes"
    store.record_file_snapshot("s1", 3, "tu2", "/w/x", b"newer")
    assert [store.snapshot_content(r) for r in store.file_snapshots("s1")] == [b"old bytes", b"newer"]
    store.close()


def test_rm_and_prune_delete_whole_session_trees(tmp_path, capsys):
    import time as _time

    db = tmp_path / "s.db"
    store = SessionStore(db)
    old = store.create_session("old task", {})
    child = store.create_session("child", {}, parent_id=old)
    keep = store.create_session("recent task", {})
    shared = b"the same file content in two sessions\n" * 10
    for sid in (old, child, keep):
        store.append_message(sid, {"role": "user", "content": "hi"}, 1, "user")
        store.checkpoint(sid, 1, 1, {})
        store.event(sid, 1, "x")
        store.record_usage(sid, 1, "step", "m", {"input_tokens": 1}, "end_turn", 0.0, 0.1)
    store.record_file_snapshot(child, 1, "tu", "/w/c", b"only the old tree has this")
    store.record_file_snapshot(old, 1, "tu", "/w/s", shared)
    store.record_file_snapshot(keep, 1, "tu", "/w/s", shared)
    for sid in (old, child, keep):
        store.set_status(sid, "done")
    long_ago = _time.time() - 40 * 86400
    store._exec("UPDATE sessions SET updated_at=? WHERE id IN (?,?)", (long_ago, old, child))
    store.close()

    assert main(["agent", "prune", "--older-than", "30", "--db", str(db), "--dry-run"]) == 0
    assert f"would delete {old}" in capsys.readouterr().out
    assert len(_tables(db)["sessions"]) == 3
    assert main(["agent", "prune", "--older-than", "30", "--db", str(db)]) == 0
    tables = _tables(db)
    for name, rows in tables.items():
        assert not any(old in map(str, r) or child in map(str, r) for r in rows), name
    assert [r[0] for r in tables["sessions"]] == [keep]
    assert len(tables["file_blobs"]) == 1  # the shared content stays for the session still holding it
    assert SessionStore(db).snapshot_content(SessionStore(db).file_snapshots(keep)[0]) == shared

    store = SessionStore(db)
    store.set_status(keep, "running")
    store.close()
    with pytest.raises(SystemExit, match="--force"):
        main(["agent", "rm", keep[:6], "--db", str(db)])
    assert main(["agent", "rm", keep, "--force", "--db", str(db)]) == 0
    tables = _tables(db)
    assert not tables["sessions"] and not tables["file_blobs"] and not tables["messages"]
