"""Decode steps through DecodeGraphs' static, padded buffers give the same tokens as the ordinary
path; with CUDA, the captured graphs do too. Hybrid models (KDA + MLA): the same, with the state
slots in a static buffer, padding rows in the scratch state row, and snapshots taken around graph
steps, all against the model's own full forward."""

import pytest
import torch

from moonlet.engine import LLM, EngineConfig, SamplingParams
from moonlet.testing import greedy_reference, random_model, tiny_k2_config, tiny_kimi_linear_config

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [5, 9, 2, 7, 1, 3, 8, 8, 20, 21, 22], [17, 4], [30, 31, 32, 33, 34, 35, 36, 37, 38]]


def _generate(model, **engine_args):
    llm = LLM(model=model, block_size=4, num_blocks=48, max_num_seqs=8, **engine_args)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 5, 12, 7)]
    outs = [o.token_ids for o in llm.generate(PROMPTS, params)]
    return llm, outs


def test_padded_static_buffer_decode_matches_the_ordinary_path():
    model = random_model(tiny_k2_config(), seed=4)
    _, expect = _generate(model, decode_graphs="off")
    # batch sizes 1, 2, 3 and 4 occur as sequences finish; 3 runs padded to 4 with a scratch row
    llm, got = _generate(model, decode_graphs="eager", decode_graph_batch_sizes=(2, 4))
    assert got == expect
    runner = llm.engine.runner
    assert runner.graph_steps > 0 and runner.graphs.batch_sizes == [2, 4, 8]
    # the scratch block exists in the pool but the cache manager never hands it out
    assert llm.engine.pool.num_blocks == llm.engine.cache.num_blocks + 1 == 49
    assert runner.graphs.scratch_block == 48
    assert llm.stats()["blocks_free"] == llm.stats()["blocks_total"] == 48


