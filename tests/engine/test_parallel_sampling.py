"""Parallel sampling (``SamplingParams.n``): n samples of one prompt that compute the prompt once.

References: the model's own greedy loop (no cache) for temperature 0; single requests with the
documented derived seed (seed + i) for seeded sampling; the prefix-cache counters against the exact
number of tokens a shared prompt must leave to each sample; every block free after aborts.
"""

import asyncio
import time

import pytest
import torch

from moonlet.engine import LLM, AsyncLLM, SamplingParams
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

BS = 4


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(2, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def all_free(llm) -> bool:
    s = llm.stats()
    return s["blocks_free"] == s["blocks_total"] and s["running"] == 0 and s["waiting"] == 0


@pytest.mark.parametrize("engine_args", [dict(), dict(max_num_batched_tokens=7), dict(enable_prefix_caching=False)],
                         ids=["whole", "chunked", "no-prefix-cache"])
def test_greedy_samples_all_equal_the_single_greedy_output(model, engine_args):
    prompts = [prompt_of(22, 1), prompt_of(9, 2)]
    with LLM(model=model, num_blocks=64, block_size=BS, **engine_args) as llm:
        outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3),
                                      SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
        assert [(o.request_id == outs[0].request_id, o.index) for o in outs] == [
            (True, 0), (True, 1), (True, 2), (False, 0)]
        expected = greedy_reference(model, prompts[0], 6)
        assert [o.token_ids for o in outs[:3]] == [expected] * 3
        assert outs[3].token_ids == greedy_reference(model, prompts[1], 6)
        assert all(o.finish_reason == "length" for o in outs)
        assert all_free(llm)


def test_seeded_sample_i_equals_a_single_request_with_seed_plus_i(model):
    prompt = prompt_of(18, 3)
    params = dict(temperature=1.0, max_tokens=8, ignore_eos=True, logprobs=2)
    with LLM(model=model, num_blocks=64, block_size=BS) as llm:
        group = llm.generate(prompt, SamplingParams(n=4, seed=100, **params))
        singles = llm.generate([prompt] * 4, [SamplingParams(seed=100 + i, **params) for i in range(4)])
        assert [o.index for o in group] == [0, 1, 2, 3]
        assert [o.token_ids for o in group] == [o.token_ids for o in singles]
        for g, s in zip(group, singles):
            assert [list(d) for d in g.logprobs] == [list(d) for d in s.logprobs]
            assert all(abs(g.logprobs[j][t] - s.logprobs[j][t]) < 1e-5 for j, t in enumerate(g.token_ids))
        assert len({tuple(o.token_ids) for o in group}) > 1  # the seeds differ, so do the samples
        again = llm.generate(prompt, SamplingParams(n=4, seed=100, **params))
        assert [o.token_ids for o in again] == [o.token_ids for o in group]


@pytest.mark.parametrize("length", [21, 20, 3])
def test_the_prompt_is_computed_once(model, length):
    """n samples: sample 0 computes the prompt, the others hit every full block but the one holding the
    last token (at least one token is always computed). The same n prompts sent as n requests at once
    are all admitted in one step and compute everything n times."""
    n, prompt = 8, prompt_of(length, 4)
    shared = (length - 1) // BS * BS
    params = SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, n=n)
    with LLM(model=model, num_blocks=80, block_size=BS) as llm:
        llm.generate(prompt, params)
        s = llm.stats()
        assert s["prefix_cache_queries"] == n * length
        assert s["prefix_cache_hits"] == (n - 1) * shared
        computed_n = s["prefix_cache_queries"] - s["prefix_cache_hits"]
        assert s["prompt_tokens_total"] == n * length and s["requests_finished"] == 1
    with LLM(model=model, num_blocks=80, block_size=BS) as llm:
        llm.generate([prompt] * n, SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True))
        s = llm.stats()
        computed_separate = s["prefix_cache_queries"] - s["prefix_cache_hits"]
        assert computed_separate == n * length and s["requests_finished"] == n
    assert computed_n == length + (n - 1) * (length - shared)


