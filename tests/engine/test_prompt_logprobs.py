"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) against the model's own full forward
over the prompt, however the engine chunks, caches, preempts, samples in parallel or speculates; and
``max_tokens=0`` (the prompt only)."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.testing import random_model, tiny_k2_config

K = 3


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=5)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in (23, 9, 41, 2)]


def reference(model, prompt, k=K):
    """Per prompt token j >= 1: (its log-probability, its rank, the top-k {id: logprob}) from
    log_softmax of the model's logits at position j - 1 (one full forward, no cache)."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0].float().log_softmax(dim=-1)
    out = []
    for j in range(1, len(prompt)):
        row = logp[j - 1]
        own = float(row[prompt[j]])
        values, ids = row.topk(k)
        out.append((own, int((row > own).sum()) + 1, dict(zip(ids.tolist(), values.tolist()))))
    return out


def check(out, model, prompt, k=K):
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None and out.prompt_logprob_ranks[0] is None
    for j, (own, rank, top) in enumerate(reference(model, prompt, k), start=1):
        d = out.prompt_logprobs[j]
        assert d[prompt[j]] == pytest.approx(own, abs=1e-4)
        assert out.prompt_logprob_ranks[j] == rank
        assert list(d)[:k] == list(top)  # the top k first, in descending order
        assert [d[t] for t in top] == pytest.approx(list(top.values()), abs=1e-4)
        assert set(d) == set(top) | {prompt[j]}


CONFIGS = {
    "batched": dict(num_blocks=64),
    "chunked": dict(num_blocks=64, max_num_batched_tokens=5),
    "one_token_chunks_with_graph_buffers": dict(num_blocks=64, max_num_batched_tokens=1, decode_graphs="eager"),
    "tiny_pool_preempts": dict(num_blocks=14, block_size=4, max_num_batched_tokens=24),
    "prefix_cache_off": dict(num_blocks=64, enable_prefix_caching=False),
    "ngram_speculation": dict(num_blocks=64, speculative="ngram", max_num_batched_tokens=7),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logprobs_equal_the_full_forward(model, prompts, name):
    llm = LLM(model=model, **CONFIGS[name])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=K)
    outs = llm.generate(prompts, params)
    for out, prompt in zip(outs, prompts):
        check(out, model, prompt)
    # the generated tokens are those of a request without prompt logprobs
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]
    if name == "tiny_pool_preempts":
        assert stats["preemptions"] > 0


def test_a_cached_prefix_is_recomputed_and_still_cached_for_others(model, prompts):
    llm = LLM(model=model, num_blocks=64, block_size=4)
    prompt = prompts[2]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))  # caches the prompt's blocks
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K))[0]
    assert out.num_cached_tokens == 0  # the hit is not taken: its positions' logits are needed
    check(out, model, prompt)
    # a request with prompt logprobs caches its blocks for others
    other = prompts[0] + [5, 6, 7, 8, 9]
    llm.generate([other], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    hit = llm.generate([other], SamplingParams(temperature=0, max_tokens=1))[0].num_cached_tokens
    assert hit == (len(other) - 1) // 4 * 4


def test_parallel_samples_share_one_computation(model, prompts):
    llm = LLM(model=model, num_blocks=64, block_size=4)
    prompt = prompts[2]
    outs = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4, prompt_logprobs=K))
    assert [o.index for o in outs] == [0, 1, 2]
    for out in outs:
        check(out, model, prompt)
    assert outs[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in outs[1:]] == [(len(prompt) - 1) // 4 * 4] * 2  # samples 1.. hit


def test_prompt_logprobs_zero_gives_the_prompt_tokens_only(model, prompts):
    llm = LLM(model=model, num_blocks=64)
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    ref = reference(model, prompts[0], 1)
    assert [list(d) for d in out.prompt_logprobs[1:]] == [[t] for t in prompts[0][1:]]
    assert [d[t] for d, t in zip(out.prompt_logprobs[1:], prompts[0][1:])] == \
        pytest.approx([r[0] for r in ref], abs=1e-4)


def test_max_tokens_zero_computes_the_prompt_only(model, prompts):
    llm = LLM(model=model, num_blocks=64, block_size=4, max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=K)
    outs = llm.generate(prompts, params)
    for out, prompt in zip(outs, prompts):
        assert out.finished and out.finish_reason == "length" and out.token_ids == [] and out.text == ""
        check(out, model, prompt)
    # a request generating beside prompt-only ones is unchanged
    mixed = llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=0),
                                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)])
    alone = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert mixed[0].token_ids == [] and mixed[1].token_ids == alone[0].token_ids
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
