"""Structured outputs: every constrained output parses and validates, greedy decoding equals a plain
loop that masks with xgrammar's matcher directly, free requests in the same batch are untouched, the
constraint starts after </think>, and speculative decoding and preemption give the same tokens."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.params import StructuredOutput
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.tokenizer import Tokenizer

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "maxItems": 3,
                 "items": {"type": "array", "maxItems": 3, "items": {"enum": [1, 2, 3]}}},
    },
    "required": ["name", "age", "color", "tags"],
}


def validate(value, schema, path="$") -> None:
    """A small JSON-schema check (the keywords the tests use); AssertionError naming the path."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing required {key!r}"
        for key, v in value.items():
            assert key in props, f"{path}: property {key!r} not in the schema (strict)"
            validate(v, props[key], f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: not an integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{path}: out of range"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), chat_template="kimi-k2.6"))


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tiny_k2_config(vocab_size=tok.vocab_size), seed=0)


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model=model, tokenizer=tok, num_blocks=128, block_size=8)


def schema_params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured=StructuredOutput(json_schema=SCHEMA, any_whitespace=False), **kw)


def masked_greedy_reference(model, tok, prompt: list[int], schema: dict, max_tokens: int) -> list[int]:
    """Greedy decoding with no engine: the whole sequence through the model each step, xgrammar's
    matcher built here from the tokenizer's bytes, its bitmask applied with torch, argmax. Tokens
    holding raw control bytes are never allowed (compact JSON has none; the engine masks them too)."""
    V = model.config.vocab_size
    vocab = [tok.token_bytes(i) for i in range(tok.num_base_tokens)]
    no_ctrl = torch.tensor([not any(b < 0x20 for b in v) for v in vocab] + [True] * (V - len(vocab)))
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=V)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(set(tok.stop_token_ids) | {1}))
    bitmask = xgr.allocate_token_bitmask(1, V)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [words, 32]
            allowed = bits.reshape(-1)[:V].bool() & no_ctrl
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(t)
            ids.append(t)
            assert matcher.accept_token(t)
            if matcher.is_terminated():
                break
    return out


def test_structured_output_fields_are_checked():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput(json_object=True, regex="a+")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(json_schema="{nope")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=[])
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured="json")
    assert SamplingParams(structured={"json_object": True}).structured == StructuredOutput(json_object=True)
    assert StructuredOutput(json_schema=SCHEMA).key == StructuredOutput(json_schema=json.dumps(SCHEMA)).key


def test_greedy_schema_output_equals_a_plain_masked_loop(llm, model, tok):
    prompt = tok.encode("Describe a person as JSON:")
    out = llm.generate(prompt, schema_params(temperature=0))[0]
    ref = masked_greedy_reference(model, tok, prompt, SCHEMA, 120)
    assert out.token_ids == ref
    assert out.finish_reason == "stop" and out.token_ids[-1] in tok.stop_token_ids + [1]
    validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_every_output_parses_and_validates(llm, tok, temperature):
    prompts = ["Hello", "Give me JSON.", "A list:", "1 2 3", "The Zen of Python"]
    params = [schema_params(temperature=temperature, seed=s, top_p=0.95) for s in range(len(prompts))]
    for out in llm.generate(prompts, params):
        assert out.finish_reason == "stop", out.text
        validate(json.loads(out.text), SCHEMA)
    objects = llm.generate(prompts, [SamplingParams(temperature=temperature, seed=s, max_tokens=200,
                                                    structured=StructuredOutput(json_object=True, any_whitespace=False))
                                     for s in range(len(prompts))])
    for out in objects:
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_regex_and_choice(llm):
    outs = llm.generate(["a", "b", "c"], [SamplingParams(temperature=1.0, seed=s, max_tokens=40,
                                                         structured=StructuredOutput(regex=r"[0-9]{3}-[a-c]{2,4}"))
                                          for s in range(3)])
    import re

    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", out.text), out.text
    choices = ['say "yes"', "café", "no"]
    outs = llm.generate(["a", "b", "c", "d"], [SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                                                              structured=StructuredOutput(choice=choices))
                                               for s in range(4)])
    assert all(out.text in choices and out.finish_reason == "stop" for out in outs)


