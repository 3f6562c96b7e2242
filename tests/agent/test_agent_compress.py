"""Context compaction with a scripted model and a small window: the task, the later user messages and
tool_use/tool_result pairing survive; every request (summarization requests included) fits the
window by the endpoint's own count; the summarization is chunked; huge results are cut to fit."""

import asyncio

from agent_scripted import Reply, ScriptedEndpoint, blocks, make_agent, text, tool

from moonlet.agent.compress import parse_sections, render_summary
from moonlet.agent.prompts import SUMMARY_SECTIONS, SUMMARY_SYSTEM

TASK = "TASK-7f3: read every part file and report the total number of lines."
LATER = "LATER-c21: now also tell me which part was the longest."
SUMMARY = "## Current focus\n- reading part files\n## Completed work\n- read several parts\nsome stray remark"


def _write_parts(root, n, lines=12, width=100):
    for i in range(n):
        (root / f"part{i}.txt").write_text("".join(f"part {i} line {j} " + "z" * width + "\n" for j in range(lines)))


def _check_pairing(messages):
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            uses = [b["id"] for b in blocks(m) if b["type"] == "tool_use"]
            if uses:
                nxt = [b["tool_use_id"] for b in blocks(messages[i + 1]) if b["type"] == "tool_result"]
                assert nxt == uses, f"tool_use at {i} not answered by the next message"
        else:
            results = [b["tool_use_id"] for b in blocks(m) if b["type"] == "tool_result"]
            if results:
                prev = messages[i - 1]
                assert i > 0 and prev["role"] == "assistant"
                assert results == [b["id"] for b in blocks(prev) if b["type"] == "tool_use"]


def _all_text(message):
    return "\n".join(b.get("text", "") for b in blocks(message) if b["type"] == "text")


def _run_two_turns(tmp_path, **endpoint_kw):
    _write_parts(tmp_path, 14)
    agent_calls = []
    summaries = []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            summaries.append(body)
            return Reply([text(SUMMARY)])
        k = len(agent_calls)
        agent_calls.append(body)
        if k < 8:
            return Reply([tool("read_file", {"path": f"part{k}.txt"})])
        if k == 8:
            return Reply([text("turn one done")])
        if k < 14:
            return Reply([tool("read_file", {"path": f"part{k - 1}.txt"})])
        return Reply([text("turn two done")])

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, context_window=3000, max_tokens=200)
        try:
            r1 = await agent.run(TASK)
            r2 = await agent.run(LATER)
            return agent, r1, r2
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script, window=3000, **endpoint_kw) as ep:
        agent, r1, r2 = asyncio.run(go(ep.url))
    return ep, agent, r1, r2, agent_calls, summaries


def test_compaction_keeps_task_user_messages_and_pairing_within_window(tmp_path):
    ep, agent, r1, r2, calls, summaries = _run_two_turns(tmp_path)
    assert (r1.text, r2.text) == ("turn one done", "turn two done")
    assert ep.oversized == []  # no request (agent or summarizer) went over the window
    comps = agent.store.compactions(agent.session_id)
    assert len(comps) >= 2 and summaries
    assert all(c["tokens_after"] < c["tokens_before"] for c in comps)
    for body in calls:
        _check_pairing(body["messages"])
        first = body["messages"][0]
        assert blocks(first)[0]["text"] == TASK  # the original task, verbatim, always first
    compacted = [b for b in calls if "Context compacted" in _all_text(b["messages"][0])]
    assert compacted
    for body in compacted:
        head = _all_text(body["messages"][0])
        for section in SUMMARY_SECTIONS:
            assert f"## {section}" in head
    after_later = [b for b in compacted if LATER in str(b["messages"])]
    assert after_later and all(LATER in _all_text(b["messages"][0]) or
                               any(_all_text(m) == LATER for m in b["messages"]) for b in after_later)
    # what was kept and what was summarized is recorded
    last = comps[-1]
    assert any(k["why"].startswith("user message") for k in last["kept"]) and last["summarized"]
    assert any(k["why"] == "recent turn" for k in comps[0]["kept"])


