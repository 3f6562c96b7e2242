"""Multi-LoRA serving (moonlet.engine.lora): requests under different adapters and the base model,
batched together, give per request what the model with that adapter MERGED gives alone (its own full
forward, no cache: greedy tokens and log-probabilities); prefix-cache blocks are never shared across
adapters; more adapters than resident slots queue and evict least recently used; bad input is refused."""

import copy

import pytest
import torch

from moonlet.engine import LLM, EngineConfig, SamplingParams
from moonlet.model.lora import merge_adapter
from moonlet.testing import greedy_reference, random_adapter, random_model, tiny_k2_config, tiny_v2_lite_config

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_k2_config(), seed=3)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """a: every default target (MLA projections, dense MLP, shared experts), rank 4; b: attention only
    (kv_b_proj included), rank 8; c: MLP only, rank 2 with another alpha."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": random_adapter(model, root / "a", r=4, alpha=8.0, seed=11),
        "b": random_adapter(model, root / "b", r=8, alpha=4.0, seed=12,
                            targets=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
        "c": random_adapter(model, root / "c", r=2, alpha=6.0, seed=13, targets=("gate_proj", "up_proj", "down_proj")),
    }


@pytest.fixture(scope="module")
def merged(model, adapters):
    """The independent references: the base model and each adapter merged into a copy of it."""
    out = {None: model}
    for name, path in adapters.items():
        out[name] = merge_adapter(copy.deepcopy(model), path).eval()
    return out


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in (5, 19, 40, 3)]


def greedy(lora=None, logprobs=None, max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, lora=lora, logprobs=logprobs)


def reference_logprobs(model, prompt, tokens):
    """log-softmax of the model's full forward at each generated position, for the generated token."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0].float(), dim=-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def _lora_llm(model, adapters, **kwargs):
    return LLM(model=model, lora_modules={k: str(v) for k, v in adapters.items()}, **kwargs)


