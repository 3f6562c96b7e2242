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