def test_max_tokens_cuts_mid_json(llm, tok):
    full = llm.generate("Hello", schema_params(temperature=0))[0]
    cut = llm.generate("Hello", schema_params(temperature=0, max_tokens=10))[0]
    assert cut.finish_reason == "length" and cut.token_ids == full.token_ids[:10]
    with pytest.raises(json.JSONDecodeError):  # the cut JSON is incomplete
        json.loads(cut.text)
    assert full.text.startswith(cut.text)


def test_without_stop_tokens_the_request_ends_when_the_grammar_is_complete(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                                               structured=StructuredOutput(choice=["alpha", "beta"])))[0]
    assert out.finish_reason == "stop" and out.text in ("alpha", "beta")


def test_free_requests_in_a_mixed_batch_are_unchanged(llm):
    prompts = ["one", "two", "three", "four"]
    free = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    alone = llm.generate(prompts[:2], free)
    mixed = llm.generate(prompts, free + [schema_params(temperature=0), schema_params(temperature=1.0, seed=3)])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    for out in mixed[2:]:
        validate(json.loads(out.text), SCHEMA)


def test_reasoning_is_free_and_the_answer_is_constrained(llm, tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], thinking=True, tokenize=True)
    assert tok.decode(ids).endswith("<think>")
    k = 6  # the budget forces </think> after k reasoning tokens
    free = llm.generate(ids, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))[0]
    out = llm.generate(ids, schema_params(temperature=0, thinking_token_budget=k, max_tokens=140))[0]
    end = tok.token_id("</think>")
    assert out.token_ids[:k] == free.token_ids and out.token_ids[k] == end  # reasoning: the unconstrained tokens
    answer = tok.decode(out.token_ids[k + 1:], skip_special_tokens=True)
    assert out.finish_reason == "stop"
    validate(json.loads(answer), SCHEMA)
    # the same prompt with its thinking closed: constrained from the first token
    closed = ids + [end]
    out = llm.generate(closed, schema_params(temperature=0))[0]
    validate(json.loads(out.text), SCHEMA)


def test_speculative_decoding_gives_the_same_tokens(model, tok, llm):
    spec = LLM(model=model, tokenizer=tok, num_blocks=128, block_size=8, speculative="ngram",
               num_speculative_tokens=4, ngram_max=3, ngram_min=1)
    prompts = ["[[1, 1], [1, 1], [1, 1]]", "Hello", "name name name"]
    params = [schema_params(temperature=0), schema_params(temperature=0.8, seed=5),
              SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput(regex=r"(ab|a)+c"))]
    want = llm.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.stats()["spec_draft_tokens"] > 0
    for out in got[:2]:
        validate(json.loads(out.text), SCHEMA)


def test_preemption_keeps_the_matcher_state(model, tok, llm):
    prompts = ["Hello", "Give me JSON.", "A list:", "1 2 3"]
    params = [schema_params(temperature=0), schema_params(temperature=1.0, seed=2)] * 2
    want = llm.generate(prompts, params)
    small = LLM(model=model, tokenizer=tok, num_blocks=26, block_size=4, max_num_batched_tokens=24)
    got = small.generate(prompts, params)
    assert small.stats()["preemptions"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_grammars_compile_once_and_bad_schemas_are_request_errors(llm):
    grammars = llm.engine.grammars
    spec = StructuredOutput(json_schema={"type": "object", "properties": {"x": {"type": "boolean"}},
                                         "required": ["x"]}, any_whitespace=False)
    before = grammars.num_compiled
    outs = llm.generate(["a", "b"], [SamplingParams(temperature=0, max_tokens=30, structured=spec)] * 2)
    llm.generate("c", SamplingParams(temperature=0, max_tokens=30, structured=spec))
    assert grammars.num_compiled == before + 1
    assert all(o.finish_reason == "stop" and json.loads(o.text)["x"] in (True, False) for o in outs)
    with pytest.raises(ValueError, match="cannot compile the structured-output json schema"):
        llm.generate("a", SamplingParams(structured=StructuredOutput(json_schema={"type": "objectx"})))
    with pytest.raises(ValueError, match="cannot compile the structured-output regex"):
        llm.generate("a", SamplingParams(structured=StructuredOutput(regex="(unclosed")))
    assert not llm.engine.has_unfinished()


def test_missing_library_is_a_clear_error_and_free_requests_still_work(model, tok, monkeypatch):
    from moonlet.engine.structured import StructuredOutputUnavailable

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    engine = LLM(model=model, tokenizer=tok, num_blocks=32, block_size=8)
    with pytest.raises(StructuredOutputUnavailable, match=r"moonlet\[structured\]"):
        engine.generate("a", SamplingParams(structured=StructuredOutput(json_object=True)))
    out = engine.generate("a", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_structured_output_needs_a_tokenizer(model):
    engine = LLM(model=model, num_blocks=32, block_size=8)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([3, 4, 5], SamplingParams(structured=StructuredOutput(json_object=True)))


# ---- strict tool calls ----------------------------------------------------------------------------
TOOLS = [
    {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}},
    {"name": "set_color", "parameters": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                                         "required": ["color"]}},
]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
SECTION = "<|tool_calls_section_begin|>"
MARKERS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
           "<|tool_call_argument_begin|>", "<|tool_call_end|>")