def test_decode_graph_settings_are_checked():
    with pytest.raises(ValueError, match="decode_graphs='always'"):
        EngineConfig(decode_graphs="always").validate()
    with pytest.raises(ValueError, match="decode_graph_batch_sizes"):
        EngineConfig(decode_graph_batch_sizes=(0, 4)).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            LLM(model=random_model(tiny_k2_config(), seed=0), decode_graphs="cuda", num_blocks=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_cuda():
    model = random_model(tiny_k2_config(), seed=4).to("cuda")
    _, expect = _generate(model, decode_graphs="off")
    llm, got = _generate(model, decode_graphs="cuda")
    assert got == expect and llm.engine.runner.graph_steps > 0


def test_triton_decode_kernel_setting_is_checked():
    with pytest.raises(ValueError, match="decode_kernel='flash'"):
        EngineConfig(decode_kernel="flash").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            LLM(model=random_model(tiny_k2_config(), seed=0), decode_kernel="triton", num_blocks=8)
        llm = LLM(model=random_model(tiny_k2_config(), seed=0), num_blocks=8)  # CPU default: the reference
        from moonlet.engine.attention import paged_decode_attention
        assert llm.engine.runner.kv.decode_kernel is paged_decode_attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_paths_give_the_reference_tokens():
    """bf16 on CUDA: Triton decode + expanded prefill + CUDA graphs against the plain-PyTorch paths."""
    from moonlet.kernels import mla_decode

    if not mla_decode.available():
        pytest.skip("triton or a compute capability >= 8.0 GPU missing")
    model = random_model(tiny_k2_config(), seed=4).to("cuda").cast(torch.bfloat16)
    _, expect = _generate(model, decode_kernel="reference", prefill_attention="absorbed", decode_graphs="off")
    llm, got = _generate(model)  # the CUDA defaults
    runner = llm.engine.runner
    assert runner.kv.decode_kernel is mla_decode.paged_decode_attention_triton and runner.kv.expanded_prefill
    assert runner.graph_steps > 0
    # bf16 kernels sum in other orders: allow a late divergence, but the first tokens must agree
    assert [g[:3] for g in got] == [e[:3] for e in expect]


# ---- hybrid models (KDA layers) -------------------------------------------------------------------

def _hybrid_model():
    # KDA, MLA, KDA, KDA after a dense first layer
    return random_model(tiny_kimi_linear_config(vocab_size=96, max_position_embeddings=512, linear_attn_config=dict(
        kda_layers=[1, 3, 4], full_attn_layers=[2], num_heads=2, head_dim=8, short_conv_kernel_size=4)), seed=7)


@pytest.fixture(scope="module")
def hybrid():
    return _hybrid_model()


HYBRID_PROMPTS = [list(range(3, 40)), [7, 8, 9, 10, 11], [12] * 14, [40, 41], list(range(50, 73))]
HYBRID_LENGTHS = (6, 13, 9, 17, 11)  # sequences finish at different steps: batch sizes 5, 4, 3, 2, 1


def _check_states_free(llm):
    cache = llm.engine.cache
    assert sorted(cache._free_slots) == list(range(cache.state_slots))
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"] and stats["running"] == 0
    snaps = cache.snapshots
    assert not snaps._pending and sorted(list(snaps.row_of.values()) + snaps._free) == list(range(snaps.capacity))


def test_hybrid_graph_decode_with_padding_equals_the_full_forward(hybrid):
    expect = [greedy_reference(hybrid, p, n) for p, n in zip(HYBRID_PROMPTS, HYBRID_LENGTHS)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in HYBRID_LENGTHS]
    llm = LLM(model=hybrid, block_size=4, num_blocks=96, max_num_seqs=8, decode_graphs="eager",
              decode_graph_batch_sizes=(2, 4))
    graphs, states = llm.engine.runner.graphs, llm.engine.runner.states
    assert graphs.batch_sizes == [2, 4, 8]
    # the scratch row comes after the 8 slots and 8 snapshot rows; padding rows point at it
    assert states.scratch_row == 16 and next(iter(states.states.values())).recurrent.shape[0] == 17
    assert graphs.state_slots.tolist() == [16] * 8
    assert [o.token_ids for o in llm.generate(HYBRID_PROMPTS, params)] == expect
    # batch sizes 5 and 3 ran padded to 8 and 4 (from the graph buffers, not the ordinary path)
    assert llm.engine.runner.graph_steps >= max(HYBRID_LENGTHS) - 2
    _check_states_free(llm)
    # again: slots reused, prompts resume from snapshots; a 1-token remainder after a hit decodes in the graph
    assert [o.token_ids for o in llm.generate(HYBRID_PROMPTS, params)] == expect
    assert llm.stats()["prefix_cache_hits"] > 0
    _check_states_free(llm)


def test_hybrid_snapshots_from_graph_steps_serve_later_hits(hybrid):
    prompt = list(range(3, 24))  # 21 tokens, block size 4: the prompt-end snapshot is at 20
    llm = LLM(model=hybrid, block_size=4, num_blocks=96, max_num_seqs=4, decode_graphs="eager",
              decode_graph_batch_sizes=(4,))
    runner, snaps = llm.engine.runner, llm.engine.cache.snapshots
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # with a second, shorter request running beside it, its decode steps run padded (2 -> 4)
    first, other = llm.generate([prompt, [5, 6, 7]], params)
    assert first.token_ids == greedy_reference(hybrid, prompt, 12)
    steps = runner.graph_steps
    assert steps == 11  # every decode step (the prefill step samples the first token)
    # one prompt-end snapshot (at 20; the 3-token prompt has none), then three output snapshots each,
    # all taken by graph steps: at 24, 28, 32 and at 4, 8, 12 (each sequence's rewritten in one row)
    assert snaps.num_saved == 1 + 3 + 3 and len(snaps) == 1 + 1 + 1
    # the next turn resumes at the last boundary the graph decode crossed (32 of 33 computed tokens)
    turn2 = prompt + first.token_ids + [60, 61]
    out = llm.generate([turn2], params)[0]
    assert out.num_cached_tokens == 32 and out.token_ids == greedy_reference(hybrid, turn2, 12)
    # the same prompt again: resumes at 20 and computes one token, as a graph decode from the restored slot
    before = runner.graph_steps
    again = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert again.num_cached_tokens == 20 and again.token_ids == first.token_ids[:3]
    assert runner.graph_steps - before == 3
    # a one-token prompt in a reused slot starts from zeros in the graph path too
    assert llm.generate([[9]], params)[0].token_ids == greedy_reference(hybrid, [9], 12)
    _check_states_free(llm)


def test_hybrid_padding_rows_leave_real_slots_alone(hybrid):
    """A padded step through DecodeGraphs.run directly: the real rows' states equal an unpadded
    eager step's, the slots not in the batch and every snapshot row are untouched."""
    from moonlet.engine.attention import PagedLatentKV
    from moonlet.engine.cache import LatentCachePool, latent_layer_ids
    from moonlet.engine.cuda_graph import DecodeGraphs
    from moonlet.engine.recurrent import RecurrentStates
    from moonlet.engine.runner import ModelRunner

    cfg = hybrid.config

    def setup():
        states = RecurrentStates(cfg, num_slots=4, dtype=torch.float32, device="cpu", num_snapshots=2,
                                 scratch_row=True)
        for s in states.states.values():
            for t in s:
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        pool = LatentCachePool(cfg.num_hidden_layers, 9, 4, cfg.latent_dim, layer_ids=latent_layer_ids(cfg))
        pool.data.copy_(torch.randn(pool.data.shape, generator=torch.Generator().manual_seed(2)))
        return states, pool

    tokens, positions, tables, slots = [5, 6, 7], [6, 2, 9], [[0, 1], [2], [3, 4, 5]], [3, 0, 2]
    states, pool = setup()
    graphs = DecodeGraphs(hybrid, PagedLatentKV(pool, cfg.kv_lora_rank, states=states), scratch_block=8,
                          max_blocks=4, batch_sizes=(8,), capture=False)
    got = graphs.run(tokens, positions, tables, slots, state_saves=[(2, 1, 1)])
    # the ordinary path on a fresh copy of the same states and pool
    ref_states, ref_pool = setup()
    runner = ModelRunner(hybrid, ref_pool, states=ref_states)

    class Seq:
        def __init__(self, tok, pos, table, slot):
            self.token_ids, self.num_computed_tokens = [0] * pos + [tok], pos
            self.num_tokens, self.block_table, self.state_slot = pos + 1, table, slot

    from moonlet.engine.scheduler import ScheduledBatch
    batch = ScheduledBatch(seqs=[Seq(*a) for a in zip(tokens, positions, tables, slots)], num_new_tokens=[1] * 3,
                           state_saves=[(2, 1, 1)])
    _, expect = runner.execute(batch)
    torch.testing.assert_close(got, expect)
    real = [0, 1, 2, 3, 4, 5]  # 4 slots (slot 1 not in the batch) and 2 snapshot rows (row 5 saved from slot 2)
    for layer in cfg.kda_layer_ids:
        for a, b in zip(states.states[layer], ref_states.states[layer]):
            torch.testing.assert_close(a[real], b[real])
    torch.testing.assert_close(pool.data[:, :8], ref_pool.data[:, :8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hybrid_cuda_graph_decode_matches_eager_cuda():
    model = _hybrid_model().to("cuda")
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in HYBRID_LENGTHS]
    runs = {}
    for mode in ("off", "cuda"):
        llm = LLM(model=model, block_size=4, num_blocks=96, max_num_seqs=8, decode_graphs=mode,
                  decode_graph_batch_sizes=(2, 4))
        runs[mode] = [[o.token_ids for o in llm.generate(HYBRID_PROMPTS, params)] for _ in range(2)]
        if mode == "cuda":
            assert llm.engine.runner.graph_steps > 0 and llm.stats()["prefix_cache_hits"] > 0
            _check_states_free(llm)
    assert runs["cuda"] == runs["off"]
