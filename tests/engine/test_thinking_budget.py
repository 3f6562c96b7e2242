"""Thinking budgets in the engine, against plain greedy decoding with full forwards (moonlet.testing's
greedy_reference): a spent budget puts the closing marker in place of the sampled tokens and the
answer then continues as the model's own greedy continuation of that text; everything else is
untouched."""

import asyncio

import pytest
import torch

from moonlet.engine import LLM, AsyncLLM, SamplingParams
from moonlet.engine.thinking import ThinkingBudget, prompt_leaves_thinking_open, thinking_markers
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.tokenizer import Tokenizer

N = 14  # max_tokens of most requests here


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=5)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(2, 320, (9,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model=model, num_blocks=64, block_size=8)


def unused_ids(model, prompts, count):
    """Token ids the greedy continuations (N tokens) of ``prompts`` never produce: markers the model
    never writes by itself."""
    seen = set()
    for p in prompts:
        seen |= set(p) | set(greedy_reference(model, p, N + 4))
    free = [t for t in range(2, 320) if t not in seen]
    return free[:count]


def greedy(budget=None, max_tokens=N, start=None, end=None, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, thinking_token_budget=budget,
                          thinking_start_token_ids=start, thinking_end_token_ids=end, **kw)


def forced_reference(model, prompt, n, head, end):
    """The model's greedy ``head`` tokens, then the closing marker ``end``, then its greedy
    continuation of all that (full forwards): n tokens in all."""
    out = list(head) + list(end)
    return (out + greedy_reference(model, list(prompt) + out, n - len(out)))[:n]


def test_closer_is_forced_after_exactly_budget_thinking_tokens(llm, model, prompt):
    open_, close = unused_ids(model, [prompt], 2)
    inside = prompt + [open_]  # the prompt leaves the model thinking, as a K2.6 generation prompt does
    g = greedy_reference(model, inside, N)
    for budget in (0, 1, 5):
        out = llm.generate(inside, greedy(budget, start=[open_], end=[close]))[0]
        expect = forced_reference(model, inside, N, g[:budget], [close])
        assert out.token_ids == expect and expect[budget] == close and close not in g
        assert out.finish_reason == "length" and len(out.token_ids) == N  # the forced token counts toward max_tokens


def test_budget_not_reached_or_no_thinking_changes_nothing(llm, model, prompt):
    open_, close = unused_ids(model, [prompt], 2)
    inside = prompt + [open_]
    plain = llm.generate(inside, greedy())[0].token_ids
    assert plain == greedy_reference(model, inside, N)
    assert llm.generate(inside, greedy(N, start=[open_], end=[close]))[0].token_ids == plain  # budget N: never spent
    # a prompt that closed its thinking (or never opened it): even budget 0 forces nothing
    closed = inside + [5, close]
    assert llm.generate(closed, greedy(0, start=[open_], end=[close]))[0].token_ids == greedy_reference(model, closed, N)
    assert llm.generate(prompt, greedy(0, start=[open_], end=[close]))[0].token_ids == greedy_reference(model, prompt, N)


def test_model_closing_thinking_itself_stops_the_count(llm, model, prompt):
    (open_,) = unused_ids(model, [prompt], 1)
    inside = prompt + [open_]
    g = greedy_reference(model, inside, N)
    k = next(i for i in range(3, N) if g[i] not in g[:i])
    close = g[k]  # the model "closes" its thinking by itself after k thinking tokens
    # budget k + 1 is not spent before the model closes: the output is the plain greedy one, and
    # nothing is forced later although more than k + 1 tokens follow
    assert llm.generate(inside, greedy(k + 1, start=[open_], end=[close]))[0].token_ids == g
    # budget k: the forced closer is what the model would have written anyway
    assert llm.generate(inside, greedy(k, start=[open_], end=[close]))[0].token_ids == g
    # budget k - 1: forced one token early, then the model's own continuation
    out = llm.generate(inside, greedy(k - 1, start=[open_], end=[close]))[0].token_ids
    assert out == forced_reference(model, inside, N, g[:k - 1], [close]) and out != g


def test_model_opening_thinking_itself_starts_the_count(llm, model, prompt):
    (close,) = unused_ids(model, [prompt], 1)
    g = greedy_reference(model, prompt, N)
    open_ = g[1]  # the model opens a thinking section with its 2nd token
    assert open_ not in prompt and open_ not in g[:1]
    out = llm.generate(prompt, greedy(3, start=[open_], end=[close]))[0].token_ids
    assert out == forced_reference(model, prompt, N, g[:5], [close])  # opener + 3 thinking tokens, then closed


def test_multi_token_closer_is_forced_one_token_per_step(llm, model, prompt):
    open_, a, b = unused_ids(model, [prompt], 3)
    inside = prompt + [open_]
    g = greedy_reference(model, inside, N)
    out = llm.generate(inside, greedy(4, start=[open_], end=[a, b]))[0].token_ids
    assert out == forced_reference(model, inside, N, g[:4], [a, b])
    # a closer the model began by itself (its 3rd token is the first marker token) is completed, not restarted
    out = llm.generate(inside, greedy(3, start=[open_], end=[g[2], b]))[0].token_ids
    assert out == forced_reference(model, inside, N, g[:3], [b])


ENGINES = {
    "batched": dict(num_blocks=64, block_size=8),
    "decode_graph_buffers": dict(num_blocks=64, block_size=8, decode_graphs="eager", decode_graph_batch_sizes=(2, 4)),
    "tiny_pool_preempts": dict(num_blocks=10, block_size=4, max_num_batched_tokens=24),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_batch_with_different_budgets_and_a_sampled_neighbour(model, prompt, engine):
    open_, close = unused_ids(model, [prompt, prompt[:5]], 2)
    prompts = [prompt + [open_], prompt[:5] + [open_], prompt + [open_], prompt + [open_], prompt[:5] + [7]]
    budgets = [None, 2, 0, 6, 1]
    params = [greedy(b, start=[open_], end=[close]) for b in budgets]
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=N, ignore_eos=True)
    llm = LLM(model=model, **ENGINES[engine])
    outs = llm.generate(prompts + [prompts[0]], params + [sampled])
    for p, b, out in zip(prompts, budgets, outs):
        g = greedy_reference(model, p, N)
        forced = b is not None and p[-1] == open_
        assert out.token_ids == (forced_reference(model, p, N, g[:b], [close]) if forced else g)
    # the seeded sampled request is the same alone as in this batch
    alone = LLM(model=model, num_blocks=64, block_size=8).generate(prompts[0], sampled)[0]
    assert outs[-1].token_ids == alone.token_ids
    if engine == "decode_graph_buffers":
        assert llm.engine.runner.graph_steps > 0
    if engine == "tiny_pool_preempts":
        assert llm.stats()["preemptions"] > 0
    assert llm.stats()["blocks_free"] == llm.stats()["blocks_total"]


def test_forced_tokens_stream_like_sampled_ones_and_report_logprobs(model, prompt):
    open_, close = unused_ids(model, [prompt], 2)
    inside = prompt + [open_]
    params = greedy(3, start=[open_], end=[close], logprobs=2)

    async def run():
        engine = AsyncLLM(model=model, num_blocks=64, block_size=8)
        try:
            return [out async for out in engine.generate(inside, params)]
        finally:
            engine.shutdown()

    outs = asyncio.run(run())
    streamed = [t for o in outs for t in o.new_token_ids]
    g = greedy_reference(model, inside, N)
    assert streamed == outs[-1].token_ids == forced_reference(model, inside, N, g[:3], [close])
    assert any(o.new_token_ids == [close] for o in outs)
    # the forced token's logprob is the model's own (raw distribution), not 0
    with torch.no_grad():
        logits = model(torch.tensor([inside + g[:3]]))[0, -1].float()
    lp = outs[-1].logprobs[3]
    assert lp[close] == pytest.approx(float(logits.log_softmax(-1)[close]), abs=1e-4) and lp[close] < -1


def test_markers_come_from_the_tokenizer_and_the_text_closes_thinking(tmp_path):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path, chat_template="kimi-k2.6"))
    start, end = thinking_markers(SamplingParams(thinking_token_budget=1), tok)
    assert start == (tok.token_id("<think>"),) and end == (tok.token_id("</think>"),)
    m = random_model(tiny_k2_config(vocab_size=tok.vocab_size), seed=2)
    llm = LLM(model=m, tokenizer=tok, num_blocks=64, block_size=8)
    ids = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], thinking=True, tokenize=True)
    assert tok.decode(ids).endswith("<think>") and prompt_leaves_thinking_open(ids, start, end)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_token_budget=4))[0]
    g = greedy_reference(m, ids, 4)
    assert end[0] not in g
    assert out.token_ids[:5] == g + [end[0]]
    assert out.text == tok.decode(out.token_ids) and out.text.startswith(tok.decode(g) + "</think>")