def tool_params(start: str = "section", parallel: bool = True, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    return SamplingParams(structured=StructuredOutput(tools=TOOLS, tool_start=start, parallel_tool_calls=parallel),
                          **kw)


def check_calls(text: str, prefix: str = SECTION, tools=SCHEMAS, finished: bool = True) -> list:
    """Parse a reply (after ``prefix``, what the prompt ended with) with K2's output parser; every call
    must name a declared tool and carry arguments valid under its schema, and a finished reply must
    parse without error (a reply cut by max_tokens ends in an unfinished call). Returns the calls."""
    from moonlet.chat import parse_output

    parsed = parse_output(prefix + text)
    if finished:
        assert parsed.error is None, (parsed.error, text)
    for call in parsed.tool_calls:
        assert call.name in tools, call
        validate(json.loads(call.arguments), tools[call.name])
    return parsed.tool_calls


def test_tool_constraint_fields_are_checked():
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutput(tools=[])
    with pytest.raises(ValueError, match="without whitespace"):
        StructuredOutput(tools=[{"name": "a b"}])
    with pytest.raises(ValueError, match="used twice"):
        StructuredOutput(tools=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="tool_start"):
        StructuredOutput(tools=[{"name": "a"}], tool_start="middle")
    assert StructuredOutput(tools=TOOLS).kind == "tools"
    assert StructuredOutput(tools=TOOLS, param="x").key == StructuredOutput(tools=TOOLS).key


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_calls_are_valid(llm, tok, temperature):
    prompts = ["Hello", "Call a tool.", "x y z", "1 2 3", "weather?"]
    outs = llm.generate(prompts, [tool_params(temperature=temperature, seed=s) for s in range(len(prompts))])
    assert temperature == 0 or any(out.finish_reason == "stop" for out in outs)
    for out in outs:  # a random model may go on making calls until max_tokens
        calls = check_calls(out.text, finished=out.finish_reason == "stop")
        assert calls
        if out.finish_reason == "stop":
            assert out.text.endswith("<|tool_calls_section_end|>")


def test_named_call_without_parallel_calls_is_one_valid_call(llm, tok):
    prefix = SECTION + "<|tool_call_begin|>functions.set_color:0<|tool_call_argument_begin|>"
    named = [TOOLS[1]]
    outs = llm.generate(["a", "b", "c"], [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured=StructuredOutput(
        tools=named, tool_start="arguments", parallel_tool_calls=False)) for s in range(3)])
    for out in outs:
        assert out.finish_reason == "stop"
        calls = check_calls(out.text, prefix)
        assert [c.name for c in calls] == ["set_color"]
    outs = llm.generate(["a", "b", "c", "d"], [tool_params(temperature=0, seed=s, parallel=False) for s in range(4)])
    assert all(o.finish_reason == "stop" and len(check_calls(o.text)) == 1 for o in outs)


