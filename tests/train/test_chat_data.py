"""Chat conversations -> training shards: shape detection, the assistant loss mask against a reference
built from the K2 format by hand and from the serving prompts, splitting where the template drops
earlier reasoning, per-line errors, over-long examples and the eval split."""

import json

import pytest

from moonlet.chat import builtin_template
from moonlet.testing import tiny_tokenizer_dir
from moonlet.tokenizer import Tokenizer
from moonlet.train.chat_data import ChatDataError, build_chat_dataset, encode_chat, format_of, to_chat_messages
from moonlet.train.data import TokenDataset

CALC = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
ARGS = '{"expression": "12 * 7"}'

# one conversation in both shapes: a tool round with reasoning, a final answer with reasoning, then a
# second user turn answered with reasoning
OPENAI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "Let me compute.", "reasoning_content": "use the calculator",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "calculator", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "84"},
        {"role": "assistant", "content": "It is 84.", "reasoning_content": "the tool said 84"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome.", "reasoning_content": "be polite"},
    ],
    "tools": [{"type": "function", "function": {"name": "calculator", "description": "Arithmetic.",
                                                "parameters": CALC}}],
}
ANTHROPIC = {
    "system": "Be brief.",
    "messages": [
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use the calculator", "signature": "s1"},
            {"type": "text", "text": "Let me compute."},
            {"type": "tool_use", "id": "toolu_01", "name": "calculator", "input": {"expression": "12 * 7"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "84"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "the tool said 84", "signature": "s2"},
                                          {"type": "text", "text": "It is 84."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "be polite"},
                                          {"type": "text", "text": "You're welcome."}]},
    ],
    "tools": [{"name": "calculator", "description": "Arithmetic.", "input_schema": CALC}],
}
CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
        + ARGS + "<|tool_call_end|><|tool_calls_section_end|>")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def tokenizer(tok_dir, template="kimi-k2"):
    tok = Tokenizer.from_pretrained(tok_dir)
    tok.chat_template = builtin_template(template)
    return tok


def masked_runs(tok, ids, mask):
    """The decoded texts of the maximal runs of mask 1."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_shapes_are_detected_and_mixed_ones_refused():
    assert format_of(OPENAI) == "openai" and format_of(ANTHROPIC) == "anthropic"
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert format_of(plain) == "openai" and format_of({**plain, "format": "anthropic"}) == "anthropic"
    mixed = {"messages": [{"role": "tool", "content": "x"},
                          {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}
    with pytest.raises(ValueError, match="mixes the Anthropic shape"):
        format_of(mixed)


def test_both_shapes_give_the_same_messages_and_tokens(tok_dir):
    m1, t1 = to_chat_messages(OPENAI)
    m2, t2 = to_chat_messages(ANTHROPIC)
    assert m1 == m2 and t1 == t2
    assert m1[2]["tool_calls"][0]["id"] == "functions.calculator:0" and m1[3]["tool_call_id"] == "functions.calculator:0"
    for template in ("kimi-k2", "kimi-k2.6", "kimi-k2-thinking"):
        tok = tokenizer(tok_dir, template)
        assert encode_chat(tok, m1, t1).examples == encode_chat(tok, m2, t2).examples


def _check_against_serving_prompts(tok, messages, tools, encoded, completions):
    """Every assistant turn is trained in exactly one example; there the tokens before it are exactly the
    prompt the server would encode for that turn, and its masked tokens decode to the expected text."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    seen = []
    for ids, mask in encoded.examples:
        starts = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
        ends = [k for k in range(len(mask)) if mask[k] and (k + 1 == len(mask) or not mask[k + 1])]
        assert ends[-1] == len(ids) - 1  # an example ends with an assistant turn
        for a, b in zip(starts, ends):
            # which turn: the one whose serving prompt encodes to exactly the tokens before the span
            match = [i for i in turns
                     if tok.encode(tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True))
                     == ids[:a]]
            assert len(match) == 1
            seen.append(match[0])
            assert tok.decode(ids[a:b + 1]) == completions[match[0]]
    assert sorted(seen) == turns


def test_mask_is_exactly_the_assistant_tokens_k2(tok_dir):
    tok = tokenizer(tok_dir, "kimi-k2")  # renders no reasoning
    messages, tools = to_chat_messages(OPENAI)
    enc = encode_chat(tok, messages, tools)
    assert len(enc.examples) == 1 and enc.turns == 3 and enc.reasoning_dropped == 3
    ids, mask = enc.examples[0]
    # the K2 format written out by hand: content, tool-call section, end of turn
    expected = ["Let me compute." + CALL + "<|im_end|>", "It is 84.<|im_end|>", "You're welcome.<|im_end|>"]
    assert masked_runs(tok, ids, mask) == expected
    full = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
    assert ids == tok.encode(full)  # piecewise encoding at the turn boundaries == the whole text
    _check_against_serving_prompts(tok, messages, tools, enc, dict(zip([2, 4, 6], expected)))


def test_thinking_template_keeps_reasoning_and_splits_where_history_drops_it(tok_dir):
    tok = tokenizer(tok_dir, "kimi-k2.6")
    messages, tools = to_chat_messages(ANTHROPIC)
    enc = encode_chat(tok, messages, tools)
    assert enc.reasoning_dropped == 0 and enc.turns == 3
    # the tool round and the answer after it share an example (the tool loop's reasoning stays in the
    # history); the next turn's prompt renders that answer with empty <think></think>, so it is a second one
    completions = {2: "use the calculator</think>Let me compute." + CALL + "<|im_end|>",
                   4: "the tool said 84</think>It is 84.<|im_end|>",
                   6: "be polite</think>You're welcome.<|im_end|>"}
    assert [masked_runs(tok, *ex) for ex in enc.examples] == [[completions[2], completions[4]], [completions[6]]]
    _check_against_serving_prompts(tok, messages, tools, enc, completions)
    second = tok.decode(enc.examples[1][0])
    assert "<think></think>It is 84." in second and "the tool said 84" not in second