def test_prompt_state_follows_the_last_marker():
    s, e = (10,), (11, 12)
    assert prompt_leaves_thinking_open([1, 10], s, e)
    assert not prompt_leaves_thinking_open([1, 10, 3, 11, 12], s, e)
    assert prompt_leaves_thinking_open([10, 11, 12, 5, 10, 4, 11], s, e)  # 11 alone is not the closer
    assert not prompt_leaves_thinking_open([1, 2, 3], s, e)
    state = ThinkingBudget(2, s, e, inside=False)
    seqn = [1]
    for t in (10, 7, 8):  # opened by the model, then two thinking tokens: the budget is spent
        seqn.append(t)
        state.observe(seqn)
    assert state.inside and state.used == 2 and state.forced_token(seqn) == 11
    seqn.append(11)
    state.observe(seqn)
    assert state.forced_token(seqn) == 12 and state.used == 2  # the forced closer is not counted
    seqn.append(12)
    state.observe(seqn)
    assert not state.inside and state.forced_token(seqn) is None
    seqn.append(10)  # a new section after the budget is spent is closed at once
    state.observe(seqn)
    assert state.forced_token(seqn) == 11


def test_invalid_budgets_and_markers_are_rejected(model):
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="thinking_token_budget"):
            SamplingParams(thinking_token_budget=bad)
    for bad in ([], [-1], ["a"], [1.0]):
        with pytest.raises(ValueError, match="thinking_end_token_ids"):
            SamplingParams(thinking_end_token_ids=bad)
    llm = LLM(model=model, num_blocks=16)  # no tokenizer: the markers must be given
    with pytest.raises(ValueError, match="thinking_start_token_ids"):
        llm.generate([3, 4], SamplingParams(thinking_token_budget=4))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llm.generate([3, 4], SamplingParams(thinking_token_budget=4, thinking_start_token_ids=[5],
                                            thinking_end_token_ids=[320]))
    assert llm.stats()["running"] == 0