def tool_reference(model, tok, prompt: list[int], start: str, max_tokens: int, parallel: bool) -> list[int]:
    """Greedy decoding with no engine: the grammar built here with xgrammar's own structural-tag
    classes over a vocabulary holding K2's named special tokens, its matcher's bitmask applied with
    torch (inside arguments also: no raw control bytes, no special token but the call's end)."""
    from xgrammar import structural_tag as st

    V = model.config.vocab_size
    n = tok.num_base_tokens
    vocab = [tok.token_bytes(i) for i in range(n)] + [b""] * (V - n)
    for name, i in tok.special_tokens.items():
        vocab[i] = name.encode()
    ids = [tok.token_id(m) for m in MARKERS]
    sec_begin, sec_end, call_begin, args_begin, call_end = ids
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=V)

    def call(tool):
        grammar = xgr.Grammar.from_json_schema(json.dumps(tool["parameters"]), any_whitespace=False, strict_mode=True)
        return st.SequenceFormat(elements=[
            st.TokenFormat(token=call_begin), st.ConstStringFormat(value=f"functions.{tool['name']}:"),
            st.RegexFormat(pattern="[0-9]{1,6}"), st.TokenFormat(token=args_begin), st.GrammarFormat(grammar=str(grammar)),
            st.TokenFormat(token=call_end)])

    calls = st.OrFormat(elements=[call(t) for t in TOOLS])
    more = [st.StarFormat(content=calls)] if parallel else []
    section = st.SequenceFormat(elements=[calls, *more, st.TokenFormat(token=sec_end)])
    fmt = section if start == "section" else st.SequenceFormat(elements=[
        st.AnyTokensFormat(exclude_tokens=ids),
        st.OptionalFormat(content=st.SequenceFormat(elements=[st.TokenFormat(token=sec_begin), section]))])
    compiled = xgr.GrammarCompiler(info).compile_structural_tag(st.StructuralTag(format=fmt))
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(set(tok.stop_token_ids) | {1}))
    in_args_ok = torch.tensor([not any(b < 0x20 for b in v) for v in vocab[:n]] + [i == call_end for i in range(n, V)])
    bitmask = xgr.allocate_token_bitmask(1, V)
    ids_, out, in_args = list(prompt), [], False
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids_]))[0, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:V].bool()
            if in_args:
                allowed &= in_args_ok
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(t)
            ids_.append(t)
            assert matcher.accept_token(t)
            in_args = True if t == args_begin else False if t == call_end else in_args
            if matcher.is_terminated():
                break
    return out


def section_favoring_model(model, tok, prompt: list[int]):
    """A copy of ``model`` whose tool-section opener scores 1.5 times the third free greedy token, so
    a greedy reply writes a few free tokens and then opens a tool-call section."""
    import copy

    from moonlet.testing import greedy_reference

    t = greedy_reference(model, prompt, 3)[2]
    biased = copy.deepcopy(model)
    with torch.no_grad():
        w = biased.lm_head.weight
        w[tok.token_id(SECTION)] = w[t] * 1.5
    return biased


@pytest.mark.parametrize("start,parallel", [("section", False), ("section", True), ("text", False)])
def test_greedy_tool_calls_equal_a_plain_masked_loop(model, tok, start, parallel):
    prompt = tok.encode("Use a tool")
    m = section_favoring_model(model, tok, prompt) if start == "text" else model
    engine = LLM(model=m, tokenizer=tok, num_blocks=128, block_size=8)
    out = engine.generate(prompt, tool_params(start, parallel, temperature=0, max_tokens=150))[0]
    assert out.token_ids == tool_reference(m, tok, prompt, start, 150, parallel)
    calls = check_calls(out.text, SECTION if start == "section" else "", finished=not parallel)
    assert calls
    if not parallel:  # one call, the section's end, EOS
        assert len(calls) == 1 and out.finish_reason == "stop"
    if start == "text":  # free text before the section: what the unconstrained model writes
        free = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=150))[0]
        i = out.text.index(SECTION)
        assert i > 0 and free.text.startswith(out.text[:i])


def test_auto_tool_calls_leave_text_free_and_any_call_is_valid(model, tok, llm):
    prompts = ["Hello", "Call a tool.", "x y z", "1 2 3"]
    free = [SamplingParams(temperature=0.8, seed=s, max_tokens=40) for s in range(len(prompts))]
    want = llm.generate(prompts, free)
    got = llm.generate(prompts, [tool_params("text", temperature=0.8, seed=s, max_tokens=40) for s in range(4)])
    for w, g in zip(want, got):
        ids = [tok.token_id(m) for m in MARKERS]
        if not set(w.token_ids) & set(ids):  # no tool markers: the constraint never bites
            assert g.token_ids == w.token_ids
    biased = LLM(model=section_favoring_model(model, tok, tok.encode("Hello")), tokenizer=tok, num_blocks=128,
                 block_size=8)
    outs = biased.generate(prompts, [tool_params("text", parallel=False, temperature=t, seed=s, max_tokens=200)
                                     for s in range(2) for t in (0.0, 1.0)])
    made = sum(len(check_calls(out.text, "", finished=out.finish_reason == "stop")) for out in outs)
    assert made > 0


