"""Speculative decoding with a draft model (moonlet.engine.draft).

The output must be the target's whatever the draft proposes: greedy output against the model's own
greedy loop (moonlet.testing.greedy_reference) and seeded sampling against the engine without
speculation, with a draft that is another random model (few drafts accepted) and with the target
itself as the draft. The latter also checks the draft's own cache: a draft equal to the target
proposes exactly the target's greedy tokens only if its latents for every earlier position are
right, so any stale or missing draft latent (a prefix-cache hit whose blocks the draft never
computed, a preemption, a rejected draft left in place) shows as a rejected draft."""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import EngineConfig, add_engine_cli_args, engine_args_from_cli
from moonlet.engine.spec import SpeculativeConfig
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

N = 20
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


@pytest.fixture(scope="module")
def other_draft():
    """Another model with the same vocabulary: a few layers fewer, other weights."""
    return random_model(tiny_k2_config(num_hidden_layers=1), seed=11)


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 17, 9, 33, 1)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_reference(model, p, N) for p in prompts]


def draft_llm(model, draft, **kw):
    return LLM(model=model, speculative="draft", speculative_model=draft, **{"num_blocks": 96, **kw})


CONFIGS = {
    "batched": {},
    "one_at_a_time": dict(max_num_seqs=1),
    "chunked_prefill_small_catch_up": dict(max_num_batched_tokens=7),
    "prefix_cache_off": dict(enable_prefix_caching=False),
    "tiny_pool_preempts": dict(num_blocks=20, block_size=4, max_num_batched_tokens=24),
    "k1": dict(num_speculative_tokens=1),
    "k6_block_size_3": dict(num_speculative_tokens=6, block_size=3, num_blocks=300),
    "decode_graphs_eager": dict(block_size=4, num_blocks=300, decode_graphs="eager"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_self_draft_accepts_every_draft_and_output_is_the_reference(model, prompts, expected, name):
    llm = draft_llm(model, model, **CONFIGS[name])
    for _ in range(2):  # the second round starts from prefix-cache hits (draft latents reused or recomputed)
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]  # the draft is the target
    assert stats["generation_tokens_total"] == 2 * N * len(prompts)
    assert stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0
    if name == "batched":
        assert stats["steps"] < N  # several tokens per step
        assert stats["draft_reused_tokens"] > 0  # second round: the prompts' draft latents came from the cache
    if name == "tiny_pool_preempts":
        assert stats["preemptions"] > 0
    if name == "decode_graphs_eager":
        assert llm.engine.proposer.runner.graph_steps > 0  # the draft decodes from its graphs (eager here)


@pytest.mark.parametrize("name", ["batched", "tiny_pool_preempts", "chunked_prefill_small_catch_up"])
def test_other_draft_output_is_the_reference(model, other_draft, prompts, expected, name):
    llm = draft_llm(model, other_draft, **CONFIGS[name])
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]  # a different model: some rejected
    assert stats["blocks_free"] == stats["blocks_total"]


def test_seeded_sampling_equals_no_speculation(model, other_draft, prompts):
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=N, seed=100 + i, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    plain = LLM(model=model, num_blocks=96).generate(prompts, params)
    for draft in (model, other_draft):
        got = draft_llm(model, draft).generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in plain]
        for a, b in zip(got, plain):
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.keys() == y.keys()
                assert all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_prefix_hit_on_blocks_the_draft_never_computed(model, prompts):
    """A request that ends before it decodes (max_tokens=1) fills the prefix cache with target
    latents only; a later request with the same prompt hits them, and its draft must compute those
    positions itself instead of trusting the (zero) draft pool there."""
    llm = draft_llm(model, model, block_size=4)
    prompt = prompts[3]  # 33 tokens: 8 full blocks
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    before = llm.stats()
    out = llm.generate([prompt], GREEDY)[0]
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert out.token_ids == greedy_reference(model, prompt, N)
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    assert stats["draft_reused_tokens"] == 0
    assert stats["draft_catch_up_tokens"] >= len(prompt)  # the whole prompt, once
    # a third request: now the draft latents of those blocks are labelled and reused
    third = llm.generate([prompt], GREEDY)[0]
    assert third.token_ids == out.token_ids
    after = llm.stats()
    assert after["draft_reused_tokens"] >= 32
    assert after["spec_accepted_tokens"] == after["spec_draft_tokens"]


def test_draft_latents_share_the_cache_budget(model, other_draft):
    from moonlet.engine.cache import bytes_per_block

    budget = 1 << 20
    plain = LLM(model=model, kv_cache_memory=budget, block_size=16, max_model_len=256, max_num_seqs=512)
    spec = draft_llm(model, other_draft, num_blocks=None, kv_cache_memory=budget, block_size=16,
                     max_model_len=256, max_num_seqs=512)
    per_target = bytes_per_block(model.config, 16, model.dtype)
    per_draft = bytes_per_block(other_draft.config, 16, model.dtype)
    assert plain.engine.cache.num_blocks == budget // per_target
    assert spec.engine.cache.num_blocks == budget // (per_target + per_draft)
    assert spec.engine.proposer.runner.pool.num_blocks == spec.engine.cache.num_blocks


