"""`moonlet agent rewind`: the file tools record what a file held before they change it, and rewind
restores it — for the session's own steps and its sub-agents' — while shell changes are not tracked."""

import asyncio

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
