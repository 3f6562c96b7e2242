"""A hybrid model (Kimi Linear: KDA layers + NoPE MLA) in the engine: greedy outputs equal the model's
own full-sequence forward however the engine batches, chunks, preempts or resumes from prefix hits,
the KDA states live in slots that are all free again afterwards, and the latent pool holds only the
MLA layers. (Prefix caching in detail: test_engine_hybrid_prefix.py.)"""

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.model.transformer import Transformer
from moonlet.testing import greedy_reference, tiny_kimi_linear_config

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def tiny_hybrid_config():
    # KDA, KDA, MLA, KDA: an MLA layer between KDA layers
    return tiny_kimi_linear_config(vocab_size=96, max_position_embeddings=512, linear_attn_config=dict(
        kda_layers=[1, 2, 4], full_attn_layers=[3], num_heads=2, head_dim=8, short_conv_kernel_size=4))


@pytest.fixture(scope="module")
def model():
    m = Transformer(tiny_hybrid_config()).init_weights(seed=4)
    gen = torch.Generator().manual_seed(5)
    for name, buf in m.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 40, 2, 23, 70)]
    # shares a prefix with base[1]; a one-token prompt runs as a decode from a cleared slot
    return base + [base[1][:32] + [7, 7], [9]]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_reference(model, p, MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("engine_args", [
    dict(num_blocks=64),
    dict(num_blocks=64, max_num_seqs=1),
    dict(num_blocks=64, max_num_batched_tokens=7),  # chunked prefill: state carried across chunks
    dict(num_blocks=22, block_size=4, max_num_batched_tokens=24),  # preemption: recomputed from zero state
    dict(num_blocks=64, max_num_seqs=3),  # more prompts than slots: slots are reused
    dict(num_blocks=64, enable_prefix_caching=False),
])
def test_hybrid_engine_greedy_equals_full_forward(model, prompts, expected, engine_args):
    llm = LLM(model=model, **engine_args)
    caching = engine_args.get("enable_prefix_caching", True)
    assert llm.engine.config.enable_prefix_caching == caching
    assert llm.engine.pool.layer_ids == [2]  # only the MLA layer keeps latents
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    # again: slots reused (no stale state), and the prompts resume from their snapshots
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    assert (llm.stats()["prefix_cache_hits"] > 0) == caching
    cache = llm.engine.cache
    assert sorted(cache._free_slots) == list(range(cache.state_slots))
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]
    if engine_args.get("num_blocks") == 22:
        assert stats["preemptions"] > 0


def test_decode_graphs_serve_hybrid_models(model, prompts, expected):
    # the static-buffer decode path (eager stand-in of the CUDA graphs); more in test_decode_graphs.py
    llm = LLM(model=model, num_blocks=64, max_num_seqs=4, decode_graphs="eager", decode_graph_batch_sizes=(4,))
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    assert llm.engine.runner.graph_steps > 0


def test_streaming_abort_frees_the_slot(model, prompts):
    llm = LLM(model=model, num_blocks=64, max_num_seqs=2)
    engine = llm.engine
    engine.add_request("a", prompts[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert len(engine.cache._free_slots) == 1
    engine.abort_request("a")
    assert len(engine.cache._free_slots) == 2
