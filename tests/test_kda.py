"""Kimi Delta Attention: the chunked (WY) form and the layer against token-by-token references."""

import math

import pytest
import torch
import torch.nn.functional as F

from moonlet.config import ModelConfig
from moonlet.model.kda import KimiDeltaAttention, kda_attention, kda_chunked, kda_recurrent


def _inputs(B=2, T=37, H=3, K=16, V=8, decay=0.5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen) * decay  # log decay ≤ 0
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, K, V, generator=gen)
    return [t.to(dtype) for t in (q, k, v, g, beta, s0)]


def _spec_recurrence(q, k, v, g, beta, scale, s0):
    """The update as the paper writes it, in float64: S_t = (I − β k kᵀ) Diag(α) S_{t−1} + β k vᵀ."""
    q, k, v, g, beta, S = (t.double() for t in (q, k, v, g, beta, s0))
    B, T, H, K = q.shape
    eye = torch.eye(K, dtype=torch.float64)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = S[b, h].clone()
            for t in range(T):
                kt = k[b, t, h][:, None]
                s = (eye - beta[b, t, h] * kt @ kt.T) @ torch.diag(g[b, t, h].exp()) @ s + beta[b, t, h] * kt @ v[b, t, h][None]
                out[b, t, h] = s.T @ (scale * q[b, t, h])
            S[b, h] = s
    return out, S


def test_recurrent_matches_the_spec_update():
    q, k, v, g, beta, s0 = _inputs(B=1, T=9, H=2, K=4, V=3)
    o, S = kda_recurrent(q, k, v, g, beta, 0.5, s0)
    ref_o, ref_S = _spec_recurrence(q, k, v, g, beta, 0.5, s0)
    assert torch.allclose(o.double(), ref_o, atol=1e-5) and torch.allclose(S.double(), ref_S, atol=1e-5)


