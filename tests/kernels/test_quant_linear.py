"""The W8A16 / W4A16 Triton kernel (moonlet.kernels.quant_linear, dense and grouped modes) against the
plain-PyTorch references: dequantize with moonlet.quant, then F.linear (dense), and the per-expert
dequantize + SwiGLU loop (grouped, moonlet.kernels.quant_moe).

- On CPU under the Triton interpreter (one subprocess with TRITON_INTERPRET=1, this file run as a
  script; skipped without the `triton` package): tiny shapes covering partial FP8 blocks, K not a
  multiple of the K tile, M around the tile sizes, fp32/bf16/fp16, experts with no tokens, one token,
  the shared slot.
- With `triton` but no GPU: the kernel compiled to sm_90 cubins (dot shapes, layouts, shared memory).
- Always: the slot layout (align_slots) and the grouped reference against a per-token sum.
- On CUDA (skipped without): K2-sized shapes against the reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moonlet.kernels.quant_linear import QuantizedMatrix, quant_linear_reference
from moonlet.kernels.quant_moe import align_slots, quant_grouped_experts_reference, stack_quantized_experts
from moonlet.quant import pack_int4, quantize_fp8_block

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def make_matrix(kind: str, n: int, k: int, seed: int, block=(128, 128), group: int = 32,
                scale_dtype=torch.bfloat16, device="cpu") -> QuantizedMatrix:
    """A random weight [n, k] quantized with moonlet.quant's writers (the checkpoint formats)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.2
    if kind == "fp8":
        q, s = quantize_fp8_block(w, block)
        return QuantizedMatrix("fp8", q.to(device), s.to(device), (n, k), tuple(block))
    parts = pack_int4(w, group, scale_dtype)
    return QuantizedMatrix("int4", parts["weight_packed"].to(device), parts["weight_scale"].to(device), (n, k),
                           (1, group))


def make_experts(kind, groups, hidden, inter, seed=0, shared_slot=False, device="cpu", **kw):
    gates = [make_matrix(kind, inter, hidden, seed + 3 * g, device=device, **kw) for g in range(groups)]
    ups = [make_matrix(kind, inter, hidden, seed + 3 * g + 1, device=device, **kw) for g in range(groups)]
    downs = [make_matrix(kind, hidden, inter, seed + 3 * g + 2, device=device, **kw) for g in range(groups)]
    return stack_quantized_experts(gates, ups, downs, shared_slot=shared_slot)


