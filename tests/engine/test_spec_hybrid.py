"""Speculative decoding on hybrid models (KDA layers, Kimi Linear): a verification span advances the
recurrent state over every draft, so the engine keeps the state after each draft in a row of its own
and puts the right one back after verification (``EngineCore._settle_state``). Checked against the
model's own greedy loop (moonlet.testing.greedy_reference) and against the engine without
speculation: n-gram and draft-model drafts, rejections and acceptances, chunked prefill, preemption,
eager decode graphs, more verifying sequences than state rows, seeded sampling, and the output
snapshots that a conversation's next turn resumes from (a boundary crossed by accepted drafts must
be snapshotted as a plain decode step would)."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import SPEC_STATE_SEQS
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

N = 24
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_kimi_linear_config(vocab_size=VOCAB, max_position_embeddings=512), seed=1)


@pytest.fixture(scope="module")
def draft():
    return random_model(tiny_k2_config(vocab_size=VOCAB, num_hidden_layers=1), seed=4)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    text = torch.randint(2, VOCAB, (7,), generator=g).tolist()
    rand = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 30)]
    return [text * 4, rand[0], text[:3] * 6, rand[1] + text + text, rand[2]]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_reference(model, p, N) for p in prompts]


CONFIGS = {
    "ngram": dict(speculative="ngram", num_speculative_tokens=4, ngram_min=1),
    "ngram_chunked": dict(speculative="ngram", num_speculative_tokens=3, ngram_min=1, max_num_batched_tokens=9),
    "ngram_preempts": dict(speculative="ngram", ngram_min=1, num_blocks=24, block_size=4, max_num_batched_tokens=24),
    "ngram_graphs_eager": dict(speculative="ngram", ngram_min=1, block_size=4, num_blocks=200,
                               decode_graphs="eager"),
    "ngram_no_prefix_cache": dict(speculative="ngram", ngram_min=1, enable_prefix_caching=False),
    "draft": dict(speculative="draft", num_speculative_tokens=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_reference(model, draft, prompts, expected, name):
    kw = {"num_blocks": 120, **CONFIGS[name]}
    if kw["speculative"] == "draft":
        kw["speculative_model"] = draft
    llm = LLM(model=model, **kw)
    for _ in range(2):  # the second round resumes from the state snapshots of the first
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"] > 0  # both outcomes happened
    assert stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0
    if name == "ngram_preempts":
        assert stats["preemptions"] > 0
    if name == "ngram_graphs_eager":
        assert llm.engine.runner.graph_steps > 0


def test_more_verifying_sequences_than_state_rows(model):
    g = torch.Generator().manual_seed(9)
    base = torch.randint(2, VOCAB, (4,), generator=g).tolist()
    many = [base * 3 + [i + 2] for i in range(SPEC_STATE_SEQS + 5)]
    llm = LLM(model=model, num_blocks=300, speculative="ngram", ngram_min=1, num_speculative_tokens=2)
    assert llm.engine.config.spec_state_rows == 2 * SPEC_STATE_SEQS
    outs = llm.generate(many, GREEDY)
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, N) for p in many]
    assert llm.stats()["spec_accepted_tokens"] > 0


def test_seeded_sampling_equals_no_speculation(model, prompts):
    params = [SamplingParams(temperature=0.7, max_tokens=N, seed=10 + i, ignore_eos=True, logprobs=1)
              for i in range(len(prompts))]
    plain = LLM(model=model, num_blocks=120).generate(prompts, params)
    spec = LLM(model=model, num_blocks=120, speculative="ngram", ngram_min=1).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    for a, b in zip(spec, plain):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_next_turn_resumes_from_the_same_output_snapshot(model, prompts):
    """Turn two extends turn one's prompt and output. Without speculation the latest output snapshot
    is at the last block boundary the output reached; with it, accepted drafts cross boundaries, and
    the engine must snapshot those too: the hit of the next turn is as long either way."""
    params = SamplingParams(temperature=0, max_tokens=41, ignore_eos=True)  # the last drafts cross a boundary
    hits = []
    for spec in ({}, dict(speculative="ngram", ngram_min=1, num_speculative_tokens=5)):
        llm = LLM(model=model, num_blocks=200, block_size=4, **spec)
        first = llm.generate([prompts[0]], params)[0]
        follow = prompts[0] + first.token_ids + [3, 4, 5]
        second = llm.generate([follow], GREEDY)[0]
        assert second.token_ids == greedy_reference(model, follow, N)
        hits.append(second.num_cached_tokens)
        if spec:
            assert llm.stats()["spec_accepted_tokens"] > 0
    assert hits[0] == hits[1] >= len(prompts[0]) + 41 - 4
