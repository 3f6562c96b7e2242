"""The grouped-GEMM MoE path (moonlet.kernels.moe) against the per-expert loop (MoE.route_tokens)
and against a direct re-derivation of Σ_k w·SwiGLU_k(x)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moonlet.kernels.moe import StackedExperts, fuse_moe_experts, grouped_experts, stack_experts
from moonlet.model.moe import MoE
from moonlet.testing import random_model, tiny_k2_config, tiny_v2_lite_config

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {"k2": tiny_k2_config, "v2_lite": tiny_v2_lite_config,
           # H and I not multiples of 8: the stacked weights get zero padding
           "k2_unaligned": lambda: tiny_k2_config(hidden_size=20, moe_intermediate_size=12)}
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def direct_sum(x, weights, indices, gates, ups, downs, shared=None):
    """Σ_k weights[t, k] · down(silu(gate x) · up x) for each token, in float64, one token at a time."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), indices[t].tolist()):
            g, u, d = gates[e].double(), ups[e].double(), downs[e].double()
            out[t] += w * (d @ (F.silu(g @ x[t]) * (u @ x[t])))
        if shared is not None:
            g, u, d = (s.double() for s in shared)
            out[t] += d @ (F.silu(g @ x[t]) * (u @ x[t]))
    return out


def random_moe(config, seed=0, dtype=torch.float32, device="cpu"):
    """A MoE layer with weights large enough that outputs are O(1) (the hub init's 0.02 gives ~1e-4)."""
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.15)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return moe.to(device=device, dtype=dtype).eval()


def loop_forward(moe, x):
    """The reference: the per-expert loop (the path training takes)."""
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])
        out = moe.route_tokens(flat, *moe.gate(flat))
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(flat)
    return out.view(x.shape)


def fused_forward(moe, x, monkeypatch):
    moe.fuse_experts()
    monkeypatch.setattr(moe, "route_tokens", lambda *a: pytest.fail("the fused forward took the loop"))
    with torch.no_grad():
        out = moe(x)
    monkeypatch.undo()
    return out


