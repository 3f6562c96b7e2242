"""MuonClip: Newton–Schulz, update RMS, agreement with torch.optim.Muon / AdamW, QK-Clip, state round trip."""

import copy
import io

import pytest
import torch

from moonlet.testing import random_model, tiny_k2_config, tiny_v2_lite_config
from moonlet.train.muonclip import MuonClip, newton_schulz, param_groups, qk_clip, set_max_logit_recording


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 48)])
def test_newton_schulz_is_near_orthogonal(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g).float()
    assert o.dtype == torch.float32 and o.shape == g.shape
    s = torch.linalg.svdvals(o)
    # the quintic iteration pushes every singular value into roughly [0.5, 1.5] (not exactly 1)
    assert s.min() > 0.5 and s.max() < 1.5, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    uv = u @ vh
    cos = (o * uv).sum() / (o.norm() * uv.norm())
    assert cos > 0.95


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128)])
def test_update_rms_matches_adamw_scale(shape):
    # Muon's update 0.2*sqrt(max(A,B))*O has RMS ~0.2 (AdamW's typical update RMS), times lr
    w = torch.nn.Parameter(torch.randn(*shape))
    before = w.detach().clone()
    w.grad = torch.randn(*shape)
    lr = 1e-2
    MuonClip([dict(params=[w], use_muon=True)], lr=lr, weight_decay=0.0).step()
    rms = (w.detach() - before).pow(2).mean().sqrt() / lr
    assert 0.17 < rms < 0.23, rms


def test_muon_matches_torch_muon_with_adamw_rms_matching():
    # torch.optim.Muon keeps an EMA momentum ((1-mu)-scaled); Newton–Schulz normalizes the scale away,
    # so with adjust_lr_fn="match_rms_adamw" both follow the same trajectory up to bf16 rounding.
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(48, 80, generator=gen)
    grads = [torch.randn(48, 80, generator=gen) for _ in range(4)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = MuonClip([dict(params=[a], use_muon=True)], lr=2e-2, weight_decay=0.1)
    ref = torch.optim.Muon([b], lr=2e-2, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert (a.detach() - w0).norm() > 0.1
    torch.testing.assert_close(a.detach(), b.detach(), atol=2e-3, rtol=0)


def test_adamw_group_matches_torch_adamw():
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(37, generator=gen)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = MuonClip([dict(params=[a], use_muon=False)], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        g = torch.randn(37, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)


def test_param_groups_split():
    model = random_model(tiny_k2_config())
    groups = {g["name"]: g["params"] for g in param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    adam = {names[id(p)] for p in groups["adamw"]}
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in muon  # each expert its own matrix
    assert "model.layers.0.self_attn.kv_b_proj.weight" in muon
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adam
    assert all(p.dim() == 2 for p in groups["muon"])
    assert all("norm" in n or "embed" in n or "lm_head" in n for n in adam)


def _max_logits(model, ids):
    mods = set_max_logit_recording(model, True)
    with torch.no_grad():
        model(ids)
    out = torch.stack([m.max_logit for m in mods])
    return mods, out


@pytest.mark.parametrize("make_config", [tiny_k2_config, tiny_v2_lite_config])
def test_qk_clip_brings_offending_heads_to_tau_and_leaves_others(make_config):
    cfg = make_config()
    model = random_model(cfg, seed=3).train()
    attn = model.model.layers[1].self_attn
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = attn.q_b_proj.weight if cfg.q_lora_rank else attn.q_proj.weight
    with torch.no_grad():  # blow up head 2 of layer 1: its logits grow by 40*40
        q[2 * (nope + rope):3 * (nope + rope)] *= 40
        attn.kv_b_proj.weight[2 * (nope + v):2 * (nope + v) + nope] *= 40
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    mods, before = _max_logits(model, ids)
    tau = float(before[1, 2]) / 3
    assert before[1, 2] > tau and (before.flatten() > tau).sum() >= 1
    offending = before > tau
    snapshot = copy.deepcopy(model.state_dict())
    # lr = 0: the step changes nothing itself, so every change comes from QK-Clip
    opt = MuonClip(param_groups(model), lr=0.0, attention_modules=mods, qk_clip_tau=tau)
    model(ids).sum().backward()
    opt.step()
    _, after = _max_logits(model, ids)
    assert (after <= tau * (1 + 1e-4)).all(), after
    # layers 0-1 see the same inputs as before (later layers see layer 1's changed output):
    # there the offending heads sit exactly at tau and the others did not move
    first, off = after[:2], offending[:2]
    torch.testing.assert_close(first[off], torch.full_like(first[off], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[~off], before[:2][~off])
    state = model.state_dict()
    for name, t in state.items():
        changed = not torch.equal(t, snapshot[name])
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        touched_layers = set(offending.any(dim=1).nonzero().flatten().tolist())
        if name.endswith(("q_b_proj.weight", "q_proj.weight", "kv_b_proj.weight")) and layer in touched_layers:
            continue
        assert not changed, f"{name} changed though no offending head lives there"
    # inside the clipped layer: only the offending heads' q rows / k_nope rows; value rows and k_pe untouched
    for layer in offending.any(dim=1).nonzero().flatten().tolist():
        pre = f"model.layers.{layer}.self_attn."
        qname = pre + ("q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight")
        qd = (state[qname] != snapshot[qname]).view(cfg.num_attention_heads, nope + rope, -1).any(-1)
        kd = (state[pre + "kv_b_proj.weight"] != snapshot[pre + "kv_b_proj.weight"]).view(
            cfg.num_attention_heads, nope + v, -1).any(-1)
        for h in range(cfg.num_attention_heads):
            if offending[layer, h]:
                assert qd[h].all() and kd[h, :nope].all()
            else:
                assert not qd[h].any() and not kd[h].any()
        assert not kd[:, nope:].any(), "value rows must not be clipped"


def test_qk_clip_without_recording_is_a_no_op():
    model = random_model(tiny_k2_config())
    mods = set_max_logit_recording(model, True)
    assert qk_clip(mods, 1.0) == []


def test_state_round_trips_through_save_and_load():
    cfg = tiny_k2_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))

    def make():
        m = random_model(cfg, seed=6).train()
        mods = set_max_logit_recording(m, True)
        return m, MuonClip(param_groups(m), lr=1e-2, attention_modules=mods, qk_clip_tau=5.0)

    def step(m, opt):
        m(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()

    m1, o1 = make()
    for _ in range(2):
        step(m1, o1)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m2, o2 = make()
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    assert o2.state_dict()["state"].keys() == o1.state_dict()["state"].keys()
    step(m1, o1)
    step(m2, o2)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("max_norm", [0.5, 1e9, float("inf")])
def test_clip_grad_norm_matches_torch(max_norm):
    gen = torch.Generator().manual_seed(7)
    shapes = [(12, 20), (20,), (7, 3), (5,)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    ours[3].grad = ref[3].grad = None  # a parameter without a gradient counts as 0
    opt = MuonClip([dict(params=ours[:1] + ours[2:3], use_muon=True), dict(params=[ours[1], ours[3]], use_muon=False)])
    norm = opt.clip_grad_norm_(max_norm)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(norm, want)
    assert norm > 0.5  # so that 0.5 clips
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad)