def routing(tokens, routed, top_k, seed, skip=()):
    """Random distinct experts per token (never those in ``skip``) and float32 weights."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(routed) if e not in skip])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    return torch.rand(tokens, top_k, generator=g) + 0.5, idx.reshape(tokens, top_k)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |ref|

# Dense cases: (name, kind, M (or a shape), N, K, dtype, extra make_matrix kwargs, kernel overrides)
DENSE_CASES = [
    ("fp8_one_row", "fp8", 1, 48, 64, torch.float32, dict(block=(16, 16)), {}),
    ("fp8_partial_blocks", "fp8", 5, 40, 100, torch.float32, {}, {}),  # one partial 128-block each way
    ("fp8_block_rows_16_cols_32", "fp8", 17, 70, 96, torch.float32, dict(block=(16, 32)), {}),
    ("fp8_bf16", "fp8", 33, 64, 192, torch.bfloat16, dict(block=(16, 16)), {}),
    ("fp8_fp16_3d", "fp8", (2, 3), 24, 64, torch.float16, dict(block=(16, 16)), {}),
    ("int4_one_row", "int4", 1, 48, 64, torch.float32, {}, {}),
    ("int4_k96", "int4", 7, 40, 96, torch.float32, {}, {}),  # K not a multiple of the 64-wide K tile
    ("int4_bf16_block_m_32", "int4", 40, 80, 128, torch.bfloat16, {}, dict(block_m=32)),
    ("int4_fp32_scales_group_64", "int4", 9, 16, 128, torch.float32, dict(group=64, scale_dtype=torch.float32), {}),
    ("int4_fp16", "int4", 65, 32, 64, torch.float16, {}, {}),
]

# Grouped cases: (name, kind, tokens, groups routed, top_k, hidden, inter, dtype, shared, skip experts, kwargs)
GROUPED_CASES = [
    ("int4_basic", "int4", 6, 5, 2, 64, 32, torch.float32, False, (), {}),
    ("int4_shared_unused_experts", "int4", 9, 6, 3, 64, 64, torch.float32, True, (1, 4), {}),
    ("int4_one_token_bf16", "int4", 1, 8, 3, 64, 32, torch.bfloat16, True, (), {}),
    ("fp8_block16", "fp8", 7, 4, 2, 48, 40, torch.float32, True, (2,), dict(block=(16, 16))),
    ("fp8_partial_128_bf16", "fp8", 20, 6, 2, 80, 24, torch.bfloat16, False, (), {}),
]


def _run_interpreter_cases() -> dict:
    """Runs in the TRITON_INTERPRET=1 subprocess: each case's max error and the reference's scale."""
    from moonlet.kernels import quant_linear, quant_moe

    assert quant_linear._INTERPRET, "TRITON_INTERPRET was not seen at import"
    results = {}
    for i, (name, kind, m, n, k, dtype, mk, overrides) in enumerate(DENSE_CASES):
        w = make_matrix(kind, n, k, seed=i, **mk)
        shape = m if isinstance(m, tuple) else (m,)
        x = torch.randn(*shape, k, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        out = quant_linear.quant_linear_triton(x, w, **overrides)
        ref = quant_linear_reference(x, w)
        results[name] = dict(shape=list(out.shape), ref_shape=list(ref.shape), dtype=str(out.dtype),
                             err=(out.float() - ref.float()).abs().max().item(), scale=ref.float().abs().max().item())
    for i, (name, kind, tokens, routed, top_k, hidden, inter, dtype, shared, skip, mk) in enumerate(GROUPED_CASES):
        experts = make_experts(kind, routed + shared, hidden, inter, seed=10 * i, shared_slot=shared, **mk)
        weights, indices = routing(tokens, routed, top_k, seed=i, skip=skip)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(200 + i)).to(dtype)
        out = quant_moe.quant_grouped_experts_triton(x, weights, indices, experts)
        ref = quant_moe.quant_grouped_experts_reference(x, weights, indices, experts)
        results["grouped_" + name] = dict(shape=list(out.shape), ref_shape=list(ref.shape), dtype=str(out.dtype),
                                          err=(out.float() - ref.float()).abs().max().item(),
                                          scale=ref.float().abs().max().item())
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs the `triton` package")
@pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_interpreter_dense_matches_reference(interpreter_results, case):
    name, dtype = case[0], case[5]
    r = interpreter_results[name]
    assert r["shape"] == r["ref_shape"] and r["dtype"] == str(dtype)
    assert r["scale"] > 0.1  # outputs of size, not a degenerate all-zero case
    assert r["err"] <= TOLERANCE[dtype] * r["scale"], f"{name}: max error {r['err']} (scale {r['scale']})"


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs the `triton` package")
@pytest.mark.parametrize("case", GROUPED_CASES, ids=[c[0] for c in GROUPED_CASES])
def test_interpreter_grouped_matches_reference(interpreter_results, case):
    name, dtype = case[0], case[7]
    r = interpreter_results["grouped_" + name]
    assert r["shape"] == r["ref_shape"] and r["dtype"] == str(dtype)
    assert r["scale"] > 0.01
    assert r["err"] <= TOLERANCE[dtype] * r["scale"], f"{name}: max error {r['err']} (scale {r['scale']})"


# ---- always: the slot layout and the grouped reference ----

@pytest.mark.parametrize("tokens,groups,top_k,block_m", [(1, 8, 3, 16), (37, 5, 2, 16), (64, 4, 4, 32), (3, 64, 2, 64)])
def test_align_slots_lists_every_slot_once_in_its_experts_tiles(tokens, groups, top_k, block_m):
    _, indices = routing(tokens, groups, top_k, seed=tokens, skip=(1,) if groups > 4 else ())
    rows, block_groups = align_slots(indices, groups, block_m)
    slots = tokens * top_k
    assert rows.dtype == torch.int32 and block_groups.dtype == torch.int32
    assert rows.numel() == block_groups.numel() * block_m
    real = rows[rows < slots]
    assert sorted(real.tolist()) == list(range(slots))  # each slot exactly once
    flat = indices.reshape(-1)
    for tile, group in enumerate(block_groups.tolist()):
        tile_rows = rows[tile * block_m:(tile + 1) * block_m]
        tile_rows = tile_rows[tile_rows < slots]
        if group < 0:
            assert tile_rows.numel() == 0
        else:
            assert (flat[tile_rows.long()] == group).all()  # a tile belongs to one expert
    used = [g for g in block_groups.tolist() if g >= 0]
    assert used == sorted(used) and set(used) == set(flat.tolist())


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_grouped_reference_equals_a_per_token_sum(kind):
    hidden, inter, routed = 64, 32, 6
    experts = make_experts(kind, routed + 1, hidden, inter, seed=5, shared_slot=True, block=(16, 16)) \
        if kind == "fp8" else make_experts(kind, routed + 1, hidden, inter, seed=5, shared_slot=True)
    weights, indices = routing(5, routed, 2, seed=3, skip=(0,))
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(4))
    got = quant_grouped_experts_reference(x, weights, indices, experts)
    dense = [(experts.gate.dequantize(torch.float64, g), experts.up.dequantize(torch.float64, g),
              experts.down.dequantize(torch.float64, g)) for g in range(routed + 1)]
    want = torch.zeros(5, hidden, dtype=torch.float64)
    for t in range(5):
        xt = x[t].double()
        for w, e in list(zip(weights[t].tolist(), indices[t].tolist())) + [(1.0, routed)]:
            gate, up, down = dense[e]
            want[t] += w * (down @ (F.silu(gate @ xt) * (up @ xt)))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_stacking_refuses_mixed_formats():
    a = make_matrix("int4", 32, 64, 0)
    b = make_matrix("int4", 32, 64, 1, group=64)
    with pytest.raises(ValueError, match="different formats"):
        stack_quantized_experts([a, b], [a, a], [make_matrix("int4", 64, 32, 2)] * 2)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the `triton` package")
def test_cpu_tensors_without_interpreter_get_a_clear_error():
    from moonlet.kernels import quant_linear

    if quant_linear._INTERPRET:
        pytest.skip("this process runs the interpreter")
    with pytest.raises(ValueError, match="CUDA"):
        quant_linear.quant_linear_triton(torch.randn(2, 64), make_matrix("int4", 16, 64, 0))


def test_import_without_triton_uses_the_reference():
    code = """
