"""Expanded MLA prefill with prefix-cached latents merged by log-sum-exp, against the model's own
expanded attention over the whole sequence (torch SDPA) and the absorbed engine path."""

import pytest
import torch

from moonlet.kernels.mla_prefill import (attention_reference, attention_with_lse, expanded_prefill_attention,
                                         merge_by_lse)
from moonlet.model.attention import MLAttention
from moonlet.model.rope import RotaryEmbedding
from moonlet.testing import tiny_k2_config


def test_merge_by_lse_equals_softmax_over_the_union():
    torch.manual_seed(0)
    h, T, S, d = 3, 5, 11, 4
    q, k, v = torch.randn(h, T, d), torch.randn(h, S, d), torch.randn(h, S, 6)
    whole, whole_lse = attention_reference(q, k, v, 0.3, causal=False)
    parts = [attention_reference(q, k[:, a:b], v[:, a:b], 0.3, causal=False) for a, b in ((0, 4), (4, 5), (5, 11))]
    assert torch.allclose(merge_by_lse(parts), whole, atol=1e-6)
    assert torch.allclose(torch.logsumexp(torch.stack([lse for _, lse in parts]), 0), whole_lse, atol=1e-6)
    # the reference itself against a direct softmax
    probs = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * 0.3, dim=-1)
    assert torch.allclose(whole, torch.matmul(probs, v), atol=1e-6)


def _attention_module(seed=0):
    cfg = tiny_k2_config()
    torch.manual_seed(seed)
    attn = MLAttention(cfg, layer_idx=0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return cfg, attn


@pytest.mark.parametrize("prefix_chunk", [3, 4096])
@pytest.mark.parametrize("cached", [0, 1, 9])
def test_expanded_prefill_matches_the_models_sdpa_attention_over_the_whole_sequence(cached, prefix_chunk):
    cfg, attn = _attention_module()
    T = 6
    L = cached + T
    x = torch.randn(1, L, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)
    cos, sin = rope(torch.arange(L)[None])
    with torch.no_grad():
        q_nope, q_pe = attn.project_q(x)
        latent, k_pe = attn.project_latent(x)
        from moonlet.model.rope import apply_rope
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        expect = attn._expanded(q_nope, q_pe, latent, k_pe, None)[0, cached:]  # [T, h, v] via SDPA, causal
        w_uk, w_uv = attn.absorbed_weights()
        ctx = torch.cat([latent[0], k_pe[0]], dim=-1)  # what the paged cache holds
        got = expanded_prefill_attention(q_nope[0, cached:], q_pe[0, cached:], ctx, cfg.kv_lora_rank, w_uk, w_uv,
                                         attn.softmax_scale, prefix_chunk=prefix_chunk)
    assert got.shape == expect.shape and got.dtype == torch.float32
    assert torch.allclose(got, expect.float(), atol=1e-5, rtol=1e-4)


def test_causal_needs_square_and_context_must_hold_the_new_tokens():
    with pytest.raises(ValueError, match="as many keys as queries"):
        attention_reference(torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4), 1.0, causal=True)
    cfg, attn = _attention_module()
    w_uk, w_uv = attn.absorbed_weights()
    h, r = cfg.num_attention_heads, cfg.qk_rope_head_dim
    with pytest.raises(ValueError, match="must include"):
        expanded_prefill_attention(torch.randn(4, h, cfg.qk_nope_head_dim), torch.randn(4, h, r),
                                   torch.randn(2, cfg.kv_lora_rank + r), cfg.kv_lora_rank, w_uk, w_uv, 0.1)


def test_engine_greedy_tokens_are_the_same_with_expanded_and_absorbed_prefill():
    from moonlet.engine import LLM, EngineConfig, SamplingParams
    from moonlet.testing import random_model

    model = random_model(tiny_k2_config(), seed=3)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 8, 4, 6, 2, 9, 11, 13], [5, 9, 2, 7, 1, 3, 8, 8, 20, 21], [17, 4]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for mode in ("absorbed", "expanded"):
        # small blocks and token budget: chunked prefill, and the later prompts hit the first one's prefix
        llm = LLM(model=model, prefill_attention=mode, block_size=4, num_blocks=64, max_num_batched_tokens=8)
        first = llm.generate(prompts[:1], params)
        rest = llm.generate(prompts[1:], params)
        outs[mode] = [o.token_ids for o in first + rest]
        assert llm.engine.runner.kv.expanded_prefill == (mode == "expanded")
        assert llm.engine.stats()["prefix_cache_hits"] > 0
    assert outs["expanded"] == outs["absorbed"]


def test_engine_rejects_an_unknown_prefill_attention():
    from moonlet.engine import EngineConfig

    with pytest.raises(ValueError, match="prefill_attention='flash'"):
        EngineConfig(prefill_attention="flash").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_attention_with_lse_matches_the_reference():
    torch.manual_seed(0)
    h, T, S, dq, dv = 16, 70, 70, 192, 128  # MLA head sizes at Moonlight/K2 shapes
    q, k, v = (torch.randn(h, n, d, device="cuda", dtype=torch.bfloat16) for n, d in ((T, dq), (S, dq), (S, dv)))
    for causal in (False, True):
        out, lse = attention_with_lse(q, k, v, dq ** -0.5, causal)
        ref, ref_lse = attention_reference(q.float(), k.float(), v.float(), dq ** -0.5, causal)
        assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)
