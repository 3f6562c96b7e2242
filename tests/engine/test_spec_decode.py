"""Speculative decoding with n-gram drafts (moonlet.engine.spec): the proposer against a brute-force
search; the scheduler's draft budget and block reservation; the acceptance rule against the exact
target distribution; and the engine with speculation against the model's own greedy loop
(moonlet.testing.greedy_reference) and against the engine without speculation — batching, chunked
prefill, prefix caching, preemption, stops inside accepted runs, max_tokens, max_model_len,
logprobs, penalties, seeds, thinking budgets, streaming, MoBA — with drafts really accepted."""

import asyncio
import math

import pytest
import torch

from moonlet.engine import LLM, AsyncLLM, SamplingParams
from moonlet.engine.cache import KVCacheManager
from moonlet.engine.config import EngineConfig, add_engine_cli_args, engine_args_from_cli
from moonlet.engine.sampler import Sampler
from moonlet.engine.scheduler import Scheduler
from moonlet.engine.sequence import Sequence, SequenceStatus
from moonlet.engine.spec import NgramIndex, NgramProposer, SpeculativeConfig, propose_ngram
from moonlet.testing import (greedy_reference, random_model, tiny_k2_config,
                             tiny_tokenizer_dir)

N = 24  # max_tokens of most requests here
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
SPEC = dict(speculative="ngram", num_speculative_tokens=4)


# ---- the proposer ------------------------------------------------------------------------------

def test_propose_ngram_rules():
    # the last 3 tokens (7 8 9) occurred twice before: the most recent occurrence's continuation wins
    assert propose_ngram([7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 5, 7, 8, 9], 3, 3, 1) == [3, 4, 5]
    # the longest matching suffix wins over a more recent shorter one
    assert propose_ngram([1, 2, 3, 10, 11, 9, 3, 12, 1, 2, 3], 2, 3, 1) == [10, 11]
    assert propose_ngram([1, 2, 3, 10, 11, 9, 3, 12, 1, 2, 3], 2, 1, 1) == [12, 1]
    # no n-gram of the allowed sizes matches: no drafts
    assert propose_ngram([1, 2, 3, 4, 5, 3], 4, 4, 2) == []
    assert propose_ngram([1, 2, 3, 4, 5, 6], 4, 4, 1) == []
    assert propose_ngram([5], 4, 4, 1) == []
    # k is cut at the end of the sequence: a match near the end has few tokens after it
    assert propose_ngram([4, 5, 6, 4, 5], 5, 2, 1) == [6, 4, 5]
    assert propose_ngram([9, 9, 9], 4, 4, 1) == [9]  # "9 9" ends one token before the end


def test_index_matches_brute_force_as_the_sequence_grows():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        vocab = 3 + trial % 5
        tokens = torch.randint(0, vocab, (60,), generator=g).tolist()
        lo = 1 + trial % 3
        hi = lo + trial % 4
        index = NgramIndex(lo, hi)
        length = 1
        while length <= len(tokens):  # grow by 1 to 3 tokens between lookups, as accepted runs do
            seq = tokens[:length]
            k = 1 + (length + trial) % 6
            assert index.propose(seq, k) == propose_ngram(seq, k, hi, lo), (trial, length)
            length += 1 + (length * 7 + trial) % 3


def test_proposer_never_drafts_past_max_tokens_or_max_model_len():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=5, ngram_max=2, ngram_min=1), max_model_len=20)
    cycle = [3, 4, 5] * 4  # 12 tokens whose continuation is obvious
    seq = Sequence("r", cycle[:6], SamplingParams(max_tokens=4), frozenset())
    seq.token_ids += cycle[6:8]  # 2 generated: 2 more allowed, so one draft (+ the target's token)
    assert proposer.propose(seq) == [5]
    seq = Sequence("r", cycle[:6], SamplingParams(max_tokens=100), frozenset())
    assert proposer.propose(seq) == [3, 4, 5]  # 5 wanted, cut at the sequence end
    long = Sequence("r", (cycle * 2)[:17], SamplingParams(max_tokens=100), frozenset())
    assert proposer.max_drafts(long) == 2  # 20 - 17 - 1: the context limit
    assert proposer.propose(long) == [5, 3]
    full = Sequence("r", (cycle * 2)[:19], SamplingParams(max_tokens=100), frozenset())
    assert proposer.propose(full) == []