# ---- the kernel on explicit routing ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(32, 16), (20, 12)])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_experts_matches_direct_sum(dtype, hidden, inter, shared):
    gen = torch.Generator().manual_seed(1)
    n_exp, n_tok, k = 6, 7, 2

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

    mats = [(rnd(inter, hidden), rnd(inter, hidden), rnd(hidden, inter)) for _ in range(n_exp + shared)]
    gates, ups, downs = (list(m) for m in zip(*mats))
    stacked = stack_experts(gates, ups, downs, shared_slot=shared)
    assert stacked.gate_up.shape == (n_exp + shared, 2 * ((inter + 7) // 8 * 8), (hidden + 7) // 8 * 8)
    x = rnd(n_tok, hidden)
    # expert 0 gets every token, experts 1 and 4 get none, the others a few
    indices = torch.tensor([[0, 2], [3, 0], [0, 5], [2, 0], [0, 3], [5, 0], [0, 2]])
    weights = torch.rand(n_tok, k, generator=gen) + 0.5
    out = grouped_experts(x, weights, indices, stacked)
    assert out.shape == (n_tok, hidden) and out.dtype == dtype
    ref = direct_sum(x, weights, indices, gates, ups, downs, mats[-1] if shared else None)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.double(), ref, **tol)


def test_grouped_experts_all_tokens_on_one_expert():
    gen = torch.Generator().manual_seed(2)
    mats = [tuple(torch.randn(*s, generator=gen) for s in ((8, 16), (8, 16), (16, 8))) for _ in range(4)]
    gates, ups, downs = (list(m) for m in zip(*mats))
    x = torch.randn(5, 16, generator=gen)
    indices = torch.full((5, 1), 3)
    weights = torch.rand(5, 1, generator=gen)
    out = grouped_experts(x, weights, indices, stack_experts(gates, ups, downs))
    torch.testing.assert_close(out.double(), direct_sum(x, weights, indices, gates, ups, downs), rtol=1e-5, atol=1e-5)


# ---- the MoE layer: fused vs loop ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fused_moe_matches_loop_fp32(name, tokens, monkeypatch):
    config = CONFIGS[name]()
    moe = random_moe(config)
    x = torch.randn(1, tokens, config.hidden_size)
    ref = loop_forward(moe, x)
    out = fused_forward(moe, x, monkeypatch)
    assert moe.stacked.shared_slot == (config.n_shared_experts == 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_moe_matches_loop_bf16(name, tokens, monkeypatch):
    config = CONFIGS[name]()
    moe32 = random_moe(config)
    moe = copy.deepcopy(moe32).to(torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size).to(torch.bfloat16)
    ref32 = loop_forward(moe32, x.float())
    loop = loop_forward(moe, x)
    out = fused_forward(moe, x, monkeypatch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), loop.float(), **BF16_TOL)
    # and no further from the float32 truth than the loop is (plus one bf16 step of the output)
    err, loop_err = (out.float() - ref32).abs().max(), (loop.float() - ref32).abs().max()
    assert err <= 1.5 * loop_err + ref32.abs().max() * 2 ** -8


def test_training_keeps_the_loop_and_gradients(monkeypatch):
    moe = random_moe(tiny_k2_config())
    moe.fuse_experts()
    x = torch.randn(6, 64)
    calls = []
    real = moe.route_tokens
    monkeypatch.setattr(moe, "route_tokens", lambda *a: calls.append(1) or real(*a))
    moe(x).square().sum().backward()
    assert calls == [1]
    assert any(e.gate_proj.weight.grad is not None for e in moe.experts)
    assert moe.shared_experts.down_proj.weight.grad is not None


# ---- stacking: views, memory, staleness ----------------------------------------------------------
@pytest.mark.parametrize("name", ["k2", "v2_lite"])
def test_fuse_repoints_weights_into_the_stack(name):
    moe = random_moe(CONFIGS[name]())
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    params_before = [id(p) for p in moe.parameters()]
    moe.fuse_experts()
    after = moe.state_dict()
    assert list(after) == list(before)  # hub names, same order
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert [id(p) for p in moe.parameters()] == params_before  # same Parameter objects
    stack_gate_up = moe.stacked.gate_up.untyped_storage().data_ptr()
    stack_down = moe.stacked.down.untyped_storage().data_ptr()
    fused = list(moe.experts) + ([moe.shared_experts] if moe.stacked.shared_slot else [])
    for mlp in fused:
        assert mlp.gate_proj.weight.untyped_storage().data_ptr() == stack_gate_up
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == stack_gate_up
        assert mlp.down_proj.weight.untyped_storage().data_ptr() == stack_down
    if not moe.stacked.shared_slot:  # the wider shared expert keeps its own storage
        assert moe.shared_experts.gate_proj.weight.untyped_storage().data_ptr() != stack_gate_up
    # no second copy: the stack is exactly the fused experts' weights
    n_fused = sum(p.numel() for mlp in fused for p in mlp.parameters())
    assert moe.stacked.gate_up.numel() + moe.stacked.down.numel() == n_fused
    ptr = moe.stacked.gate_up.data_ptr()
    moe.fuse_experts()  # idempotent
    assert moe.stacked.gate_up.data_ptr() == ptr


def test_fused_path_follows_in_place_weight_updates(monkeypatch):
    config = tiny_k2_config()
    moe, other = random_moe(config, seed=0), random_moe(config, seed=1)
    moe.fuse_experts()
    moe.load_state_dict(other.state_dict())  # copies into the views
    x = torch.randn(9, config.hidden_size)
    torch.testing.assert_close(fused_forward(moe, x, monkeypatch), loop_forward(other, x), rtol=1e-5, atol=1e-5)


def test_restacks_after_cast(monkeypatch):
    config = tiny_k2_config()
    moe = random_moe(config)
    moe.fuse_experts()
    moe.to(torch.bfloat16)  # replaces every weight: the old stack is stale
    x = torch.randn(9, config.hidden_size).to(torch.bfloat16)
    out = fused_forward(moe, x, monkeypatch)
    assert moe.stacked.gate_up.dtype == torch.bfloat16
    assert moe.experts[3].up_proj.weight.untyped_storage().data_ptr() == moe.stacked.gate_up.untyped_storage().data_ptr()
    torch.testing.assert_close(out.float(), loop_forward(moe, x).float(), **BF16_TOL)


# ---- whole model: checkpoints and the engine -----------------------------------------------------
@pytest.mark.parametrize("name", ["k2", "v2_lite"])
def test_fused_model_checkpoint_round_trip(name, tmp_path):
    from moonlet.weights import load_model, save_model

    model = random_model(CONFIGS[name]())
    reference = copy.deepcopy(model)
    assert fuse_moe_experts(model) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    save_model(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    loaded = load_model(tmp_path / "ckpt")
    want, got = reference.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    fuse_moe_experts(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_engine_fuses_the_moe_layers():
    from moonlet.engine.config import EngineConfig
    from moonlet.engine.core import EngineCore

    model = random_model(tiny_k2_config())
    core = EngineCore(model, None, EngineConfig(num_blocks=8, block_size=16, max_num_seqs=2))
    moes = [m for m in core.model.modules() if isinstance(m, MoE)]
    assert moes and all(m.stacked is not None for m in moes)


# ---- no host syncs on the hot path ---------------------------------------------------------------
def _fake_hot_path(moe, x, mode):
    """Router + grouped experts on fake tensors: any op that needs a value on the host raises."""
    gate = {n: mode.from_tensor(t) for n, t in list(moe.gate.named_parameters()) + list(moe.gate.named_buffers())}
    s = moe.stacked
    stacked = StackedExperts(mode.from_tensor(s.gate_up), mode.from_tensor(s.down), s.hidden_size,
                             s.intermediate_size, s.shared_slot)
    fx = mode.from_tensor(x)
    weights, indices = torch.func.functional_call(moe.gate, gate, (fx,))
    return fx, weights, indices, stacked


@pytest.mark.parametrize("name", ["k2", "v2_lite"])
def test_hot_path_needs_no_host_values(name):
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    config = CONFIGS[name]()
    moe = random_moe(config, dtype=torch.bfloat16)  # grouped_mm's shape rules are written for bf16
    moe.fuse_experts()
    x = torch.randn(5, config.hidden_size).to(torch.bfloat16)
    with FakeTensorMode() as mode, torch.no_grad():
        fx, weights, indices, stacked = _fake_hot_path(moe, x, mode)
        out = grouped_experts(fx, weights, indices, stacked)
        assert out.shape == (5, config.hidden_size)
        # the check bites: the reference loop reads expert counts on the host
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            moe.route_tokens(fx, weights, indices)


# ---- CUDA ----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("name", ["k2", "v2_lite"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_cuda_bf16_matches_cpu_fp32(name, tokens):
    config = CONFIGS[name]()
    moe32 = random_moe(config)
    moe = copy.deepcopy(moe32).to(device="cuda", dtype=torch.bfloat16)
    moe.fuse_experts()
    x = torch.randn(tokens, config.hidden_size).to(torch.bfloat16)
    # the same routing on both sides (bf16 and fp32 router inputs could pick different near-tied experts)
    with torch.no_grad():
        weights, indices = moe32.gate(x.float())
        out = grouped_experts(x.cuda(), weights.cuda(), indices.cuda(), moe.stacked)
        ref = moe32.route_tokens(x.float(), weights, indices)
        if moe.shared_experts is not None and not moe.stacked.shared_slot:
            out = out + moe.shared_experts(x.cuda())
        if moe32.shared_experts is not None:
            ref = ref + moe32.shared_experts(x.float())
    torch.testing.assert_close(out.float().cpu(), ref, **BF16_TOL)


@needs_cuda
def test_cuda_fused_forward_makes_no_host_sync():
    config = tiny_k2_config()
    moe = random_moe(config, dtype=torch.bfloat16, device="cuda")
    moe.fuse_experts()
    x = torch.randn(33, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x)  # warm-up outside the check (first calls may initialize libraries)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("name", ["k2", "v2_lite"])
def test_cuda_graph_capture_and_replay(name):
    config = CONFIGS[name]()
    moe = random_moe(config, dtype=torch.bfloat16, device="cuda")
    moe.fuse_experts()
    static_x = torch.randn(16, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                moe(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe(static_x)
        for seed in range(3):
            new_x = torch.randn(16, config.hidden_size, generator=torch.Generator().manual_seed(seed))
            static_x.copy_(new_x.to(device="cuda", dtype=torch.bfloat16))
            graph.replay()
            torch.testing.assert_close(static_out.float(), loop_forward(moe, static_x).float(), **BF16_TOL)
