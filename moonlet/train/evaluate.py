"""Held-out tool-use evaluation: does the model call the right tool with the right arguments and, after
the tool results, state the right final answer?

For each held-out task (:func:`moonlet.train.synth.generate_tasks` with ``heldout=True``) the model
generates greedily from the rendered prompt; its output is parsed with :func:`moonlet.chat.parse_output`.
Every expected tool round must produce a well-formed call of the expected tool with exactly the
expected arguments; the tool is then run (:func:`moonlet.train.synth.run_tool`) and its result
appended; the final turn (no tool call) must state the expected value. A task passes only if all
of that holds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import torch

from .synth import Task, generate_tasks, prompt_messages, run_tool, tool_call_id

EVAL_SEED = 20250711


@dataclass
class TaskResult:
    kind: str
    user: str
    passed: bool
    well_formed: bool  # every expected round produced a parseable tool call with JSON arguments
    args_ok: bool  # ... of the expected tool with the expected arguments
    answer_ok: bool
    failure: str = ""
    transcript: list[str] = field(default_factory=list)


def _states(answer: str, expect: str) -> bool:
    """The answer states ``expect`` (numbers must not be part of a longer number)."""
    if re.fullmatch(r"-?\d+", expect):
        return re.search(r"(?<![\d-])" + re.escape(expect) + r"(?!\d)", answer) is not None
    return expect in answer


@torch.no_grad()
def run_task(model, tokenizer, task: Task, max_tokens: int = 96) -> TaskResult:
    from ..chat import parse_output
    from ..commands.generate import generate_ids

    stop = set(tokenizer.stop_token_ids) | set(model.config.eos_token_ids)
    messages = prompt_messages(task)
    transcript: list[str] = []
    result = TaskResult(task.kind, task.user, False, True, True, False)
    for round_idx in range(len(task.calls) + 1):
        ids = tokenizer.apply_chat_template(messages, tools=task.tools, add_generation_prompt=True, tokenize=True)
        out = [t for t in generate_ids(model, ids, max_tokens, stop) if t not in stop]
        text = tokenizer.decode(out)
        transcript.append(text)
        parsed = parse_output(text)
        if round_idx < len(task.calls):
            name, args = task.calls[round_idx]
            if parsed.error or not parsed.tool_calls:
                result.well_formed = result.args_ok = False
                result.failure = f"round {round_idx}: no well-formed tool call ({parsed.error or 'none'})"
                break
            call = parsed.tool_calls[0]
            try:
                got = json.loads(call.arguments)
            except json.JSONDecodeError:
                result.well_formed = result.args_ok = False
                result.failure = f"round {round_idx}: arguments are not JSON: {call.arguments!r}"
                break
            if call.name != name or got != args:
                result.args_ok = False
                result.failure = f"round {round_idx}: called {call.name}({got}) instead of {name}({args})"
                break
            cid = tool_call_id(name, round_idx)
            messages.append({"role": "assistant", "content": parsed.content, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": call.arguments}}]})
            messages.append({"role": "tool", "tool_call_id": cid, "name": name, "content": run_tool(task, name, got)})
        else:
            if parsed.tool_calls:
                result.failure = f"extra tool call {parsed.tool_calls[0].name} instead of a final answer"
                break
            result.answer_ok = _states(parsed.content, task.expect)
            if not result.answer_ok:
                result.failure = f"final answer {parsed.content!r} does not state {task.expect!r}"
    result.passed = result.well_formed and result.args_ok and result.answer_ok
    result.transcript = transcript
    return result


def evaluate_tool_use(model, tokenizer, num_tasks: int = 200, seed: int = EVAL_SEED, progress: bool = False,
                      quote_paths: bool = True, wide_operands: float = 0.0) -> dict:
    """Run ``num_tasks`` held-out tasks (file paths quoted in the requests, as in moonlet-tiny's
    training, unless ``quote_paths=False``; ``wide_operands`` of the expressions with operands of up
    to four digits, see ``generate_tasks``); returns {"pass_rate", "well_formed_rate", "args_rate",
    "by_kind": {kind: pass rate}, "failures": [...first 20...], "seconds"}."""
    tasks = generate_tasks(num_tasks, seed, heldout=True, quote_paths=quote_paths, wide_operands=wide_operands)
    start = time.perf_counter()
    results = []
    for i, task in enumerate(tasks):
        results.append(run_task(model, tokenizer, task))
        if progress and (i + 1) % 20 == 0:
            rate = sum(r.passed for r in results) / len(results)
            print(f"  {i + 1}/{len(tasks)} tasks, pass rate so far {rate:.3f}", flush=True)
    by_kind: dict[str, list[bool]] = {}
    for r in results:
        by_kind.setdefault(r.kind, []).append(r.passed)
    n = max(len(results), 1)
    return {
        "num_tasks": len(results),
        "pass_rate": sum(r.passed for r in results) / n,
        "well_formed_rate": sum(r.well_formed for r in results) / n,
        "args_rate": sum(r.args_ok for r in results) / n,
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "failures": [{"kind": r.kind, "user": r.user, "failure": r.failure, "transcript": r.transcript}
                     for r in results if not r.passed][:20],
        "seconds": time.perf_counter() - start,
    }
