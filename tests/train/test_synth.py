"""Synthetic conversations: the calculator, held-out split, K2 rendering and the assistant loss mask."""

import json
import random

import pytest

from moonlet.testing import tiny_tokenizer_dir
from moonlet.tokenizer import Tokenizer
from moonlet.train.synth import (TOOLS, conversation, encode_conversation, evaluate_expression, generate_tasks,
                                 is_heldout, run_tool)


def test_calculator_agrees_with_python():
    rng = random.Random(0)
    for _ in range(300):
        expr = str(rng.randint(0, 50))
        for _ in range(rng.randint(0, 4)):
            expr = f"{expr} {rng.choice('+-*')} {rng.randint(0, 50)}"
            if rng.random() < 0.3:
                expr = f"({expr})"
        assert evaluate_expression(expr) == eval(expr), expr  # Python's integer arithmetic is the reference
    assert evaluate_expression("-(3 - 10) * 2") == 14
    for bad in ("2 / 3", "import os", "(1 + 2", "1 +", "2 ** 3"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)


def test_heldout_tasks_never_appear_in_training():
    train = generate_tasks(3000, seed=1)
    held = generate_tasks(200, seed=2, heldout=True)
    assert not {t.key() for t in train} & {t.key() for t in held}
    assert all(is_heldout(t) for t in held) and not any(is_heldout(t) for t in train if t.kind != "chat")
    kinds = {t.kind for t in held}
    assert {"calc", "read", "read_calc", "calc_chain"} <= kinds and "chat" not in kinds
    assert len({t.kind for t in train}) == 5


def test_tasks_are_consistent_with_their_tools():
    for task in generate_tasks(200, seed=3):
        results = [run_tool(task, name, args) for name, args in task.calls]
        assert not any(r.startswith("error") for r in results)
        if task.kind != "chat":
            assert results[-1] == task.expect or task.expect in task.answer
            assert task.expect in task.answer


def test_wide_operands_mix_in_four_digit_arithmetic_and_leave_other_seeds_alone():
    import re

    from moonlet.train.synth import TASK_MIX

    base = generate_tasks(400, seed=11, mix=TASK_MIX)
    assert [t.user for t in generate_tasks(400, seed=11, mix=TASK_MIX, wide_operands=0.0)] == [t.user for t in base]
    wide = generate_tasks(400, seed=11, mix=TASK_MIX, wide_operands=0.5)
    arith = [t for t in wide if t.kind in ("calc", "calc_chain")]
    big = [t for t in arith if re.search(r"\b\d{4}\b", t.calls[0][1]["expression"])]
    assert 0.25 * len(arith) < len(big) < 0.75 * len(arith)
    assert not any(re.search(r"\b\d{4}\b", t.calls[0][1]["expression"]) for t in base
                   if t.kind in ("calc", "calc_chain"))
    for task in big:  # the answers are still what Python computes
        expr = task.calls[0][1]["expression"]
        assert run_tool(task, "calculator", {"expression": expr}) == str(eval(expr))
    with pytest.raises(ValueError, match="between 0 and 1"):
        generate_tasks(5, seed=1, wide_operands=1.5)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_conversation_renders_in_k2_format_and_masks_assistant_turns(tokenizer):
    task = next(t for t in generate_tasks(50, seed=4) if t.kind == "read_calc")
    msgs = conversation(task)
    ids, mask = encode_conversation(tokenizer, msgs, TOOLS)
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=False)
    path, expr = task.calls[0][1]["path"], task.calls[1][1]["expression"]
    # the spec's tool-call and tool-result shapes, written out by hand
    call0 = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.read_file:0<|tool_call_argument_begin|>"
             + json.dumps({"path": path}) + "<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    call1 = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:1<|tool_call_argument_begin|>"
             + json.dumps({"expression": expr}) + "<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    assert "<|im_system|>read_file<|im_middle|>## Return of functions.read_file:0" in text
    assert text.startswith("<|im_system|>tool_declare<|im_middle|>")
    assert text.count("<|im_assistant|>assistant<|im_middle|>") == 3
    masked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert masked == call0 + call1 + task.answer + "<|im_end|>"
    assert mask[-1] == 1 and mask[0] == 0


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_quoted_paths_tokenize_like_the_tool_call_json(tokenizer):
    tasks = [t for t in generate_tasks(40, seed=6, quote_paths=True) if t.kind in ("read", "read_calc")]
    assert tasks
    for task in tasks:
        path = task.calls[0][1]["path"]
        assert f'"{path}"' in task.user
        piece = tokenizer.encode(' "' + path)
        assert _contains(tokenizer.encode(task.user), piece)
        assert _contains(tokenizer.encode(json.dumps({"path": path})), piece)
    plain = generate_tasks(40, seed=6)
    assert [t.key() for t in plain] == [t.key() for t in generate_tasks(40, seed=6, quote_paths=True)]