import sys, torch
sys.modules['triton'] = None
from moonlet.kernels import quant_linear as q
from moonlet.model.quantized import Int4GroupLinear
assert not q.available('int4') and not q.available('fp8')
m = Int4GroupLinear(64, 16)
m.weight_packed.zero_(); m.weight_scale.fill_(1.0)
assert torch.equal(m(torch.ones(1, 64)), torch.full((1, 16), -8.0 * 64))  # nibble 0 is -8
try:
    q.quant_linear_triton(torch.ones(1, 64), m.matrix())
except RuntimeError as e:
    assert 'triton' in str(e), e
else:
    raise AssertionError('no error without triton')
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


# ---- offline GPU compile (no GPU needed) ----

COMPILE_CASES = [  # (name, kind, dtype, N, K, grouped, swiglu, block_m): K2's expert and attention shapes
    ("int4-expert-gate-up-bf16", "int4", torch.bfloat16, 2048, 7168, True, True, 16),
    ("int4-expert-down-bf16", "int4", torch.bfloat16, 7168, 2048, True, False, 64),
    ("fp8-dense-bf16", "fp8", torch.bfloat16, 7168, 2048, False, False, 16),
    ("fp8-expert-gate-up-bf16", "fp8", torch.bfloat16, 2048, 7168, True, True, 64),
]