def test_config_validation_and_cli_flags():
    with pytest.raises(ValueError, match="speculative='medusa'"):
        EngineConfig(speculative="medusa").validate()
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0).validate()
    with pytest.raises(ValueError, match="ngram_min=3, ngram_max=2"):
        EngineConfig(speculative="ngram", ngram_min=3, ngram_max=2).validate()
    assert EngineConfig().speculative_config() is None  # off by default
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    args = parser.parse_args(["--speculative", "ngram", "--num-speculative-tokens", "6", "--ngram-max", "5",
                              "--ngram-min", "2"])
    kwargs = engine_args_from_cli(args)
    assert kwargs == dict(speculative="ngram", num_speculative_tokens=6, ngram_max=5, ngram_min=2)
    assert EngineConfig(**kwargs).speculative_config() == SpeculativeConfig("ngram", 6, 5, 2)
    assert "speculative" not in engine_args_from_cli(parser.parse_args([]))


# ---- the scheduler -------------------------------------------------------------------------------

class FixedProposer:
    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, seq):
        return list(self.drafts)


def admit_and_compute(sched):
    """One scheduled step as the engine does it, without a model: every sequence's chunk is computed
    and a finished prompt gets one token."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(2)
    return batch


def test_drafts_take_leftover_budget_and_never_the_blocks_a_prefill_needs():
    cache = KVCacheManager(num_blocks=6, block_size=4)
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=10, proposer=FixedProposer([5] * 8))
    a = Sequence("a", [3] * 6, SamplingParams(), frozenset())
    b = Sequence("b", [4] * 20, SamplingParams(), frozenset())
    sched.add(a)
    sched.add(b)
    first = admit_and_compute(sched)
    assert first.num_new_tokens == [6, 4] and not first.draft_tokens  # prompts: no drafts
    assert cache.num_free_blocks == 3 and a.num_uncomputed_tokens == 1
    # a decodes; b's next chunk (9 tokens if a took one) needs 2 more blocks, leaving 1 block and the
    # 1 free slot of a's own block for drafts; a budget of 10 would allow 8
    batch = sched.schedule()
    assert batch.draft_tokens == {a: [5]}  # one draft: the only slot not needed by b
    assert dict(zip(batch.seqs, batch.num_new_tokens)) == {a: 2, b: 8}
    assert not batch.preempted and b.status is SequenceStatus.RUNNING
    # with the whole pool to itself a decode's drafts are cut by the budget only
    cache = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=4, proposer=FixedProposer([5] * 8))
    c = Sequence("c", [3] * 3, SamplingParams(), frozenset())
    sched.add(c)
    admit_and_compute(sched)
    batch = sched.schedule()
    assert batch.draft_tokens == {c: [5, 5, 5]} and batch.num_new_tokens == [4]


# ---- the acceptance rule against the exact distribution ---------------------------------------------

def target_probs(logits, params, output):
    """The distribution one row samples from, computed directly: presence penalty over the output,
    temperature, top-k."""
    x = logits.clone().double()
    for t in set(output):
        x[t] -= params.presence_penalty
    x = x / params.temperature
    if params.top_k > 0:
        kth = x.sort(descending=True).values[params.top_k - 1]
        x[x < kth] = -math.inf
    return x.softmax(dim=-1)


def test_verify_emits_exactly_the_target_distribution():
    V = 6
    torch.manual_seed(0)
    rows = torch.randn(3, V) * 1.5  # the target logits after the prompt, after draft 1, after drafts 1-2
    drafts = [2, 4]
    params = SamplingParams(temperature=0.9, top_k=5, presence_penalty=0.7)
    prior = [1]  # already generated
    p0 = target_probs(rows[0], params, prior)
    p1 = target_probs(rows[1], params, prior + drafts[:1])  # the penalty sees draft 1 here
    p2 = target_probs(rows[2], params, prior + drafts)
    batch, reps = 3000, 8
    sampler = Sampler(seed=5)
    first = torch.zeros(V)
    second = torch.zeros(V)
    third = torch.zeros(V)
    lengths = torch.zeros(4)
    for _ in range(reps):
        seqs = [Sequence(f"r{i}", [0], params, frozenset()) for i in range(batch)]
        for s in seqs:
            s.token_ids += prior
        results = sampler.verify(rows.repeat(batch, 1), seqs, [drafts] * batch)
        for r in results:
            assert r.num_accepted == len(r.tokens) - 1 and r.tokens[:r.num_accepted] == drafts[:r.num_accepted]
            lengths[len(r.tokens)] += 1
            first[r.tokens[0]] += 1
            if r.tokens[0] == drafts[0]:
                second[r.tokens[1]] += 1
                if r.tokens[1] == drafts[1]:
                    third[r.tokens[2]] += 1
    total = batch * reps

    def close(counts, probs, n):
        # within 5 standard errors of a binomial, per token
        for c, p in zip(counts.tolist(), probs.tolist()):
            assert abs(c / n - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9, (counts, probs)

    close(first, p0, total)  # accept draft 1 with p0(d1); otherwise p0 without d1, renormalized
    close(second, p1, first[drafts[0]].item())
    close(third, p2, second[drafts[1]].item())
    assert first[drafts[0]] > 0 and second[drafts[1]] > 0  # both drafts get accepted sometimes
    # the number of tokens per step: 1 on rejecting draft 1, 2 on rejecting draft 2, else 3
    a0, a1 = p0[drafts[0]].item(), p1[drafts[1]].item()
    close(lengths[1:], torch.tensor([1 - a0, a0 * (1 - a1), a0 * a1]), total)


def test_verify_greedy_rows_and_logprobs():
    rows = torch.tensor([[0.0, 3.0, 1.0, 0.5], [2.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 4.0]])
    s = Sequence("r", [0], SamplingParams(temperature=0, logprobs=1), frozenset())
    [r] = Sampler(seed=0).verify(rows, [s], [[1, 0]])
    assert r.tokens == [1, 0, 3] and r.num_accepted == 2  # both drafts are the argmax, then the bonus token
    raw = rows.log_softmax(dim=-1)
    assert [list(d) for d in r.logprobs] == [[1], [0], [3]]
    assert r.logprobs[2][3] == pytest.approx(float(raw[2, 3]))
    [r] = Sampler(seed=0).verify(rows, [s], [[2, 0]])
    assert r.tokens == [1] and r.num_accepted == 0 and r.logprobs[0][1] == pytest.approx(float(raw[0, 1]))


def test_seeded_verify_consumes_one_draw_per_emitted_token():
    """A seeded request's generator is rewound past the rows it did not use: the tokens it emits are
    the ones plain one-row sampling gives (same logits), whatever the drafts."""
    torch.manual_seed(1)
    V = 8
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=1.0, seed=77)
    plain = Sequence("p", [0], params, frozenset())
    sampler = Sampler(seed=0)
    want = [sampler(logits, [plain])[0][0] for _ in range(40)]
    spec = Sequence("s", [0], params, frozenset())
    got: list[int] = []
    while len(got) < 40:
        d = want[len(got):len(got) + 3]
        d = d[:1] + [(t + 1) % V for t in d[1:2]] + d[2:]  # the second draft is wrong
        results = sampler.verify(logits.repeat(1 + len(d), 1), [spec], [d])
        got += results[0].tokens
    assert got[:40] == want


# ---- the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, 320, (12,), generator=g).tolist()
    rand = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (5, 23, 37)]
    # prompts that repeat themselves (drafts are proposed at once and mostly accepted; the random
    # model's greedy output also falls into loops, which drafts then copy), and random ones
    return [text * 3, text[:5] * 5, rand[2][:20] + text + rand[2][:6]] + rand + [[5]]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_reference(model, p, N) for p in prompts]


def spec_llm(model, **kw):
    return LLM(model=model, **{**SPEC, **kw})


CONFIGS = {
    "batched": dict(num_blocks=64),
    "one_at_a_time": dict(num_blocks=64, max_num_seqs=1),
    "prefix_cache_off": dict(num_blocks=64, enable_prefix_caching=False),
    "chunked_prefill": dict(num_blocks=64, max_num_batched_tokens=8),
    "tiny_pool_preempts": dict(num_blocks=16, block_size=4, max_num_batched_tokens=24),
    "block_size_1": dict(num_blocks=600, block_size=1, max_num_batched_tokens=13),
    "k1_bigrams": dict(num_blocks=64, num_speculative_tokens=1, ngram_min=2, ngram_max=2),
    "k7": dict(num_blocks=64, num_speculative_tokens=7),
    "decode_graphs_eager": dict(num_blocks=64, block_size=4, decode_graphs="eager"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_reference(model, prompts, expected, name):
    llm = spec_llm(model, **CONFIGS[name])
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    stats = llm.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"]
    assert stats["generation_tokens_total"] == N * len(prompts)
    if name == "batched":
        assert stats["steps"] < N  # accepted drafts save steps (without speculation: N)
    assert stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0
    if name == "tiny_pool_preempts":
        assert stats["preemptions"] > 0
    if name == "decode_graphs_eager":
        assert llm.engine.runner.graph_steps > 0  # steps without drafts still replay the graphs
    again = llm.generate(prompts, GREEDY)  # from the prefix cache: rejected drafts never got registered
    assert [o.token_ids for o in again] == expected
    assert llm.stats()["blocks_free"] == llm.stats()["blocks_total"]


def test_random_prompts_mostly_reject(model):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (40, 61, 33)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = spec_llm(model, num_blocks=64, ngram_min=1)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 8) for p in prompts]
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"] / 2


def steps_of(llm, prompt, params):
    """Run one request step by step: the new tokens of each step, and the final output."""
    engine = llm.engine
    engine.add_request("x", prompt, params)
    news, out = [], None
    while engine.has_unfinished():
        for out in engine.step():
            news.append(out.new_token_ids)
    return news, out


class OracleProposer:
    """Drafts that are the known greedy continuation (so all are accepted), except the one at index
    ``wrong_at`` of each proposal, which is wrong: stops and limits can then be placed anywhere in a
    run of accepted drafts, which a random model's n-gram drafts rarely allow. Capped like the engine's."""

    def __init__(self, llm, continuations: dict, k: int = 4, wrong_at: int | None = None):
        self.continuations, self.wrong_at = continuations, wrong_at
        self.vocab = llm.engine.model_config.vocab_size
        self.caps = NgramProposer(SpeculativeConfig(num_speculative_tokens=k), llm.max_model_len)

    def propose(self, seq):
        full = self.continuations[tuple(seq.prompt_token_ids)]
        done = seq.num_output_tokens
        assert seq.output_token_ids == full[:done]
        drafts = full[done:done + self.caps.max_drafts(seq)]
        if self.wrong_at is not None and len(drafts) > self.wrong_at:
            drafts[self.wrong_at] = (drafts[self.wrong_at] + 1) % self.vocab
        return drafts


def oracle_llm(model, prompts, expected, wrong_at=None, **kw):
    llm = spec_llm(model, **{"num_blocks": 64, **kw})
    llm.engine.scheduler.proposer = OracleProposer(llm, {tuple(p): e for p, e in zip(prompts, expected)},
                                                   wrong_at=wrong_at)
    return llm


def test_oracle_drafts_all_or_partly_accepted(model, prompts, expected):
    for wrong_at in (None, 0, 2):
        llm = oracle_llm(model, prompts, expected, wrong_at=wrong_at)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        stats = llm.stats()
        if wrong_at is None:
            assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
        else:
            assert stats["spec_accepted_tokens"] <= wrong_at * stats["spec_verifications"]
            assert (stats["spec_accepted_tokens"] > 0) == (wrong_at > 0)


def test_stop_token_and_max_tokens_inside_an_accepted_run(model, prompts, expected):
    # with every draft right and k = 4, output tokens 1-5, 6-10, ... come from one step each (token 0
    # from the prefill); a stop at output index 7 (first occurrence) cuts a run of five
    i, at = next((i, at) for i, e in enumerate(expected) for at in (7, 8, 12, 13) if e.index(e[at]) == at)
    tok = expected[i][at]
    llm = oracle_llm(model, prompts, expected)
    news, out = steps_of(llm, prompts[i], SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[tok]))
    assert out.token_ids == expected[i][:at + 1] and out.finish_reason == "stop" and out.stop_reason == tok
    assert [len(n) for n in news] == [1] + [5] * ((at - 1) // 5) + [(at - 1) % 5 + 1]
    # a stop token after a rejected draft: the target's own token ends it
    llm.engine.scheduler.proposer.wrong_at = 1
    news, out = steps_of(llm, prompts[i], SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[tok]))
    assert out.token_ids == expected[i][:at + 1] and out.finish_reason == "stop"
    # max_tokens anywhere in a run; the drafts are cut so that the run never passes it
    llm.engine.scheduler.proposer.wrong_at = None
    for m in range(1, 13):
        news, out = steps_of(llm, prompts[i], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        assert out.token_ids == expected[i][:m] and out.finish_reason == "length"
        assert sum(map(len, news)) == m
    assert llm.stats()["blocks_free"] == llm.stats()["blocks_total"]


def test_max_model_len_is_respected(model, prompts, expected):
    llm = spec_llm(model, num_blocks=10, block_size=4)  # context limit 40 tokens
    prompt = prompts[0]  # 36 tokens
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))[0]
    assert out.token_ids == expected[0][:40 - len(prompt)] and out.finish_reason == "length"
    assert llm.stats()["blocks_free"] == 10


def test_logprobs_and_penalties_match_the_engine_without_speculation(model, prompts):
    # penalties mild enough that the model still repeats itself (drafts get accepted), strong enough
    # to change its output: a verified position must count the drafts before it
    params = [SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, frequency_penalty=0.02,
                             presence_penalty=0.01, logprobs=0),
              SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, repetition_penalty=1.1)]
    for p in params:
        plain = LLM(model=model, num_blocks=64).generate(prompts, p)
        llm = spec_llm(model, num_blocks=64)
        spec = llm.generate(prompts, p)
        assert llm.stats()["spec_accepted_tokens"] > 0
        if p.needs_penalties:
            assert any(a.token_ids != b for a, b in zip(plain, [greedy_reference(model, q, N) for q in prompts]))
        for a, b in zip(plain, spec):
            assert a.token_ids == b.token_ids
            if p.logprobs is None:
                assert b.logprobs is None
                continue
            assert len(b.logprobs) == len(b.token_ids)
            for da, db, t in zip(a.logprobs, b.logprobs, b.token_ids):
                assert list(da) == list(db) and t in db  # the same top-n (descending) plus the token
                assert list(db.values()) == pytest.approx(list(da.values()), abs=1e-4)


def test_seeded_sampling_is_reproducible_and_matches_plain_sampling(model, prompts):
    # the random model's logits are nearly flat: a low temperature makes it repeat itself
    params = SamplingParams(temperature=0.02, top_p=0.95, max_tokens=N, seed=1234, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = spec_llm(model, num_blocks=64)
        runs.append([o.token_ids for o in llm.generate(prompts[:3], params)])
        assert llm.stats()["spec_accepted_tokens"] > 0
    assert runs[0] == runs[1]
    # the request consumes one draw per emitted token, so it samples what it samples without drafts
    plain = [o.token_ids for o in LLM(model=model, num_blocks=64).generate(prompts[:3], params)]
    assert runs[0] == plain
    assert runs[0] != [o.token_ids for o in LLM(model=model, num_blocks=64).generate(prompts[:3], GREEDY)]


def test_thinking_budget_forced_token_wins_over_drafts(model, prompts):
    seen = set()
    for p in prompts[:3]:
        seen |= set(p) | set(greedy_reference(model, p, N + 4))
    open_, close = [t for t in range(2, 320) if t not in seen][:2]
    for budget in (0, 3, 9):
        params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, thinking_token_budget=budget,
                                thinking_start_token_ids=[open_], thinking_end_token_ids=[close])
        inside = [p + [open_] for p in prompts[:3]]
        want = [o.token_ids for o in LLM(model=model, num_blocks=64).generate(inside, params)]
        llm = spec_llm(model, num_blocks=64)
        got = [o.token_ids for o in llm.generate(inside, params)]
        assert got == want
        assert all(w[budget] == close for w in want)  # the closer came after exactly `budget` tokens
        assert llm.stats()["spec_accepted_tokens"] > 0


def test_async_streams_carry_several_tokens_per_step(model, prompts, expected):
    with AsyncLLM(model=model, num_blocks=64, **SPEC) as llm:
        async def one(i):
            outs = [o async for o in llm.generate(prompts[i], GREEDY)]
            return outs

        async def run():
            return await asyncio.gather(*(one(i) for i in range(3)))

        for i, outs in enumerate(asyncio.run(run())):
            streamed = [t for o in outs for t in o.new_token_ids]
            assert streamed == outs[-1].token_ids == expected[i]
            assert max(len(o.new_token_ids) for o in outs) > 1


def test_stop_strings_and_streamed_text(tmp_path):
    from moonlet.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size), seed=11)
    prompt = tok.encode("abc abc abc abc abc abc abc abc")
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    plain = LLM(model=model, tokenizer=tok, num_blocks=64).generate(prompt, params)[0]
    assert len(plain.text) > 16
    cut_mid_run = 0
    for start in range(1, 14, 2):  # stop strings completed at various points of runs of accepted drafts
        stop = plain.text[start:start + 3]
        p = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, stop=[stop])
        want = LLM(model=model, tokenizer=tok, num_blocks=64).generate(prompt, p)[0]
        llm = LLM(model=model, tokenizer=tok, num_blocks=64, **SPEC)
        llm.engine.scheduler.proposer = OracleProposer(llm, {tuple(prompt): plain.token_ids})
        news, got = steps_of(llm, prompt, p)
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, "stop", stop)
        cut_mid_run += len(news) > 1 and len(news[-1]) < 5  # a run of 5 tokens (4 drafts + 1) cut short
    assert cut_mid_run
    # streamed text of a multi-token run is the text, piece by piece
    llm = LLM(model=model, tokenizer=tok, num_blocks=64, **SPEC)
    llm.engine.add_request("t", prompt, params)
    pieces, out = [], None
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            pieces.append(out.new_text)
    assert "".join(pieces) == out.text == plain.text and out.token_ids == plain.token_ids
    assert llm.stats()["spec_accepted_tokens"] > 0


def test_moba_model_greedy_and_page_sums():
    pytest.importorskip("moonlet.model.sparse")
    cfg = tiny_k2_config(moba_config={"block_size": 8, "top_k": 2, "full_attention_layers": [2]})
    moba_model = random_model(cfg, seed=5)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, 320, (10,), generator=g).tolist()
    prompts = [text * 4, torch.randint(2, 320, (26,), generator=g).tolist(), text[:3] * 6]
    expected = [greedy_reference(moba_model, p, N) for p in prompts]
    llm = LLM(model=moba_model, num_blocks=80, block_size=4, **SPEC)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"m{i}", p, GREEDY)
    sums, pool = engine.runner.kv.page_sums, engine.pool
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
        # every page a running sequence has fully computed holds the sum of its (correct) entries
        for seq in engine.scheduler.running:
            pages = seq.block_table[:seq.num_computed_tokens // 4]
            for layer in sums.index:
                want = pool.layer(layer)[pages].float().sum(dim=1)
                torch.testing.assert_close(sums.layer(layer)[pages], want)
    assert [outs[f"m{i}"].token_ids for i in range(3)] == expected
    assert llm.stats()["spec_accepted_tokens"] > 0
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected  # from the prefix cache


def test_server_metrics_report_the_spec_counters(model, prompts):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from moonlet.server.metrics import ServerMetrics

    llm = spec_llm(model, num_blocks=64)
    llm.generate(prompts[:2], GREEDY)
    stats = llm.stats()
    text = ServerMetrics(llm.engine).render().decode()
    value = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert value["moonlet_spec_draft_tokens_total"] == stats["spec_draft_tokens"] > 0
    assert value["moonlet_spec_accepted_tokens_total"] == stats["spec_accepted_tokens"] > 0