def test_k2_thinking_template_trains_final_answers_without_the_reasoning_it_never_renders(tok_dir):
    tok = tokenizer(tok_dir, "kimi-k2-thinking")
    messages, tools = to_chat_messages(OPENAI)
    enc = encode_chat(tok, messages, tools)
    completions = {2: "<think>use the calculator</think>Let me compute." + CALL + "<|im_end|>",
                   4: "<think></think>It is 84.<|im_end|>", 6: "<think></think>You're welcome.<|im_end|>"}
    assert enc.reasoning_dropped == 2
    _check_against_serving_prompts(tok, messages, tools, enc, completions)


def test_agrees_with_the_tiny_recipe_encoder_on_synthetic_tasks(tok_dir):
    from moonlet.train.synth import conversation, encode_conversation, generate_tasks

    tok = tokenizer(tok_dir, "kimi-k2")
    for task in generate_tasks(30, seed=5):
        msgs = conversation(task)
        enc = encode_chat(tok, msgs, task.tools)
        assert enc.examples == [encode_conversation(tok, msgs, task.tools)]


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


BAD = [
    "{not json",
    {"messages": [{"role": "user", "content": "no reply"}]},
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"system": "s", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "x", "content": "y"}]}]},
    {"messages": "hello"},
]


def test_bad_lines_name_file_line_and_problem(tmp_path, tok_dir):
    tok = tokenizer(tok_dir)
    expected = ["not valid JSON", "no assistant message to train on", "role must be system, developer, user",
                "unsupported content block type 'tool_result' in an assistant turn", "'messages' must be a non-empty list"]
    for k, (bad, what) in enumerate(zip(BAD, expected)):
        src = _write(tmp_path / f"bad{k}.jsonl", [OPENAI, "", bad])  # the blank line still counts as line 2
        with pytest.raises(ChatDataError) as info:
            build_chat_dataset([src], tok, tmp_path / f"out{k}")
        assert f"bad{k}.jsonl:3:" in str(info.value) and what in str(info.value), str(info.value)
    src = _write(tmp_path / "mixed.jsonl", [OPENAI] + BAD + [ANTHROPIC])
    report = build_chat_dataset([src], tok, tmp_path / "skip", skip_bad=True)
    assert report.skipped == len(BAD) and report.conversations == 2 and len(report.errors) == len(BAD)
    assert [e.split(":")[1] for e in report.errors] == [str(n) for n in range(2, 2 + len(BAD))]
    with pytest.raises(ChatDataError, match="no conversation could be converted"):
        build_chat_dataset([_write(tmp_path / "allbad.jsonl", BAD)], tok, tmp_path / "none", skip_bad=True)


def test_dataset_files_overlong_examples_and_eval_split(tmp_path, tok_dir):
    tok = tokenizer(tok_dir, "kimi-k2.6")
    lines = [OPENAI] + [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
                        for w in ("one", "two", "three", "four", "five")]
    src = _write(tmp_path / "c.jsonl", lines)
    long_ids = encode_chat(tok, *to_chat_messages(OPENAI)).examples
    short_len = len(encode_chat(tok, *to_chat_messages(lines[1])).examples[0][0])
    limit = max(len(ids) for ids, _ in long_ids) - 1  # the longer OPENAI example is over it, the short ones not
    assert short_len <= limit

    dropped = build_chat_dataset([src], tok, tmp_path / "drop", max_tokens=limit)
    assert dropped.overlong == 1 and dropped.dropped == 1 and dropped.examples == 6
    cut = build_chat_dataset([src], tok, tmp_path / "cut", max_tokens=limit, overlong="truncate")
    assert cut.overlong == 1 and cut.truncated == 1 and cut.examples == 7
    ds = TokenDataset(tmp_path / "cut" / "train")
    lengths = sorted(int(b - a) for _, a, b in ds.docs)
    assert lengths[-1] == limit and ds.num_tokens == cut.tokens and ds.vocab_size == tok.vocab_size
    assert sum(int(ds.document(i)[1].sum()) for i in range(len(ds.docs))) == cut.trained_tokens

    split = build_chat_dataset([src], tok, tmp_path / "split", eval_fraction=0.3, seed=1)
    assert split.eval_conversations == 2 and split.conversations == 6
    train, held = TokenDataset(tmp_path / "split" / "train"), TokenDataset(tmp_path / "split" / "eval")
    assert len(train.docs) + len(held.docs) == split.examples == 7
    # the two examples of the OPENAI conversation stay in one split
    big = {len(ids) for ids, _ in long_ids}
    in_train = {int(b - a) for _, a, b in train.docs} & big
    in_eval = {int(b - a) for _, a, b in held.docs} & big
    assert (in_train == big and not in_eval) or (in_eval == big and not in_train)
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    assert report["examples"] == 7 and report["eval_dir"].endswith("eval")


def test_cli_prints_a_summary(tmp_path, tok_dir, capsys):
    from moonlet.cli import main

    src = _write(tmp_path / "c.jsonl", [OPENAI, ANTHROPIC, "{bad"])
    assert main(["data", "chat", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d")]) == 1
    assert "c.jsonl:3: not valid JSON" in capsys.readouterr().err
    assert main(["data", "chat", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d"),
                 "--skip-bad", "--template-arg", "thinking=true"]) == 0
    out = capsys.readouterr().out
    assert "conversations: 2 (6 assistant turns) -> 2 examples" in out and "skipped lines: 1" in out
    assert "reasoning not rendered by the chat template (trained without it): 6 assistant turns" in out