def test_parked_samples_do_not_block_other_requests(model):
    """While sample 0's long prompt is computed in chunks, a later request is admitted; the other samples
    then hit sample 0's blocks."""
    long, short = prompt_of(40, 5), prompt_of(5, 6)
    with LLM(model=model, num_blocks=80, block_size=BS, max_num_batched_tokens=16) as llm:
        engine = llm.engine
        engine.add_request("a", long, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=3))
        engine.add_request("b", short, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert engine.num_waiting == 4 and len(engine.scheduler.waiting) == 2
        engine.step()  # 16 tokens of a's prompt: the whole budget
        engine.step()  # 16 more
        engine.step()  # a's last 8, and b (queued behind a's other samples, it would wait for them)
        running = {(s.request_id, s.index) for s in engine.scheduler.running}
        assert ("b", 0) in running and ("a", 1) not in running
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[(out.request_id, out.index)] = out
        expected = greedy_reference(model, long, 4)
        assert [done[("a", i)].token_ids for i in range(3)] == [expected] * 3
        assert [done[("a", i)].num_cached_tokens for i in range(3)] == [0, 36, 36]
        assert done[("b", 0)].token_ids == greedy_reference(model, short, 4)
        assert all_free(llm)


def test_preempted_or_finished_sample_zero_releases_the_others(model):
    prompt = prompt_of(13, 7)
    # a prompt that exactly fills the context: sample 0 finishes on its first token
    with LLM(model=model, num_blocks=4, block_size=BS, max_model_len=14) as llm:
        outs = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, n=3))
        assert [len(o.token_ids) for o in outs] == [1, 1, 1] and {o.finish_reason for o in outs} == {"length"}
        assert all_free(llm)
    # a pool too small for all samples at once: samples are preempted and recomputed
    with LLM(model=model, num_blocks=12, block_size=BS) as llm:
        outs = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, n=4))
        assert llm.stats()["preemptions"] > 0
        assert [o.token_ids for o in outs] == [greedy_reference(model, prompt, 14)] * 4
        assert all_free(llm)


def test_aborting_a_request_aborts_every_sample(model):
    with LLM(model=model, num_blocks=64, block_size=BS) as llm:
        engine = llm.engine
        engine.add_request("x", prompt_of(30, 8), SamplingParams(temperature=0, max_tokens=50, n=4, ignore_eos=True))
        engine.step()  # sample 0's prompt (the others are parked)
        parked = engine.abort_samples("x")
        assert [(o.index, o.finish_reason) for o in parked] == [(i, "abort") for i in range(4)]
        assert all_free(llm) and not engine.scheduler.parked and not engine.has_unfinished()
        engine.add_request("y", prompt_of(30, 8), SamplingParams(temperature=0, max_tokens=50, n=4, ignore_eos=True))
        for _ in range(4):
            engine.step()
        assert len(engine.scheduler.running) == 4
        assert [o.index for o in engine.abort_samples("y")] == [0, 1, 2, 3]
        assert engine.abort_samples("y") == [] and engine.abort_request("y") is None
        assert all_free(llm) and llm.stats()["requests_aborted"] == 2


def test_hybrid_samples_resume_from_the_prompt_snapshot():
    """Kimi Linear: the other samples resume from sample 0's snapshot at the prompt's last block
    boundary, and still give the full forward's greedy tokens."""
    model = random_model(tiny_kimi_linear_config(vocab_size=96, max_position_embeddings=256), seed=9)
    prompt = torch.randint(2, 96, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    with LLM(model=model, num_blocks=64, block_size=BS) as llm:
        outs = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=3))
        assert [o.token_ids for o in outs] == [greedy_reference(model, prompt, 5)] * 3
        assert [o.num_cached_tokens for o in outs] == [0, 20, 20]
        s = llm.stats()
        assert s["state_snapshots_restored"] == 2 and s["blocks_free"] == s["blocks_total"]