def test_bad_settings_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="speculative='draft' needs speculative_model"):
        EngineConfig(speculative="draft").validate()
    with pytest.raises(ValueError, match="needs speculative='draft'"):
        EngineConfig(speculative_model="some/dir").validate()
    with pytest.raises(ValueError, match="only used with speculative='draft'"):
        EngineConfig(speculative="ngram", speculative_model="some/dir").validate()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LLM(model=model, num_blocks=16, speculative="draft", speculative_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vocab_size is 300 but the target's is"):
        LLM(model=model, num_blocks=16, speculative="draft",
            speculative_model=random_model(tiny_k2_config(vocab_size=300)))
    with pytest.raises(ValueError, match="the draft has KDA layers"):
        LLM(model=model, num_blocks=16, speculative="draft",
            speculative_model=random_model(tiny_kimi_linear_config(vocab_size=model.config.vocab_size)))


def test_cli_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    kwargs = engine_args_from_cli(parser.parse_args(["--speculative", "draft", "--speculative-model", "ckpt/small",
                                                     "--num-speculative-tokens", "3"]))
    assert kwargs == dict(speculative="draft", speculative_model="ckpt/small", num_speculative_tokens=3)
    assert EngineConfig(**kwargs).speculative_config() == SpeculativeConfig("draft", 3, model="ckpt/small")


def test_draft_checkpoint_with_another_tokenizer_is_refused(model, tmp_path):
    from moonlet.testing import tiny_tokenizer_dir
    from moonlet.weights import save_model

    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    for d, vocab in ((target_dir, 300), (draft_dir, 310)):
        tiny_tokenizer_dir(d, vocab_size=vocab)
    cfg = tiny_k2_config(vocab_size=512)
    save_model(random_model(cfg), target_dir)
    save_model(random_model(cfg, seed=1), draft_dir)
    with pytest.raises(ValueError, match="ships another tokenizer"):
        LLM(str(target_dir), num_blocks=16, speculative="draft", speculative_model=str(draft_dir))
    # the same tokenizer: loads, drafts, and the output is the target's
    tiny_tokenizer_dir(draft_dir, vocab_size=300)
    llm = LLM(str(target_dir), num_blocks=32, speculative="draft", speculative_model=str(draft_dir), dtype="float32")
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    plain = LLM(str(target_dir), num_blocks=32, dtype="float32").generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == plain.token_ids
    assert llm.stats()["spec_draft_tokens"] > 0


def test_draft_pool_holds_the_latents_it_claims(model, prompts):
    """Mid-generation, with sampled requests (drafts rejected often) and a small pool: for every
    running sequence, the positions the proposer counts as right (``valid_prefix``) hold exactly the
    draft latents that a from-scratch prefill of those tokens writes into a fresh pool."""
    from moonlet.engine.cache import LatentCachePool
    from moonlet.engine.runner import ModelRunner, StepInput

    llm = draft_llm(model, model, block_size=4, num_blocks=80)  # the draft's argmax: often but not always sampled
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.2, max_tokens=40, seed=i, ignore_eos=True))
    proposer, checked = engine.proposer, 0
    pool = proposer.runner.pool
    fresh = LatentCachePool(model.config.num_hidden_layers, pool.num_blocks, pool.block_size,
                            pool.latent_dim, dtype=pool.data.dtype)
    scratch = ModelRunner(model, fresh)
    for step in range(12):
        engine.step()
        if step < 3:
            continue
        for seq in engine.scheduler.running:
            if seq.draft_progress is None:
                continue
            c = proposer.valid_prefix(seq)
            if c < 2:
                continue
            fresh.data.zero_()
            scratch.run(StepInput([seq.token_ids[:c]], [0], [1], [seq.block_table]))
            pos = torch.arange(c)
            slots = torch.tensor(seq.block_table)[pos // 4] * 4 + pos % 4
            got = pool.data.flatten(1, 2)[:, slots]
            want = fresh.data.flatten(1, 2)[:, slots]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            checked += 1
    stats = engine.stats()
    assert checked >= 10 and stats["spec_draft_tokens"] > stats["spec_accepted_tokens"] > 0


def test_fp8_cache_for_the_draft_too(model, prompts):
    """With kv_cache_dtype='fp8' the draft's pool is FP8 as well (and sized so); the output equals the
    FP8 engine's without speculation, and a self-draft still has every draft accepted."""
    plain = LLM(model=model, num_blocks=96, kv_cache_dtype="fp8").generate(prompts, GREEDY)
    llm = draft_llm(model, model, kv_cache_dtype="fp8")
    assert llm.engine.proposer.runner.pool.data.dtype == llm.engine.pool.data.dtype
    assert llm.engine.pool.dtype == torch.float8_e4m3fn
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    stats = llm.stats()
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