@pytest.mark.skipif(not HAS_TRITON, reason="needs the `triton` package")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,kind,dtype,n,k,grouped,swiglu,block_m", COMPILE_CASES,
                         ids=[c[0] for c in COMPILE_CASES])
def test_kernel_compiles_for_sm90_offline(name, kind, dtype, n, k, grouped, swiglu, block_m):
    from test_mla_decode import SHARED_MEMORY_LIMIT, _compile_offline

    from moonlet.kernels import quant_linear

    if quant_linear._INTERPRET:
        pytest.skip("this process runs the interpreter")
    # meta-free small stand-ins with the real strides' divisibility: the compiler sees shapes only as ints
    w = make_matrix(kind, n, k, 0)
    x = torch.empty(32, k, dtype=dtype)
    if grouped:
        rows, block_groups = align_slots(torch.zeros(4, 2, dtype=torch.long), 1, block_m)
        stacked = QuantizedMatrix(kind, w.data[None], w.scale[None], w.shape, w.block)
        out = torch.empty(8, n, dtype=dtype)
        _, args, consts = quant_linear.grouped_launch(x, rows, block_groups, stacked, stacked if swiglu else None,
                                                      out, 8, 2, block_m)
    else:
        out = torch.empty(32, n, dtype=dtype)
        _, args, consts = quant_linear._dense_launch(x, w, out, block_m)
    kernel = _compile_offline(quant_linear._quant_gemm_kernel, args, consts, 90, quant_linear.NUM_WARPS,
                              quant_linear.NUM_STAGES)
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[90], kernel.metadata.shared


# ---- CUDA ----

cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_dense_k2_shapes(kind, m):
    from moonlet.kernels import quant_linear

    if not quant_linear.available(kind):
        pytest.skip(f"this GPU does not run the {kind} kernel")
    w = make_matrix(kind, 2048, 7168, 0, device="cuda")
    x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
    out = quant_linear.quant_linear_triton(x, w)
    ref = quant_linear_reference(x.float(), w).to(torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("tokens", [1, 64, 1024])
def test_cuda_grouped_experts(kind, tokens):
    from moonlet.kernels import quant_linear, quant_moe

    if not quant_linear.available(kind):
        pytest.skip(f"this GPU does not run the {kind} kernel")
    experts = make_experts(kind, 17, 1024, 256, seed=1, shared_slot=True, device="cuda")
    weights, indices = routing(tokens, 16, 4, seed=tokens)
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    weights, indices = weights.cuda(), indices.cuda()
    out = quant_moe.quant_grouped_experts_triton(x, weights, indices, experts)
    ref = quant_moe.quant_grouped_experts_reference(x.float(), weights, indices, experts)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@cuda_only
@pytest.mark.gpu
def test_cuda_graph_capture_of_grouped_experts():
    from moonlet.kernels import quant_linear, quant_moe

    if not quant_linear.available("int4"):
        pytest.skip("this GPU does not run the int4 kernel")
    experts = make_experts("int4", 8, 256, 128, seed=2, device="cuda")
    weights, indices = routing(32, 8, 2, seed=0)
    weights, indices = weights.cuda(), indices.cuda()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    quant_moe.quant_grouped_experts_triton(x, weights, indices, experts)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_moe.quant_grouped_experts_triton(x, weights, indices, experts)
    new_w, new_i = routing(32, 8, 2, seed=9)
    weights.copy_(new_w)
    indices.copy_(new_i)
    graph.replay()
    torch.cuda.synchronize()
    ref = quant_moe.quant_grouped_experts_reference(x.float(), weights, indices, experts)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    print(json.dumps(_run_interpreter_cases()))