def test_thinking_stays_free_before_the_tool_calls(llm, tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Use a tool."}], thinking=True, tokenize=True)
    assert tok.decode(ids).endswith("<think>")
    k = 8
    free = llm.generate(ids, SamplingParams(temperature=0, max_tokens=k))[0]
    assert not set(free.token_ids) & {tok.token_id(m) for m in MARKERS}
    out = llm.generate(ids, tool_params("text", temperature=0, thinking_token_budget=k, max_tokens=80))[0]
    assert out.token_ids[:k] == free.token_ids and out.token_ids[k] == tok.token_id("</think>")
    if out.finish_reason == "stop":
        check_calls(out.text, "")


def test_speculative_decoding_gives_the_same_tool_calls(model, tok, llm):
    spec = LLM(model=model, tokenizer=tok, num_blocks=128, block_size=8, speculative="ngram",
               num_speculative_tokens=4, ngram_max=3, ngram_min=1)
    prompts = ["functions.get_weather:0 functions.get_weather:1", "Hello", "red red blue"]
    params = [tool_params(temperature=0), tool_params(temperature=0.8, seed=5), tool_params("text", temperature=0)]
    want = llm.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.stats()["spec_draft_tokens"] > 0
    for out in got[:2]:
        check_calls(out.text, finished=out.finish_reason == "stop")


def test_bad_tool_schema_names_the_tool(llm):
    bad = StructuredOutput(tools=[TOOLS[0], {"name": "broken", "parameters": {"type": "objectx"}}], param="tools")
    from moonlet.engine.structured import StructuredOutputError

    with pytest.raises(StructuredOutputError, match="tool 'broken'") as info:
        llm.generate("a", SamplingParams(structured=bad))
    assert info.value.param == "tools"


def test_a_slow_compile_does_not_block_other_streams(model, tok, monkeypatch):
    """AsyncLLM compiles a new grammar in a worker thread: while one (made slow here) compiles, another
    stream on the same event loop goes on. The compile waits until that stream has produced three
    outputs; were it on the event loop, that could never happen and the wait would time out."""
    import asyncio
    import threading

    from moonlet.engine import AsyncLLM
    from moonlet.engine.structured import GrammarCache

    gate, events = threading.Event(), []
    real = GrammarCache._compile

    def slow(self, spec):
        events.append("compile started")
        events.append("compile released" if gate.wait(timeout=30) else "compile timed out")
        return real(self, spec)

    monkeypatch.setattr(GrammarCache, "_compile", slow)

    async def main():
        engine = AsyncLLM(model=model, tokenizer=tok, num_blocks=64, block_size=8)
        try:
            async def free():
                n = 0
                async for out in engine.generate(tok.encode("free"), SamplingParams(temperature=0, max_tokens=40,
                                                                                    ignore_eos=True)):
                    n += 1
                    events.append("free output")
                    if n == 3:
                        gate.set()

            async def constrained():
                await asyncio.sleep(0)
                outs = [o async for o in engine.generate(tok.encode("json"), tool_params(temperature=0))]
                events.append("constrained done")
                return outs[-1]

            _, last = await asyncio.gather(free(), constrained())
            return last
        finally:
            engine.shutdown()

    last = asyncio.run(main())
    assert "compile timed out" not in events
    during = events[events.index("compile started"):events.index("compile released")]
    assert "free output" in during  # the other stream went on while the grammar compiled
    check_calls(last.text, finished=last.finish_reason == "stop")


ARITH = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]*
'''


def _parses_as_arith(text: str) -> bool:
    """A recursive-descent reading of ARITH, independent of the grammar library."""
    pos = 0

    def num():
        nonlocal pos
        if pos < len(text) and text[pos] in "123456789":
            pos += 1
            while pos < len(text) and text[pos].isdigit():
                pos += 1
            return True
        return False

    def term():
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        return num()

    def expr():
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


def test_ebnf_grammar(llm):
    assert _parses_as_arith("(12+3)-4") and not _parses_as_arith("(12+3") and not _parses_as_arith("012")
    outs = llm.generate(["a", "b", "c", "d"], [SamplingParams(temperature=1.0, seed=s, max_tokens=60,
                                                              structured=StructuredOutput(grammar=ARITH))
                                               for s in range(4)])
    done = [o for o in outs if o.finish_reason == "stop"]
    assert done and all(_parses_as_arith(o.text) for o in done), [o.text for o in outs]
    with pytest.raises(ValueError, match="cannot compile the structured-output grammar"):
        llm.generate("a", SamplingParams(structured=StructuredOutput(grammar="root ::= undefined_rule")))
    with pytest.raises(ValueError, match="non-empty EBNF"):
        StructuredOutput(grammar="  ")
    assert not llm.engine.has_unfinished()


# ---- a response format beside tools ---------------------------------------------------------------
def format_or_tools(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 150)
    content = StructuredOutput(json_schema=SCHEMA, any_whitespace=False)
    return SamplingParams(structured=StructuredOutput(tools=TOOLS, content=content, parallel_tool_calls=False), **kw)


def format_or_tools_reference(model, tok, prompt: list[int], max_tokens: int, bias: dict[int, float]) -> list[int]:
    """Greedy decoding with no engine: a grammar built here with xgrammar's structural-tag classes —
    the JSON under SCHEMA, or K2's section holding one call — over a vocabulary holding K2's named
    special tokens; at the first token only base tokens without raw control bytes, the stops and the
    section opener; inside the JSON only such base tokens and the stops; inside arguments only such base
    tokens and the call's end. ``bias`` is added to the logits (the request's logit_bias)."""
    from xgrammar import structural_tag as st

    V = model.config.vocab_size
    n = tok.num_base_tokens
    vocab = [tok.token_bytes(i) for i in range(n)] + [b""] * (V - n)
    for name, i in tok.special_tokens.items():
        vocab[i] = name.encode()
    sec_begin, sec_end, call_begin, args_begin, call_end = [tok.token_id(m) for m in MARKERS]
    stops = sorted(set(tok.stop_token_ids) | {1})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=V)

    def call(tool):
        grammar = xgr.Grammar.from_json_schema(json.dumps(tool["parameters"]), any_whitespace=False, strict_mode=True)
        return st.SequenceFormat(elements=[
            st.TokenFormat(token=call_begin), st.ConstStringFormat(value=f"functions.{tool['name']}:"),
            st.RegexFormat(pattern="[0-9]{1,6}"), st.TokenFormat(token=args_begin), st.GrammarFormat(grammar=str(grammar)),
            st.TokenFormat(token=call_end)])

    content = st.GrammarFormat(grammar=str(xgr.Grammar.from_json_schema(json.dumps(SCHEMA), any_whitespace=False)))
    section = st.SequenceFormat(elements=[st.TokenFormat(token=sec_begin), st.OrFormat(elements=[call(t) for t in TOOLS]),
                                          st.TokenFormat(token=sec_end)])
    compiled = xgr.GrammarCompiler(info).compile_structural_tag(
        st.StructuralTag(format=st.OrFormat(elements=[content, section])))
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
    plain = torch.tensor([not any(b < 0x20 for b in v) for v in vocab[:n]] + [False] * (V - n))
    in_json, in_args_ok, first = plain.clone(), plain.clone(), plain.clone()
    in_json[stops] = True
    in_args_ok[call_end] = True
    first[stops] = True
    first[sec_begin] = True
    bitmask = xgr.allocate_token_bitmask(1, V)
    ids, out, in_args = list(prompt), [], False
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            matcher.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:V].bool()
            if not out:
                allowed &= first
            elif out[0] != sec_begin:
                allowed &= in_json
            elif in_args:
                allowed &= in_args_ok
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(t)
            ids.append(t)
            assert matcher.accept_token(t)
            in_args = True if t == args_begin else False if t == call_end else in_args
            if matcher.is_terminated():
                break
    return out


def test_format_beside_tools_fields_are_checked():
    content = StructuredOutput(json_object=True)
    with pytest.raises(ValueError, match="needs tools"):
        StructuredOutput(json_object=True, content=content)
    with pytest.raises(ValueError, match="tool_start='text'"):
        StructuredOutput(tools=TOOLS, content=content, tool_start="section")
    with pytest.raises(ValueError, match="json_schema or json_object"):
        StructuredOutput(tools=TOOLS, content=StructuredOutput(regex="a+"))
    with_format = StructuredOutput(tools=TOOLS, content=content)
    assert with_format.kind == "tools" and with_format.key != StructuredOutput(tools=TOOLS).key


@pytest.mark.parametrize("call_tool", [False, True])
def test_format_beside_tools_equals_a_plain_masked_loop(model, tok, call_tool):
    """Greedy replies under a format beside tools: JSON under the schema, or (the section opener
    biased up) one valid call, token for token what the independent masked loop picks."""
    prompt = tok.encode("Answer or use a tool")
    bias = {tok.token_id(SECTION): 100.0} if call_tool else {}
    engine = LLM(model=model, tokenizer=tok, num_blocks=128, block_size=8)
    out = engine.generate(prompt, format_or_tools(temperature=0, logit_bias=bias or None))[0]
    assert out.token_ids == format_or_tools_reference(model, tok, prompt, 150, bias)
    assert out.finish_reason == "stop"
    if call_tool:
        assert len(check_calls(out.text, "")) == 1
    else:
        validate(json.loads(out.text), SCHEMA)


def test_format_beside_tools_sampled_replies_are_json_or_valid_calls(llm, tok):
    section = tok.token_id(SECTION)
    params = [format_or_tools(temperature=1.0, seed=s, max_tokens=200,
                              logit_bias={section: 4.0} if s % 2 else None) for s in range(8)]
    outs = llm.generate(["Hello", "Call a tool.", "x y z", "1 2 3"] * 2, params)
    kinds = set()
    for out in outs:
        if out.finish_reason != "stop":
            continue
        if out.token_ids[0] == section:
            kinds.add("call")
            assert len(check_calls(out.text, "")) == 1
        else:
            kinds.add("json")
            validate(json.loads(out.text), SCHEMA)
    assert kinds == {"call", "json"}


def test_format_beside_tools_keeps_reasoning_free(llm, tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Answer in JSON."}], thinking=True, tokenize=True)
    k = 6
    free = llm.generate(ids, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))[0]
    out = llm.generate(ids, format_or_tools(temperature=0, thinking_token_budget=k))[0]
    assert out.token_ids[:k] == free.token_ids and out.token_ids[k] == tok.token_id("</think>")
    assert out.finish_reason == "stop"
    if out.token_ids[k + 1] == tok.token_id(SECTION):  # this model's greedy choice; either side is allowed
        assert len(check_calls(tok.decode(out.token_ids[k + 1:], skip_special_tokens=False), "")) == 1
    else:
        validate(json.loads(tok.decode(out.token_ids[k + 1:], skip_special_tokens=True)), SCHEMA)


@pytest.mark.parametrize("constraint", ["json", "tools"])
def test_no_surrogate_code_points_even_when_the_model_wants_them(llm, tok, constraint):
    """The grammar library's character classes admit UTF-8 surrogates (ED A0..BF xx); the engine masks
    them. Logits pushed towards ED and then A0..BF: the reply's bytes never hold a surrogate (and a
    finished reply decodes strictly), while ED itself still appears (followed by 80..9F)."""
    ed = [i for i in range(tok.num_base_tokens) if tok.token_bytes(i) == b"\xed"]
    high = [i for i in range(tok.num_base_tokens) if tok.token_bytes(i)[:1] and 0xA0 <= tok.token_bytes(i)[0] <= 0xBF]
    assert ed and high
    bias = {ed[0]: 30.0, **{i: 15.0 for i in high}}
    if constraint == "json":
        structured = StructuredOutput(json_schema={"type": "object", "properties": {"s": {"type": "string"}},
                                                   "required": ["s"]}, any_whitespace=False)
    else:
        structured = StructuredOutput(tools=[{"name": "f", "parameters": {
            "type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}}], tool_start="section")
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, logit_bias=bias, structured=structured))[0]
    raw = b"".join(tok.token_bytes(t) for t in out.token_ids if t < tok.num_base_tokens)
    assert b"\xed" in raw
    assert not any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in zip(raw, raw[1:])), raw


# ---- structural tags -------------------------------------------------------------------------------
ANSWER = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["x"]}
TAG_FORMAT = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
    {"type": "const_string", "value": "<answer>"}, {"type": "regex", "pattern": "\\{\"x\": [0-9]{1,2}\\}"},
    {"type": "const_string", "value": "</answer>"}]}}
TAG_LEGACY = {"type": "structural_tag", "structures": [{"begin": "<answer>", "schema": ANSWER, "end": "</answer>"}],
              "triggers": ["<"]}


def structural_tag_reference(model, tok, prompt: list[int], tag: dict, max_tokens: int, bias: dict) -> list[int]:
    """Greedy decoding with no engine, the structural tag compiled here by xgrammar (its legacy
    StructuralTagItem API for the structures form) over the tokenizer's bytes; tokens holding UTF-8
    surrogate bytes masked as the engine does."""
    V = model.config.vocab_size
    vocab = [tok.token_bytes(i) for i in range(tok.num_base_tokens)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=V)
    compiler = xgr.GrammarCompiler(info)
    if "format" in tag:
        compiled = compiler.compile_structural_tag(json.dumps(tag))
    else:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                 for s in tag["structures"]]
        compiled = compiler.compile_structural_tag(items, tag["triggers"])
    ok = torch.tensor([not any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in zip(v, v[1:])) for v in vocab]
                      + [True] * (V - len(vocab)))
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(set(tok.stop_token_ids) | {1}))
    bitmask = xgr.allocate_token_bitmask(1, V)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            matcher.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:V].bool() & ok
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            if out and out[-1] < len(vocab) and vocab[out[-1]][-1:] == b"\xed":
                assert not (vocab[t][:1] and 0xA0 <= vocab[t][0] <= 0xBF)
            out.append(t)
            ids.append(t)
            assert matcher.accept_token(t)
            if matcher.is_terminated():
                break
    return out


def test_structural_tag_fields_are_checked():
    with pytest.raises(ValueError, match="structural_tag must be"):
        StructuredOutput(structural_tag={"type": "other"})
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(structural_tag="{")
    spec = StructuredOutput(structural_tag=json.dumps(TAG_FORMAT))
    assert spec.kind == "structural_tag" and spec.key == StructuredOutput(structural_tag=TAG_FORMAT).key


@pytest.mark.parametrize("tag", ["format", "legacy"])
def test_structural_tag_equals_a_plain_masked_loop(model, tok, llm, tag):
    prompt = tok.encode("The answer is")
    spec = TAG_FORMAT if tag == "format" else TAG_LEGACY
    # the legacy form is free text until a trigger: push the model towards "<" so that it fires
    bias = {} if tag == "format" else {t: 8.0 for t in range(tok.num_base_tokens) if tok.token_bytes(t) == b"<"}
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, logit_bias=bias or None,
                                              structured=StructuredOutput(structural_tag=spec)))[0]
    assert out.token_ids == structural_tag_reference(model, tok, prompt, spec, 60, bias)
    text = out.text
    if tag == "format":
        assert out.finish_reason == "stop" and text.startswith("<answer>") and text.endswith("</answer>")
        assert json.loads(text[len("<answer>"):-len("</answer>")])["x"] in range(100)
    else:
        assert "<answer>" in text
        body = text.split("<answer>", 1)[1]
        if "</answer>" in body:
            assert json.loads(body.split("</answer>")[0])["x"] in range(100)


def test_bad_structural_tags_are_request_errors(llm):
    from moonlet.engine.structured import StructuredOutputError

    bad = {"type": "structural_tag", "format": {"type": "no_such_element"}}
    with pytest.raises(StructuredOutputError, match="structural"):
        llm.generate("x", SamplingParams(max_tokens=2, structured=StructuredOutput(structural_tag=bad, param="p")))
    no_triggers = {"type": "structural_tag", "structures": [{"begin": "<a>", "schema": ANSWER, "end": "</a>"}]}
    with pytest.raises(StructuredOutputError, match="triggers"):
        llm.generate("x", SamplingParams(max_tokens=2, structured=StructuredOutput(structural_tag=no_triggers)))
