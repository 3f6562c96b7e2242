"""Decode steps through DecodeGraphs' static, padded buffers give the same tokens as the ordinary
path; with CUDA, the captured graphs do too."""

import pytest
import torch

from moonlet.engine import LLM, EngineConfig, SamplingParams
from moonlet.testing import random_model, tiny_k2_config

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