CONFIGS = {
    "batched": dict(num_blocks=64),
    "chunked_prefill": dict(num_blocks=64, max_num_batched_tokens=8),
    "expanded_prefill": dict(num_blocks=64, prefill_attention="expanded"),
    "eager_decode_graphs": dict(num_blocks=64, decode_graphs="eager", decode_graph_batch_sizes=(2, 4, 8)),
    "preempting_pool": dict(num_blocks=14, block_size=4, max_num_batched_tokens=24),
    "ngram_drafts": dict(num_blocks=64, speculative="ngram", num_speculative_tokens=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_batch_equals_each_adapter_merged(model, adapters, merged, prompts, name):
    """The decisive test: one batch mixing adapters a, b, c and the base model; each request's greedy
    tokens and log-probabilities equal its merged model's own full forward."""
    llm = _lora_llm(model, adapters, **CONFIGS[name])
    jobs = [(p, lora) for p in prompts for lora in (None, "a", "b", "c")]
    outs = llm.generate([p for p, _ in jobs], [greedy(lora, logprobs=1) for _, lora in jobs])
    for (prompt, lora), out in zip(jobs, outs):
        assert out.token_ids == greedy_reference(merged[lora], prompt, MAX_TOKENS), (name, lora, prompt)
        got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        assert got == pytest.approx(reference_logprobs(merged[lora], prompt, out.token_ids), abs=2e-4)
    # the adapters do change the outputs (else the comparison above would prove little)
    by_lora = {lora: [o.token_ids for (_, l), o in zip(jobs, outs) if l == lora] for lora in (None, "a", "b", "c")}
    assert len({tuple(map(tuple, v)) for v in by_lora.values()}) == 4
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]
    assert stats["lora_requests"] == {"a": 4, "b": 4, "c": 4}
    if name == "eager_decode_graphs":
        assert llm.engine.runner.graph_steps > 0
    if name == "ngram_drafts":
        assert stats["spec_draft_tokens"] > 0


def test_base_requests_unchanged_by_enabling_lora(model, adapters, prompts):
    plain = [(o.token_ids, o.logprobs) for o in LLM(model=model, num_blocks=64).generate(prompts, greedy(logprobs=2))]
    llm = _lora_llm(model, adapters, num_blocks=64)
    assert [(o.token_ids, o.logprobs) for o in llm.generate(prompts, greedy(logprobs=2))] == plain  # exactly


def test_prefix_cache_is_isolated_between_adapters(model, adapters, merged):
    """Same 37-token prompt (two full 16-token blocks) under a, then b, then the base model, then a and b
    again: no hit across adapters (or with the base), the full blocks hit within one adapter."""
    prompt = list(range(40, 77))
    llm = _lora_llm(model, adapters, num_blocks=64, max_num_seqs=1)
    seen = []
    for lora in ("a", "b", None, "a", "b", None):
        out = llm.generate(prompt, greedy(lora))[0]
        assert out.token_ids == greedy_reference(merged[lora], prompt, MAX_TOKENS), lora
        seen.append(out.num_cached_tokens)
    assert seen == [0, 0, 0, 32, 32, 32]
    # an adapter registered again under another name has the same content: its blocks are shared
    llm.add_lora("a_again", adapters["a"])
    assert llm.generate(prompt, greedy("a_again"))[0].num_cached_tokens == 32


def test_readding_a_name_with_other_weights_does_not_reuse_its_blocks(model, adapters, merged):
    prompt = list(range(100, 140))
    llm = _lora_llm(model, {"x": adapters["a"]}, num_blocks=64)
    assert llm.generate(prompt, greedy("x"))[0].token_ids == greedy_reference(merged["a"], prompt, MAX_TOKENS)
    llm.remove_lora("x")
    llm.add_lora("x", adapters["b"])
    out = llm.generate(prompt, greedy("x"))[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == greedy_reference(merged["b"], prompt, MAX_TOKENS)


def test_more_adapters_than_slots_queue_and_evict_lru(model, adapters, merged, prompts):
    """max_loras=1: requests for a, b, c and the base in one submission. None fails; base requests run
    alongside any adapter; adapters take turns in the one slot (each loaded once, in arrival order),
    and every output equals its merged reference."""
    llm = _lora_llm(model, adapters, num_blocks=64, max_loras=1)
    jobs = [(p, lora) for lora in ("a", "b", None, "c") for p in prompts[:2]]
    outs = llm.generate([p for p, _ in jobs], [greedy(lora) for _, lora in jobs])
    for (prompt, lora), out in zip(jobs, outs):
        assert out.token_ids == greedy_reference(merged[lora], prompt, MAX_TOKENS), lora
    stats = llm.stats()
    assert (stats["lora_loads"], stats["lora_evictions"], stats["lora_resident"]) == (3, 2, 1)
    assert llm.engine.lora.slots == ["c"]


def test_lru_keeps_the_recently_used_adapter(model, adapters):
    llm = _lora_llm(model, adapters, num_blocks=64, max_loras=2)
    for lora in ("a", "b", "a", "c"):  # c replaces b (least recently used), not a
        llm.generate([5, 6, 7], greedy(lora, max_tokens=2))
    assert sorted(s for s in llm.engine.lora.slots) == ["a", "c"]
    assert llm.stats()["lora_evictions"] == 1


def test_waiting_adapter_request_does_not_block_later_requests(model, adapters):
    """One slot held by a running request of a: a request of b waits (skipped), the base request behind
    it is admitted in the same step."""
    llm = _lora_llm(model, adapters, num_blocks=64, max_loras=1)
    core = llm.engine
    core.add_request("ra", [5, 6, 7], greedy("a", max_tokens=6))
    core.step()
    core.add_request("rb", [5, 6, 7], greedy("b", max_tokens=2))
    core.add_request("base", [5, 6, 7], greedy(None, max_tokens=2))
    core.step()
    assert [s.request_id for s in core.scheduler.running] == ["ra", "base"]
    assert [s.request_id for s in core.scheduler.waiting] == ["rb"]
    while core.has_unfinished():
        core.step()
    assert core.stats()["lora_loads"] == 2


@pytest.mark.parametrize("wait_steps", [3, 1000])
def test_a_request_starved_of_a_slot_gets_one_after_max_lora_wait_steps(model, adapters, merged, wait_steps):
    """One slot, a steady stream of requests of adapter a (each passes a waiting request of b, since a
    is resident). With max_lora_wait_steps=3 the b request stops being passed after 3 steps of waiting:
    the a requests already running finish, b gets the slot and runs while the stream is still coming;
    with an effectively unbounded wait b runs only once the stream has stopped."""
    llm = _lora_llm(model, adapters, num_blocks=128, max_loras=1, max_lora_wait_steps=wait_steps)
    core = llm.engine
    core.add_request("a0", [5, 6, 7], greedy("a", max_tokens=4))
    core.step()
    rb = core.add_request("rb", [9, 8, 7, 6], greedy("b", max_tokens=3))
    admitted_at, tokens = None, {}
    for step in range(40):
        if step < 20:  # the stream of a requests
            core.add_request(f"a{step + 1}", [5, 6, 7, step + 10], greedy("a", max_tokens=4))
        for out in core.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        if admitted_at is None and rb.num_computed_tokens > 0:
            admitted_at = step
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
    assert admitted_at is not None
    if wait_steps == 3:
        assert admitted_at < 3 + 4 + 2  # its wait, the running a requests' last tokens, one step of slack
    else:
        assert admitted_at >= 20
    assert tokens["rb"] == greedy_reference(merged["b"], [9, 8, 7, 6], 3)
    assert tokens["a7"] == greedy_reference(merged["a"], [5, 6, 7, 16], 4)


def test_async_add_remove_and_generate(model, adapters, merged):
    import asyncio

    from moonlet.engine import AsyncLLM

    async def main():
        engine = AsyncLLM(model=model, num_blocks=64, enable_lora=True)
        try:
            assert engine.list_loras() == {}
            await engine.add_lora("b", adapters["b"])
            assert engine.list_loras() == {"b": str(adapters["b"])}
            outs = [o async for o in engine.generate([9, 8, 7, 6], greedy("b"))]
            assert outs[-1].token_ids == greedy_reference(merged["b"], [9, 8, 7, 6], MAX_TOKENS)
            with pytest.raises(ValueError, match="already registered"):
                await engine.add_lora("b", adapters["a"])
            await engine.remove_lora("b")
            with pytest.raises(ValueError, match="unknown LoRA adapter 'b'"):
                [o async for o in engine.generate([9, 8], greedy("b"))]
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_errors(model, adapters, tmp_path):
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        LLM(model=model, num_blocks=16).generate([1, 2], greedy("a"))
    llm = _lora_llm(model, {k: adapters[k] for k in ("a", "c")}, num_blocks=16, max_lora_rank=4)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'zz'; registered: a, c"):
        llm.generate([1, 2], greedy("zz"))
    with pytest.raises(ValueError, match="SamplingParams.lora"):
        SamplingParams(lora="")
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank=4"):
        llm.add_lora("b2", adapters["b"])
    from moonlet.model.lora import LoraSettings, add_lora, save_adapter

    wrapped = copy.deepcopy(model)
    add_lora(wrapped, LoraSettings(r=2, targets=("gate_proj",), experts=True))
    save_adapter(wrapped, tmp_path / "with_experts")
    with pytest.raises(ValueError, match="routed expert"):
        llm.add_lora("e", tmp_path / "with_experts")
    with pytest.raises(ValueError, match="not supported"):
        EngineConfig(enable_lora=True, tensor_parallel_size=2).validate()
    with pytest.raises(ValueError, match="max_loras=0"):
        EngineConfig(enable_lora=True, max_loras=0).validate()
    other = random_model(tiny_v2_lite_config(), seed=1)
    with pytest.raises(ValueError, match="another model size"):
        LLM(model=other, num_blocks=16, lora_modules={"a": str(adapters["a"])})
    # in use: a waiting request holds its adapter
    core = llm.engine
    core.add_request("r", [1, 2, 3], greedy("a"))
    with pytest.raises(ValueError, match="in use"):
        llm.remove_lora("a")
    core.abort_request("r")
    llm.remove_lora("a")
    assert list(llm.list_loras()) == ["c"]


def test_hybrid_models_are_refused(tmp_path):
    from moonlet.testing import tiny_kimi_linear_config

    with pytest.raises(ValueError, match="KDA"):
        LLM(model=random_model(tiny_kimi_linear_config(), seed=0), num_blocks=16, enable_lora=True)


def test_cli_lora_modules_parse():
    from moonlet.engine.config import parse_lora_modules

    assert parse_lora_modules(["a=/x/a", "b = y"]) == {"a": "/x/a", "b": "y"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora_modules(["nopath"])
    with pytest.raises(ValueError, match="twice"):
        parse_lora_modules(["a=1", "a=2"])
