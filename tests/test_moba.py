"""MoBA block-sparse attention (moonlet/model/sparse.py) and its use in MLAttention's expanded path.

References: dense attention under an explicitly built token mask, a per-query brute-force selection,
and PyTorch's dense causal SDPA where MoBA must reduce to it.
"""

import pytest
import torch
import torch.nn.functional as F

import moonlet.model.attention as attention_mod
from moonlet.model import sparse
from moonlet.model.sparse import (
    moba_attention,
    moba_attention_reference,
    moba_max_logit,
    moba_select,
    moba_token_mask,
)
from moonlet.testing import random_model, tiny_k2_config

# (T, block_size, top_k): T a multiple of B or not, more or fewer blocks than top_k, top_k == 1.
SHAPES = [(64, 8, 3), (45, 8, 3), (37, 5, 4), (30, 7, 2), (50, 6, 1), (9, 4, 5)]


def _qkv(T, dtype=torch.float32, batch=2, heads=3, d_qk=12, d_v=5, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda d: torch.randn(batch, heads, T, d, generator=gen).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(d_qk), mk(d_qk), mk(d_v)


def _brute_force_selection(q, k, block_size, top_k):
    """Per query and head: score every complete earlier block by <q, mean k> in float64, keep the
    top-(k-1), ties to the lower block index."""
    Bt, h, T, _ = q.shape
    nb = -(-T // block_size)
    out = torch.zeros(Bt, h, T, nb, dtype=torch.bool)
    for b in range(Bt):
        for hh in range(h):
            for t in range(T):
                own = t // block_size
                scores = []
                for j in range(own):
                    mean = k[b, hh, j * block_size:(j + 1) * block_size].double().mean(0)
                    scores.append((float(q[b, hh, t].double() @ mean), j))
                for _, j in sorted(scores, key=lambda sj: (-sj[0], sj[1]))[: top_k - 1]:
                    out[b, hh, t, j] = True
    return out


@pytest.mark.parametrize("T,block_size,top_k", SHAPES)
def test_efficient_matches_reference_fp32(T, block_size, top_k):
    q, k, v = _qkv(T)
    out = moba_attention(q, k, v, block_size, top_k, scale=0.29)
    ref = moba_attention_reference(q, k, v, block_size, top_k, scale=0.29)
    assert out.dtype == torch.float32 and out.shape == v.shape
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_efficient_matches_reference_bf16():
    q, k, v = _qkv(70, dtype=torch.bfloat16, d_qk=32, d_v=16)
    out = moba_attention(q, k, v, 8, 3, scale=32**-0.5)
    ref = moba_attention_reference(q, k, v, 8, 3, scale=32**-0.5)  # same selection, fp32 math
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_many_tiles_and_chunks_match_reference(monkeypatch):
    # Tiny tiles and chunks: several chunks per key block, many tiles, several gate tiles.
    monkeypatch.setattr(sparse, "_CHUNK", 3)  # fixed, instead of the automatic size
    monkeypatch.setattr(sparse, "_TILE_ELEMS", 50)
    monkeypatch.setattr(sparse, "_GATE_TILE", 7)
    q, k, v = _qkv(41, dtype=torch.float64, requires_grad=True)
    out, lse = moba_attention(q, k, v, 4, 3, scale=0.4, return_lse=True)
    ref = moba_attention_reference(q, k, v, 4, 3, scale=0.4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert torch.equal(moba_select(q, k, 4, 3), _brute_force_selection(q.detach(), k.detach(), 4, 3))


@pytest.mark.parametrize("T,block_size,top_k", [(8, 8, 3), (5, 8, 2), (40, 8, 5), (41, 8, 9)])
def test_reduces_to_dense_causal(T, block_size, top_k):
    # T <= B (one block), or top_k >= number of blocks (every earlier block selected): dense causal.
    q, k, v = _qkv(T)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(moba_attention(q, k, v, block_size, top_k, scale=0.3), dense, atol=2e-6, rtol=1e-5)
    out, lse = moba_attention(q, k, v, block_size, top_k, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("T,block_size,top_k", [(29, 4, 3), (24, 6, 2), (11, 4, 6)])
def test_gradients_match_reference(T, block_size, top_k):
    q, k, v = _qkv(T, dtype=torch.float64, requires_grad=True, seed=1)
    out, lse = moba_attention(q, k, v, block_size, top_k, scale=0.35, return_lse=True)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))

    mask = moba_token_mask(moba_select(q, k, block_size, top_k), block_size)
    scores = (q @ k.transpose(-1, -2) * 0.35).masked_fill(~mask, float("-inf"))
    ref_out = scores.softmax(-1) @ v
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (scores.logsumexp(-1) * g_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"d{name}")


def test_gradcheck():
    q, k, v = _qkv(13, dtype=torch.float64, batch=1, heads=2, d_qk=3, d_v=2, requires_grad=True, seed=2)
    assert torch.autograd.gradcheck(lambda q, k, v: moba_attention(q, k, v, 4, 2, 0.5, return_lse=True), (q, k, v))


def test_bf16_gradients_close_to_fp32_reference():
    q, k, v = _qkv(40, dtype=torch.bfloat16, d_qk=16, d_v=8, requires_grad=True, seed=3)
    out = moba_attention(q, k, v, 8, 2, scale=0.25)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = moba_attention_reference(qf, kf, vf, 8, 2, scale=0.25)  # selection from the same bf16 values
    ref_grads = torch.autograd.grad((ref * g).sum(), (qf, kf, vf))
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("T,block_size,top_k", [(33, 4, 3), (20, 5, 2), (26, 3, 5)])
def test_selection_matches_brute_force(T, block_size, top_k):
    q, k, _ = _qkv(T, seed=5)
    sel = moba_select(q, k, block_size, top_k)
    assert sel.shape == (2, 3, T, -(-T // block_size))
    assert torch.equal(sel, _brute_force_selection(q, k, block_size, top_k))
    own = torch.arange(T) // block_size
    assert not (sel & (torch.arange(sel.shape[-1])[None, :] >= own[:, None])).any()  # never own or future blocks
    assert torch.equal(sel.sum(-1), torch.clamp(own, max=top_k - 1).expand(2, 3, T))


def test_ties_go_to_the_lower_block():
    q = torch.ones(1, 1, 20, 4)
    k = torch.ones(1, 1, 20, 4)  # every block mean is equal: all gate scores tie
    sel = moba_select(q, k, 4, 3)
    assert sel[0, 0, 19].tolist() == [True, True, False, False, False]
    assert sel[0, 0, 5].tolist() == [True, False, False, False, False]


def test_max_logit_matches_brute_force():
    q, k, _ = _qkv(37, seed=6)
    mask = moba_token_mask(moba_select(q, k, 5, 3), 5)
    brute = (q @ k.transpose(-1, -2) * 0.7).masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(moba_max_logit(q, k, 5, 3, 0.7), brute, atol=1e-5, rtol=1e-6)
    dense = (q @ k.transpose(-1, -2) * 0.7).masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(),
                                                         float("-inf")).amax(dim=(0, 2, 3))
    assert (moba_max_logit(q, k, 5, 3, 0.7) <= dense + 1e-5).all()


def test_bad_arguments_are_named():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention(q, k, v, 0, 2, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        moba_attention(q, k, v, 4, 0, 1.0)
    with pytest.raises(ValueError, match=r"\[batch, heads, T, dim\]"):
        moba_attention(q[0], k[0], v[0], 4, 2, 1.0)


# ---- in the model -----------------------------------------------------------------------------------

MOBA = {"block_size": 4, "top_k": 2, "full_attention_layers": [0]}


def _reference_attention(q, k, v, block_size, top_k, scale):
    return moba_attention_reference(q, k, v, block_size, top_k, scale)


def test_model_forward_matches_reference_attention(monkeypatch):
    cfg = tiny_k2_config(moba_config=MOBA)
    assert [cfg.is_moba_layer(i) for i in range(cfg.num_hidden_layers)] == [False, True, True]
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        dense = random_model(tiny_k2_config())(ids)  # same weights, dense attention everywhere
        monkeypatch.setattr(attention_mod, "moba_attention", _reference_attention)
        ref = model(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # the MoBA layers do attend differently


def test_training_step_gradients_match_reference(monkeypatch):
    cfg = tiny_k2_config(moba_config=MOBA)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))

    def step_grads():
        model = random_model(cfg).train()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
        return loss.detach(), grads

    loss, grads = step_grads()
    assert torch.isfinite(loss)
    assert grads["model.layers.2.self_attn.kv_b_proj.weight"].abs().sum() > 0
    monkeypatch.setattr(attention_mod, "moba_attention", _reference_attention)
    ref_loss, ref_grads = step_grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_qk_clip_max_logit_on_moba_layer(monkeypatch):
    cfg = tiny_k2_config(moba_config=MOBA)
    model = random_model(cfg)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.q_b_proj.weight.mul_(30)  # larger logits, so the attended maximum differs from the dense one
    calls = []

    def spy(q, k, v, block_size, top_k, scale):
        calls.append(dict(q=q.detach(), k=k.detach(), scale=scale, block_size=block_size, top_k=top_k))
        return moba_attention(q, k, v, block_size, top_k, scale)

    monkeypatch.setattr(attention_mod, "moba_attention", spy)
    attn.record_max_logit = True
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2)))
    assert len(calls) == 2  # layers 1 and 2; layer 0 is dense
    seen = calls[0]
    q, k, scale = seen["q"], seen["k"], seen["scale"]
    assert (seen["block_size"], seen["top_k"], scale) == (4, 2, cfg.softmax_scale)
    mask = moba_token_mask(_brute_force_selection(q, k, 4, 2), 4)
    brute = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(attn.max_logit, brute, atol=1e-5, rtol=1e-5)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    dense = (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))
    assert (dense - brute).max() > 1e-2  # a dense max logit would fail the check above


def test_padding_mask_on_moba_layer_is_an_error():
    cfg = tiny_k2_config(moba_config=MOBA)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with pytest.raises(ValueError, match=r"layer 1 uses MoBA.*attention_mask=None.*full_attention_layers"):
        model(ids, attention_mask=torch.ones(1, 10))
    # Dense everywhere (all layers listed as full attention): the padding mask works as before.
    dense_cfg = tiny_k2_config(moba_config={**MOBA, "full_attention_layers": [0, 1, 2]})
    out = random_model(dense_cfg)(ids, attention_mask=torch.ones(1, 10))
    torch.testing.assert_close(out, random_model(tiny_k2_config())(ids), atol=1e-5, rtol=1e-5)