def test_summarization_is_chunked_to_fit(tmp_path):
    _write_parts(tmp_path, 6, lines=20, width=120)
    summaries = []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            summaries.append(body)
            return Reply([text(SUMMARY)])
        n = sum(1 for m in body["messages"] if m["role"] == "assistant")
        return Reply([tool("read_file", {"path": f"part{n}.txt"})]) if n < 4 else Reply([text("ok")])

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, context_window=30000, max_tokens=200,
                           compaction={"keep_turns": 0})
        try:
            await agent.run(TASK)
            agent.config.context_window = 2500  # the window shrinks: the history is now bigger than it
            await agent.compact("keep the line counts", reason="test")
            return agent
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script, window=30000) as ep:
        agent = asyncio.run(go(ep.url))
        from agent_scripted import count_tokens
        assert len(summaries) >= 3  # one request could not hold the transcript
        assert all(count_tokens(s) + s["max_tokens"] <= 2500 for s in summaries)
        assert all("keep the line counts" in s["messages"][0]["content"] for s in summaries)
        assert "Summary of the work before this part" in summaries[-1]["messages"][0]["content"]
        assert count_tokens(agent.request()) < 2500 and blocks(agent.messages[0])[0]["text"] == TASK


def test_huge_tool_result_is_cut_to_fit_and_estimate_works_without_count_tokens(tmp_path):
    (tmp_path / "huge.txt").write_text("".join(f"{i:05d} " + "q" * 90 + "\n" for i in range(900)))
    seen = []

    def script(body):
        if body.get("system") == SUMMARY_SYSTEM:
            return Reply([text(SUMMARY)])
        seen.append(body)
        return Reply([tool("read_file", {"path": "huge.txt"})]) if len(seen) == 1 else Reply([text("read it")])

    async def go(url):
        agent = make_agent(url, tmp_path, only={"read_file"}, context_window=4000, max_tokens=200)
        try:
            return await agent.run(TASK)
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script, window=4000, count_tokens_enabled=False) as ep:
        result = asyncio.run(go(ep.url))
    assert result.text == "read it" and ep.oversized == []
    final = seen[-1]["messages"]
    _check_pairing(final)
    cut = [b for m in final for b in blocks(m) if b["type"] == "tool_result"]
    assert cut and "removed by compaction" in cut[0]["content"] and "00000" in cut[0]["content"]


def test_parse_sections_is_fixed_shape():
    parsed = parse_sections("intro line\n## Current focus\n- a\n**Open issues**\n- b\n## Unrelated\n- c")
    assert list(parsed) == list(SUMMARY_SECTIONS)
    assert parsed["Current focus"] == "- a" and parsed["Open issues"].startswith("- b")
    assert "intro line" in parsed["Important context"]
    rendered = render_summary(parsed)
    assert [line for line in rendered.splitlines() if line.startswith("## ")] == [f"## {s}" for s in SUMMARY_SECTIONS]


def test_context_that_cannot_fit_fails_clearly_without_calling_the_model(tmp_path):
    """All tools at a 1,024-token window: the system prompt and tool definitions alone overflow it.
    Compaction has nothing to summarize, so the run stops with an error that says so (and how to go
    on) instead of growing the context and sending a request the server must reject."""
    import pytest

    from moonlet.agent.loop import ContextTooSmall

    calls = []

    def script(body):
        calls.append(body)
        return Reply([text("should not be reached")])

    async def go(url):
        agent = make_agent(url, tmp_path, context_window=1024, max_tokens=200)
        try:
            with pytest.raises(ContextTooSmall, match=r"1024-token window.*tool definitions.*--tools"):
                await agent.run(TASK)
            return agent
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script, window=1024) as ep:
        agent = asyncio.run(go(ep.url))
    assert calls == [] and ep.oversized == []
    assert agent.store.compactions(agent.session_id) == []
    session = agent.store.get_session(agent.session_id)
    assert session["status"] == "failed" and "ContextTooSmall" in session["error"]
    assert [m["content"] for m in agent.store.messages(agent.session_id)] == [TASK]  # the task is kept
