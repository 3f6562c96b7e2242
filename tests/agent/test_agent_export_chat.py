"""`moonlet agent export-chat`: sessions written by the agent itself become Anthropic-shape
conversations equal to what the model was sent, and convert into training shards."""

import asyncio
import io
import json

from agent_scripted import Reply, ScriptedEndpoint, last_results, make_agent, result_text, text, thinking, tool

from moonlet.agent import SessionStore
from moonlet.agent.export import export_conversations, select_sessions, session_conversation
from moonlet.chat import builtin_template
from moonlet.testing import tiny_tokenizer_dir
from moonlet.tokenizer import Tokenizer
from moonlet.train.chat_data import build_chat_dataset, encode_chat, to_chat_messages
from moonlet.train.data import TokenDataset


def _script(body):
    if last_results(body):
        return Reply([text(f"The answer is {result_text(last_results(body)[0])}.")])
    if len([m for m in body["messages"] if m["role"] == "user"]) > 1:
        return Reply([thinking("be polite"), text("You're welcome.")])
    return Reply([thinking("I should use the calculator"), text("Computing."),
                  tool("calculator", {"expression": "1234 * 5678"})])


def _run_session(db, workdir):
    """Two turns of a real agent over a file-backed store; returns (session id, requests the model got)."""
    with ScriptedEndpoint(_script) as ep:
        agent = make_agent(ep.url, workdir, SessionStore(db), only={"calculator", "read_file"})

        async def go():
            try:
                await agent.run("What is 1234 * 5678?")
                await agent.run("Thanks!")
            finally:
                await agent.close()
                await agent.client.aclose()

        asyncio.run(go())
        agent.store.close()
    return agent.session_id, ep.requests


def test_export_is_what_the_model_was_sent_and_converts_to_training_data(tmp_path):
    db = tmp_path / "sessions.db"
    sid, requests = _run_session(db, tmp_path)
    store = SessionStore(db)
    try:
        other = store.create_session("never ran", {})  # no model call: nothing to export
        record = session_conversation(store, sid)
        assert select_sessions(store, statuses=["done"]) == [sid]  # finished top-level sessions
        assert select_sessions(store, statuses=None) == [sid, other]
        sink = io.StringIO()
        report = export_conversations(store, [sid, other], sink)
    finally:
        store.close()
    assert report.written == [sid] and report.skipped[0][0] == other and "no recorded" in report.skipped[0][1]
    last = requests[-1]
    # the transcript is what the last request carried plus the reply to it; system and tools as sent
    assert record["messages"][:-1] == last["messages"]
    assert record["messages"][-1] == {"role": "assistant", "content": [thinking("be polite"), text("You're welcome.")]}
    assert record["system"] == last["system"] and record["tools"] == last["tools"]
    assert sorted(t["name"] for t in record["tools"]) == ["calculator", "read_file"]
    assert record["metadata"]["session_id"] == sid and record["metadata"]["status"] == "done"
    assert [json.loads(line) for line in sink.getvalue().splitlines()] == [record]

    # converting: the mask covers exactly the three assistant turns as the K2.5/K2.6 format writes them
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path / "tok"))
    tok.chat_template = builtin_template("kimi-k2.6")
    messages, tools = to_chat_messages(record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    enc = encode_chat(tok, messages, tools)
    call = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>'
            '{"expression": "1234 * 5678"}<|tool_call_end|><|tool_calls_section_end|>')

    def runs(ids, mask):
        out, cur = [], []
        for i, m in zip(ids + [0], mask + [0]):
            if m:
                cur.append(i)
            elif cur:
                out.append(tok.decode(cur))
                cur = []
        return out

    # two examples: once the first answer is given, the template drops the tool round's reasoning from the
    # history, so the tool round (with its reasoning) and the last reply cannot share one token sequence
    assert [runs(*ex) for ex in enc.examples] == [
        ["I should use the calculator</think>Computing." + call + "<|im_end|>",
         f"</think>The answer is {1234 * 5678}.<|im_end|>"],
        ["be polite</think>You're welcome.<|im_end|>"]]
    ids = enc.examples[1][0]
    assert tok.decode(ids).startswith("<|im_system|>tool_declare<|im_middle|>")


def test_export_chat_cli_round_trip(tmp_path, capsys):
    from moonlet.cli import main

    db = tmp_path / "sessions.db"
    _run_session(db, tmp_path)
    _run_session(db, tmp_path)
    out = tmp_path / "sessions.jsonl"
    assert main(["agent", "export-chat", "--db", str(db), "-o", str(out)]) == 0
    assert "wrote 2 conversations" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2
    assert main(["agent", "export-chat", "--db", str(db), "-o", str(out), "--status", "failed"]) == 0
    assert "wrote 0 conversations" in capsys.readouterr().err
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    assert main(["agent", "export-chat", "--db", str(db), "-o", str(out)]) == 0
    report = build_chat_dataset([out], Tokenizer.from_pretrained(tok_dir), tmp_path / "data")
    assert report.conversations == 2 and report.assistant_turns == 6 and report.skipped == 0
    assert TokenDataset(tmp_path / "data" / "train").num_tokens == report.tokens