@pytest.mark.parametrize("T", [1, 5, 64, 100, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(T, with_state):
    q, k, v, g, beta, s0 = _inputs(T=T)
    s0 = s0 if with_state else None
    o_r, S_r = kda_recurrent(q, k, v, g, beta, None, s0)
    o_c, S_c = kda_chunked(q, k, v, g, beta, None, s0)
    assert o_c.shape == o_r.shape and S_c.dtype == torch.float32
    assert torch.allclose(o_c, o_r, atol=2e-5), (o_c - o_r).abs().max()
    assert torch.allclose(S_c, S_r, atol=2e-5), (S_c - S_r).abs().max()


def test_chunked_stays_exact_under_strong_decay():
    # Per-step log decays down to -40: e^{-γ} over one chunk would overflow float32 many times over.
    q, k, v, g, beta, s0 = _inputs(T=150, decay=40.0, seed=3)
    o_r, S_r = kda_recurrent(q, k, v, g, beta, None, s0)
    o_c, S_c = kda_chunked(q, k, v, g, beta, None, s0)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    assert torch.allclose(o_c, o_r, atol=2e-5) and torch.allclose(S_c, S_r, atol=2e-5)


def test_chunked_gradients_match_recurrent():
    base = _inputs(B=1, T=70, H=2, K=8, V=4, seed=1)
    grads = []
    for fn in (kda_recurrent, kda_chunked):
        leaves = [t.clone().requires_grad_(True) for t in base]
        q, k, v, g, beta, s0 = leaves
        o, S = fn(q, k, v, g, beta, None, s0)
        w_o = torch.linspace(-1, 1, o.numel()).view(o.shape)
        ((o * w_o).sum() + S.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), *grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, (a - b).abs().max())


def test_matches_flash_linear_attention_reference():
    naive = pytest.importorskip("fla.ops.kda.naive", reason="fla-core not installed")
    q, k, v, g, beta, s0 = _inputs(T=100, seed=2)
    ref_o, ref_S = naive.naive_recurrent_kda(q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True)
    o, S = kda_chunked(q, k, v, g, beta, 0.3, s0)
    assert torch.allclose(o, ref_o, atol=2e-5) and torch.allclose(S, ref_S, atol=2e-5)


def test_dispatch_and_bad_shapes():
    q, k, v, g, beta, _ = _inputs(T=3)
    o, _ = kda_attention(q, k, v, g, beta)  # CPU: short input goes to the recurrence
    assert torch.allclose(o, kda_recurrent(q, k, v, g, beta)[0])
    with pytest.raises(ValueError, match="beta"):
        kda_chunked(q, k, v, g, beta[..., :1])
    with pytest.raises(ValueError, match="backend"):
        kda_attention(q, k, v, g, beta, backend="nope")


# ---- the layer --------------------------------------------------------------------------------------

def _layer_config(**lin):
    return ModelConfig.from_dict(dict(
        model_type="kimi_linear", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, rms_norm_eps=1e-5,
        linear_attn_config=dict(dict(kda_layers=[1], full_attn_layers=[2], num_heads=2, head_dim=8,
                                     short_conv_kernel_size=4), **lin)))


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = KimiDeltaAttention(_layer_config(), 0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer


def _reference_layer(layer, x):
    """The published forward re-derived from its parts: nn.Conv1d-style padded causal convolutions,
    the gate and the recurrence in float64, gated RMSNorm."""
    B, T, _ = x.shape
    H, d = layer.num_heads, layer.head_dim

    def conv(proj, conv_mod):
        y = F.conv1d(proj(x).transpose(1, 2), conv_mod.weight, padding=conv_mod.kernel_size - 1, groups=H * d)
        return F.silu(y[..., :T]).transpose(1, 2).reshape(B, T, H, d)

    q = conv(layer.q_proj, layer.q_conv1d).double()
    k = conv(layer.k_proj, layer.k_conv1d).double()
    v = conv(layer.v_proj, layer.v_conv1d).double()
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    f = layer.f_b_proj(layer.f_a_proj(x)).view(B, T, H, d).double() + layer.dt_bias.view(H, d).double()
    g = -layer.A_log.view(H, 1).double().exp() * torch.log1p(f.exp())
    beta = torch.sigmoid(layer.b_proj(x).double())
    o, _ = _spec_recurrence(q, k, v, g, beta, d**-0.5, torch.zeros(B, H, d, d))
    gate = layer.g_b_proj(layer.g_a_proj(x)).view(B, T, H, d).double()
    o = o / (o.square().mean(-1, keepdim=True) + 1e-5).sqrt() * layer.o_norm.weight.double() * torch.sigmoid(gate)
    return layer.o_proj(o.reshape(B, T, H * d).float())


def test_layer_matches_reference_forward():
    layer = _layer()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        out = layer(x)
        ref = _reference_layer(layer, x)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_layer_parameter_names_are_the_checkpoint_names():
    names = dict((n, tuple(p.shape)) for n, p in _layer().named_parameters())
    assert names == {
        "q_proj.weight": (16, 32), "k_proj.weight": (16, 32), "v_proj.weight": (16, 32),
        "q_conv1d.weight": (16, 1, 4), "k_conv1d.weight": (16, 1, 4), "v_conv1d.weight": (16, 1, 4),
        "A_log": (1, 1, 2, 1), "f_a_proj.weight": (8, 32), "f_b_proj.weight": (16, 8), "dt_bias": (16,),
        "b_proj.weight": (2, 32), "g_a_proj.weight": (8, 32), "g_b_proj.weight": (16, 8),
        "o_norm.weight": (8,), "o_proj.weight": (32, 16),
    }


@pytest.mark.parametrize("splits", [(70,), (3, 1, 1, 80), (64, 64, 9)])
def test_layer_in_pieces_equals_whole(splits):
    layer = _layer(seed=1)
    T = sum(splits)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        whole, whole_state = layer(x, return_state=True)
        parts, state, start = [], None, 0
        for n in splits:
            out, state = layer(x[:, start:start + n], state=state, return_state=True)
            parts.append(out)
            start += n
    # the pieces may take the recurrence where the whole takes chunks: float32 rounding differs
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-4)
    for a, b in zip(state, whole_state):
        assert torch.allclose(a, b, atol=1e-4)


def test_layer_left_padding_leaves_real_tokens_alone():
    layer = _layer(seed=2)
    x = torch.randn(1, 20, 32)
    padded = torch.cat([torch.randn(1, 5, 32), x], dim=1)
    mask = torch.tensor([[0] * 5 + [1] * 20])
    with torch.no_grad():
        a, sa = layer(x, return_state=True)
        b, sb = layer(padded, pad_mask=mask, return_state=True)
    assert torch.allclose(b[:, 5:], a, atol=1e-5)
    assert torch.allclose(sb.recurrent, sa.recurrent, atol=1e-5)


def test_layer_rejects_unimplemented_linear_attn_keys():
    with pytest.raises(ValueError, match="gate_lower_bound"):
        _layer_config(gate_lower_bound=-5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_kernels_match_chunked_on_cuda():
    pytest.importorskip("fla.ops.kda", reason="fla-core not installed")
    q, k, v, g, beta, s0 = (t.cuda() for t in _inputs(T=200, H=4, K=64, V=64))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            o, S = kda_attention(q, k, v, g, beta, None, s0, backend="fla")
            o_ref, S_ref = kda_chunked(q, k, v, g, beta, None, s0)
        assert torch.allclose(o.float(), o_ref, atol=1e-3) and torch.allclose(S, S_ref, atol=1e-3)
    layer = _layer().cuda()
    x = torch.randn(2, 100, 32, device="cuda")
    with torch.no_grad():
        fast = layer(x)
        layer.backend = "chunked"
        slow = layer(x)
    assert torch.allclose(fast, slow, atol=1e-3)
    assert math.isfinite(fast.abs().max().item())
