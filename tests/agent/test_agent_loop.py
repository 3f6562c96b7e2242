"""The agent loop against the scripted endpoint: tool round trips, bad tool calls, the repeated-call
guard, concurrency of independent tools, budgets, retries and approvals."""

import asyncio

from agent_scripted import (Reply, ScriptedEndpoint, blocks, error, last_results, make_agent, result_text, text,
                            thinking, tool)

from moonlet.agent.tools.base import Tool, ToolResult


async def _run(agent, prompt):
    try:
        return await agent.run(prompt)
    finally:
        await agent.close()
        await agent.client.aclose()


def test_tool_round_trip_and_transcript(tmp_path):
    def script(body):
        results = last_results(body)
        if not results:
            return Reply([thinking("I should use the calculator"), text("Computing."),
                          tool("calculator", {"expression": "1234 * 5678"})])
        return Reply([text(f"The answer is {result_text(results[0])}.")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path)
        result = asyncio.run(_run(agent, "What is 1234 * 5678?"))
    assert result.stop_reason == "end_turn" and result.steps == 2
    assert result.text == f"The answer is {1234 * 5678}."
    second = ep.requests[1]["messages"]
    # the assistant turn goes back whole (thinking with its signature included) and the result pairs with it
    assert [b["type"] for b in second[1]["content"]] == ["thinking", "text", "tool_use"]
    assert second[1]["content"][0]["signature"] == "sig"
    assert second[2]["content"][0]["tool_use_id"] == second[1]["content"][2]["id"]
    rows = agent.store.messages(agent.session_id)
    assert [r["kind"] for r in rows] == ["prompt", "assistant", "results", "assistant"]
    calls = agent.store.tool_calls(agent.session_id)
    assert calls[0]["name"] == "calculator" and calls[0]["result"] == str(1234 * 5678)
    assert agent.store.get_session(agent.session_id)["status"] == "done"


def test_invalid_tool_calls_become_error_results(tmp_path):
    def script(body):
        n = len([m for m in body["messages"] if m["role"] == "assistant"])
        if n == 0:
            return Reply([tool("calculator", {}), tool("calculator", {"expr": "1"}), tool("no_such_tool", {}),
                          tool("read_file", {"path": 5})], raw_json={0: '{"expression": "2*'})
        return Reply([text("ok")])

    with ScriptedEndpoint(script) as ep:
        asyncio.run(_run(make_agent(ep.url, tmp_path), "go"))
    results = last_results(ep.requests[1])
    assert all(r["is_error"] for r in results) and len(results) == 4
    assert "not valid JSON" in result_text(results[0]) and '{"expression": "2*' in result_text(results[0])
    assert "missing required field 'expression'" in result_text(results[1])
    assert "Unknown tool 'no_such_tool'" in result_text(results[2])
    assert "input.path: expected string" in result_text(results[3])


def test_repeated_identical_calls_get_reminders_then_stop(tmp_path):
    with ScriptedEndpoint(lambda body: Reply([tool("glob", {"pattern": "*.txt"})])) as ep:
        result = asyncio.run(_run(make_agent(ep.url, tmp_path), "loop forever"))
    assert result.stop_reason == "repeat_guard" and len(ep.requests) == 12
    results = [result_text(b) for m in ep.requests[-1]["messages"][1:] if m["role"] == "user" for b in blocks(m)]
    reminded = [i + 1 for i, r in enumerate(results) if "Reminder" in r]
    assert reminded == [3, 5, 8]


class SlowTool(Tool):
    """Records how many of its calls overlap."""

    def __init__(self, name, concurrent):
        self.name, self.read_only = name, concurrent
        self.description = "slow"
        self.input_schema = {"type": "object", "properties": {"i": {"type": "integer"}}}
        self.active = self.max_active = 0
        self.order = []

    async def run(self, args, ctx):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await asyncio.sleep(0.1)
        self.order.append(args["i"])
        self.active -= 1
        return ToolResult(f"done {args['i']}")


def test_independent_calls_run_concurrently_and_results_keep_order(tmp_path):
    par, seq = SlowTool("par", True), SlowTool("seq", False)

    def script(body):
        if len(body["messages"]) == 1:
            return Reply([tool("par", {"i": i}) for i in range(4)] + [tool("seq", {"i": i}) for i in range(3)])
        return Reply([text("ok")])

    with ScriptedEndpoint(script) as ep:
        asyncio.run(_run(make_agent(ep.url, tmp_path, extra_tools=[par, seq]), "go"))
    assert par.max_active == 4 and seq.max_active == 1 and seq.order == [0, 1, 2]
    results = last_results(ep.requests[1])
    assert [result_text(r) for r in results] == [f"done {i}" for i in range(4)] + [f"done {i}" for i in range(3)]
    uses = [b for b in ep.requests[1]["messages"][1]["content"] if b["type"] == "tool_use"]
    assert [r["tool_use_id"] for r in results] == [u["id"] for u in uses]


def test_step_and_token_budgets(tmp_path):
    busy = lambda body: Reply([tool("calculator", {"expression": str(len(body["messages"]))})])  # noqa: E731
    with ScriptedEndpoint(busy) as ep:
        result = asyncio.run(_run(make_agent(ep.url, tmp_path, max_steps=3), "go"))
    assert result.stop_reason == "max_steps" and len(ep.requests) == 3
    with ScriptedEndpoint(busy) as ep:
        agent = make_agent(ep.url, tmp_path, token_budget=1)
        result = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "token_budget" and len(ep.requests) == 1
    assert agent.state.input_tokens > 0 and agent.state.output_tokens > 0
    with ScriptedEndpoint(busy) as ep:
        agent = make_agent(ep.url, tmp_path, max_hours=1e-12)
        result = asyncio.run(_run(agent, "go"))
    assert result.stop_reason == "max_hours" and len(ep.requests) == 0 and agent.state.elapsed_s > 0


def test_rate_limits_and_server_errors_are_retried_in_the_loop(tmp_path):
    replies = [error(429, "rate_limit_error", retry_after=0), error(500, "api_error"),
               Reply([tool("calculator", {"expression": "2+2"})]), error(502, "api_error"), Reply([text("4")])]
    with ScriptedEndpoint(lambda body: replies.pop(0)) as ep:
        agent = make_agent(ep.url, tmp_path)
        result = asyncio.run(_run(agent, "2+2?"))
    assert result.text == "4" and len(ep.requests) == 5
    assert [e["data"]["status"] for e in agent.store.events(agent.session_id) if e["kind"] == "retry"] == [429, 500, 502]


def test_approval_policies(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")

    def script(body):
        if len(body["messages"]) == 1:
            return Reply([tool("read_file", {"path": "a.txt"}), tool("shell", {"command": "echo hi > b.txt"})])
        return Reply([text("ok")])

    with ScriptedEndpoint(script) as ep:  # reads run, the shell needs a terminal to ask
        asyncio.run(_run(make_agent(ep.url, tmp_path, approval="reads"), "go"))
    read, shell = last_results(ep.requests[1])
    assert "alpha" in result_text(read) and not read.get("is_error")
    assert shell["is_error"] and "--yolo" in result_text(shell) and not (tmp_path / "b.txt").exists()

    from moonlet.agent.approval import Decision
    asked = []

    async def prompt(summary):
        asked.append(summary)
        return Decision(False, feedback="use python instead")

    with ScriptedEndpoint(script) as ep:  # ask: every call is put to the user
        asyncio.run(_run(make_agent(ep.url, tmp_path, approval="ask", prompt=prompt), "go"))
    assert len(asked) == 2 and "use python instead" in result_text(last_results(ep.requests[1])[1])

    with ScriptedEndpoint(script) as ep:
        asyncio.run(_run(make_agent(ep.url, tmp_path, approval="yolo"), "go"))
    assert (tmp_path / "b.txt").read_text() == "hi\n"


def test_cancelling_a_turn_rolls_back_to_the_checkpoint(tmp_path):
    calls = []

    def script(body):
        calls.append(body)
        if len(calls) == 1:
            return Reply([tool("calculator", {"expression": "6*7"})])
        if len(calls) == 2:
            return Reply([text("never seen")], delay=30)
        return Reply([text("42")])

    async def go(url):
        agent = make_agent(url, tmp_path)
        try:
            task = asyncio.ensure_future(agent.run("6*7?"))
            while len(calls) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            status = agent.store.get_session(agent.session_id)["status"]
            kinds = [m["_kind"] for m in agent.messages]
            result = await agent.run(None)  # continue the unfinished turn
            return status, kinds, result, agent
        finally:
            await agent.close()
            await agent.client.aclose()

    with ScriptedEndpoint(script) as ep:
        status, kinds, result, agent = asyncio.run(go(ep.url))
    assert status == "interrupted" and kinds == ["prompt", "assistant", "results"]
    assert result.text == "42" and len(calls[2]["messages"]) == 3


def test_fit_thinking_keeps_the_budget_inside_the_apis_limits():
    from moonlet.agent.loop import fit_thinking

    t = {"type": "enabled", "budget_tokens": 4096}
    assert fit_thinking(t, 8192) is t  # fits: sent as configured
    assert fit_thinking(t, 4096) == {"type": "enabled", "budget_tokens": 2048}  # clamped reply: half of it
    assert fit_thinking(t, 3001) == {"type": "enabled", "budget_tokens": 1500}
    assert fit_thinking(t, 1500) == {"type": "enabled", "budget_tokens": 1024}  # never below the API's minimum
    assert fit_thinking(t, 1024) is None and fit_thinking(t, 10) is None  # no room for 1024 + an answer
    assert fit_thinking(None, 10) is None
    assert fit_thinking({"type": "disabled"}, 10) == {"type": "disabled"}


def test_thinking_budget_shrinks_when_the_context_clamps_the_reply(tmp_path):
    def script(body):
        n = len([m for m in body["messages"] if m["role"] == "assistant"])
        if n == 0:
            return Reply([text("x " * 6000), tool("calculator", {"expression": "1+1"})])  # ~3,000 tokens
        return Reply([text("done")])

    with ScriptedEndpoint(script) as ep:
        agent = make_agent(ep.url, tmp_path, context_window=12_000, max_tokens=8192,
                           thinking={"type": "enabled", "budget_tokens": 6000}, compaction={"threshold": 1.0})
        asyncio.run(_run(agent, "go"))
    first, second = ep.requests[0], ep.requests[1]
    assert first["max_tokens"] == 8192 and first["thinking"]["budget_tokens"] == 6000
    # the window leaves less than the configured reply: the budget stays below max_tokens and >= 1024
    assert second["max_tokens"] <= 6000
    assert 1024 <= second["thinking"]["budget_tokens"] < second["max_tokens"]