def test_async_stream_interleaves_samples_and_abort_frees_all(model):
    prompt = prompt_of(17, 9)
    with AsyncLLM(model=model, num_blocks=64, block_size=BS) as llm:
        async def run():
            outs = [o async for o in llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, n=3,
                                                                         ignore_eos=True), "s")]
            got = 0
            async for _ in llm.generate(prompt, SamplingParams(temperature=0, max_tokens=500, n=3,
                                                               ignore_eos=True), "t"):
                got += 1
                if got == 4:
                    break  # leaving the stream aborts every sample
            return outs
        outs = asyncio.run(run())
        expected = greedy_reference(model, prompt, 5)
        for i in range(3):
            mine = [o for o in outs if o.index == i]
            assert [t for o in mine for t in o.new_token_ids] == expected
            assert mine[-1].finished and not any(o.finished for o in mine[:-1])
        assert outs[-1].finished
        end = time.monotonic() + 10
        while not all_free(llm) and time.monotonic() < end:
            time.sleep(0.02)
        assert all_free(llm)


def test_n_and_derived_seeds_are_validated():
    with pytest.raises(ValueError, match="n=0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n=2.5"):
        SamplingParams(n=2.5)
    SamplingParams(n=3, seed=2**64 - 3)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(n=3, seed=2**64 - 2)  # sample 2's seed would not fit a generator
    assert SamplingParams(n=3, seed=7).sample_params(2).seed == 9
    p = SamplingParams(n=3)
    assert p.sample_params(2) is p


def test_structured_samples_each_follow_the_grammar(tmp_path):
    """Each sample has its own grammar state: every output is valid, and sample i equals the single
    request with seed + i."""
    pytest.importorskip("xgrammar")
    import json

    from moonlet.engine import StructuredOutput
    from moonlet.testing import tiny_tokenizer_dir
    from moonlet.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))
    model = random_model(tiny_k2_config(vocab_size=tok.vocab_size), seed=4)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}},
              "required": ["colour", "n"]}

    def params(**kw):
        return SamplingParams(temperature=1.0, max_tokens=40, logprobs=0, **kw,
                              structured=StructuredOutput(json_schema=schema, any_whitespace=False))

    with LLM(model=model, tokenizer=tok, num_blocks=64, block_size=BS) as llm:
        prompt = tok.encode("Give me a colour and a number as JSON:")
        group = llm.generate(prompt, params(n=4, seed=5))
        singles = llm.generate([prompt] * 4, [params(seed=5 + i) for i in range(4)])
        assert [o.token_ids for o in group] == [o.token_ids for o in singles]
        for o in group:
            if o.finish_reason == "stop":
                value = json.loads(o.text)
                assert value["colour"] in ("red", "green", "blue") and isinstance(value["n"], int)
        assert sum(o.finish_reason == "stop" for o in group) >= 2
        assert all_free(llm)


def test_stopping_one_sample_leaves_the_others(model):
    """abort_sample: that sample ends with 'abort' and frees its blocks; the others run to the end with
    the model's greedy output; the request finishes with its last sample."""
    llm = LLM(model=model, num_blocks=64)
    engine = llm.engine
    prompt = prompt_of(9, seed=3)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3))
    for _ in range(4):
        engine.step()
    stopped = engine.abort_sample("r", 1)
    assert stopped.index == 1 and stopped.finish_reason == "abort" and stopped.finished
    assert engine.abort_sample("r", 1) is None  # already stopped
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.index] = out
    expected = greedy_reference(model, prompt, 12)
    assert sorted(finals) == [0, 2] and all(finals[i].token_ids == expected for i in (0, 2))
    stats = engine.stats()
    assert stats["requests_finished"] == 1 and stats["blocks_free"] == stats["blocks_total"]
