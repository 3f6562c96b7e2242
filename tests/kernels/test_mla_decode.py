"""The Triton MLA decode kernel against the plain-PyTorch reference (moonlet.engine.attention).

- On CUDA (skipped without): bf16 at the Kimi K2 (64 heads) and Moonlight (16 heads) shapes.
- On CPU under the Triton interpreter (skipped without the `triton` package): small shapes covering
  the masking paths, plus the real 512 + 64 width. The interpreter is chosen when triton.jit
  decorates, i.e. at import time, so those cases run in one subprocess with TRITON_INTERPRET=1
  (this file run as a script).
- With `triton` but no GPU: both kernels compiled to sm_90 / sm_80 cubins (what the interpreter
  does not check: dot shapes, layouts, shared memory).
- Always: the log-sum-exp merge in torch, and importing/validating without Triton.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moonlet.engine.attention import paged_decode_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def make_inputs(ctx_lens, heads, kv_lora, rope, block_size, dtype, device="cpu", seed=0, extra_blocks=3,
                table_dtype=torch.long, noncontiguous_q=False):
    """Random decode inputs: each sequence gets distinct, shuffled blocks of a larger pool (a layer
    of a [layers, blocks, block_size, D] tensor, as the engine's pool); tables padded with random
    valid ids past each context."""
    g = torch.Generator().manual_seed(seed)
    S, D = len(ctx_lens), kv_lora + rope
    need = [max(1, -(-c // block_size)) for c in ctx_lens]
    width = max(need) + extra_blocks  # padded past the longest context too
    num_blocks = sum(need) + 5
    data = torch.randn(2, num_blocks, block_size, D, generator=g)
    pool = data.to(dtype)[1]
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (S, width), generator=g)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = order[used:used + n]
        used += n
    if noncontiguous_q:
        q = torch.randn(heads, S, D, generator=g).to(dtype).transpose(0, 1)  # [S, h, D], strided
    else:
        q = torch.randn(S, heads, D, generator=g).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.long)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(pool), to(tables.to(table_dtype)), to(ctx)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_fp8_inputs(ctx_lens, heads, kv_lora, rope, block_size, dtype, device="cpu", seed=0, rope_gain=8.0,
                    **kwargs):
    """``make_inputs`` with the pool stored as an FP8 latent pool (``kv_quant.quantize_entries``): its k_pe
    columns ``rope_gain`` times larger than the latents, as the two scales per entry are meant for; one block's
    entries zeroed (scale 1, all-zero bytes). q in ``dtype``. -> (q, pool fp8, scales, tables, ctx)."""
    from moonlet.engine.kv_quant import quantize_entries

    q, pool, tables, ctx = make_inputs(ctx_lens, heads, kv_lora, rope, block_size, torch.float32, seed=seed,
                                       **kwargs)
    pool = pool.clone()
    pool[..., kv_lora:] *= rope_gain
    pool[tables[-1, 0]] = 0.0  # a block of all-zero entries (as never-written slots are)
    pool8, scales = quantize_entries(pool, kv_lora)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q.to(dtype)), to(pool8), to(scales), to(tables), to(ctx)


def max_error(out, ref):
    return (out - ref).abs().max().item()


# Interpreter cases: (name, kwargs for make_inputs, kernel overrides). Tiny shapes: the interpreter
# runs every program in Python.
INTERPRET_CASES = [
    ("basic", dict(ctx_lens=[1, 19], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.float32), {}),
    ("splits3", dict(ctx_lens=[1, 19], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.float32),
     dict(num_splits=3)),
    ("empty_splits", dict(ctx_lens=[20, 1, 33], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.float32),
     dict(num_splits=6)),
    ("odd_dims", dict(ctx_lens=[7, 13, 1], heads=3, kv_lora=48, rope=8, block_size=5, dtype=torch.float32),
     dict(num_splits=2)),
    ("head_groups", dict(ctx_lens=[9, 40], heads=20, kv_lora=32, rope=16, block_size=4, dtype=torch.float32),
     dict(num_splits=2, block_h=16)),
    ("int32_tables_strided_q", dict(ctx_lens=[5, 16, 17], heads=4, kv_lora=64, rope=16, block_size=8,
                                    dtype=torch.float32, table_dtype=torch.int32, noncontiguous_q=True), {}),
    ("fp16", dict(ctx_lens=[3, 21], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.float16),
     dict(num_splits=2)),
    ("bf16", dict(ctx_lens=[1, 18, 32], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.bfloat16),
     dict(num_splits=2)),
    ("bf16_one_split", dict(ctx_lens=[11, 4], heads=2, kv_lora=64, rope=16, block_size=16, dtype=torch.bfloat16),
     {}),
    # The real latent width (512 + 64) and engine block size, at Moonlight's and Kimi K2's head counts.
    ("moonlight_shape_bf16", dict(ctx_lens=[1, 63, 65, 200], heads=16, kv_lora=512, rope=64, block_size=64,
                                  dtype=torch.bfloat16), dict(num_splits=3)),
    ("k2_heads_bf16", dict(ctx_lens=[1, 70], heads=64, kv_lora=512, rope=64, block_size=64, dtype=torch.bfloat16),
     dict(num_splits=2)),
]


# FP8 pools under the interpreter: (name, kwargs for make_fp8_inputs (dtype: the query's), kernel overrides).
FP8_INTERPRET_CASES = [
    ("fp8_fp32q", dict(ctx_lens=[1, 19, 8], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.float32),
     dict(num_splits=2)),
    ("fp8_bf16q", dict(ctx_lens=[3, 21], heads=4, kv_lora=32, rope=16, block_size=4, dtype=torch.bfloat16),
     dict(num_splits=2)),
    ("fp8_fp16q_odd", dict(ctx_lens=[7, 13, 1], heads=3, kv_lora=48, rope=8, block_size=5, dtype=torch.float16),
     {}),
    ("fp8_k2_heads_bf16q", dict(ctx_lens=[1, 70], heads=64, kv_lora=512, rope=64, block_size=64,
                                dtype=torch.bfloat16), dict(num_splits=2)),
]


def _run_interpreter_cases() -> dict:
    """Runs in the TRITON_INTERPRET=1 subprocess: each case's max error against the reference."""
    from moonlet.kernels import mla_decode

    assert mla_decode._INTERPRET, "TRITON_INTERPRET was not seen at import"
    results = {}
    for name, inputs, overrides in INTERPRET_CASES:
        q, pool, tables, ctx = make_inputs(**inputs)
        scale = 1.0 / math.sqrt(q.shape[-1])
        kv_lora = inputs["kv_lora"]
        out = mla_decode.paged_decode_attention_triton(q, pool, tables, ctx, scale, kv_lora, **overrides)
        ref = paged_decode_attention(q, pool, tables, ctx, scale, kv_lora)
        results[name] = dict(shape=list(out.shape), ref_shape=list(ref.shape), dtype=str(out.dtype),
                             err=max_error(out, ref), finite=bool(torch.isfinite(out).all()))
    for name, inputs, overrides in FP8_INTERPRET_CASES:
        q, pool, scales, tables, ctx = make_fp8_inputs(**inputs)
        scale = 1.0 / math.sqrt(q.shape[-1])
        kv_lora = inputs["kv_lora"]
        out = mla_decode.paged_decode_attention_triton(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales,
                                                       **overrides)
        ref = paged_decode_attention(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales)
        # what reading the bytes without their scales would give: the kernel must be far from it
        unscaled = paged_decode_attention(q, pool.float(), tables, ctx, scale, kv_lora)
        results[name] = dict(shape=list(out.shape), ref_shape=list(ref.shape), dtype=str(out.dtype),
                             err=max_error(out, ref), finite=bool(torch.isfinite(out).all()),
                             err_unscaled=max_error(out, unscaled))
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs the `triton` package")
@pytest.mark.parametrize("name,inputs,overrides", INTERPRET_CASES, ids=[c[0] for c in INTERPRET_CASES])
def test_interpreter_matches_reference(interpreter_results, name, inputs, overrides):
    r = interpreter_results[name]
    assert r["shape"] == r["ref_shape"] and r["dtype"] == "torch.float32"
    assert r["finite"]
    assert r["err"] <= TOLERANCE[inputs["dtype"]], f"{name}: max error {r['err']}"


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs the `triton` package")
@pytest.mark.parametrize("name,inputs,overrides", FP8_INTERPRET_CASES, ids=[c[0] for c in FP8_INTERPRET_CASES])
def test_interpreter_fp8_pool_matches_reference(interpreter_results, name, inputs, overrides):
    # the reference dequantizes the pool to float32 (kv_quant.read_entries); the kernel decodes the e4m3 bytes
    # itself and applies both scales outside its dots
    r = interpreter_results[name]
    assert r["shape"] == r["ref_shape"] and r["dtype"] == "torch.float32" and r["finite"]
    assert r["err"] <= TOLERANCE[inputs["dtype"]], f"{name}: max error {r['err']}"
    assert r["err_unscaled"] > 50 * max(r["err"], 1e-4), r


def test_fp8_tile_decoding_is_exact_for_every_byte():
    # the kernel's bit move (e4m3 -> fp16 holding value / 256), written in torch: every one of the 256 bytes
    # but the two NaNs must give torch's own float8_e4m3fn value exactly
    bits = torch.arange(256, dtype=torch.int32)
    half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(torch.int16).view(torch.float16)
    value = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = ~value.isnan()
    assert finite.sum() == 254
    assert torch.equal(half.float()[finite] * 256, value[finite])


def test_merge_split_outputs_equals_softmax_over_concatenation():
    from moonlet.kernels.mla_decode import merge_split_outputs

    g = torch.Generator().manual_seed(1)
    S, h, C = 3, 5, 7
    sizes = [4, 0, 9, 1, 6]  # one empty split
    K = sum(sizes)
    scores = torch.randn(S, h, K, generator=g, dtype=torch.float64).float() * 4
    values = torch.randn(S, h, K, C, generator=g)
    want = torch.einsum("shk,shkc->shc", scores.softmax(-1), values)

    outs, lses, at = [], [], 0
    for n in sizes:
        sc, v = scores[..., at:at + n], values[..., at:at + n, :]
        at += n
        if n == 0:
            outs.append(torch.zeros(S, h, C))
            lses.append(torch.full((S, h), float("-inf")))
        else:
            outs.append(torch.einsum("shk,shkc->shc", sc.softmax(-1), v))
            lses.append(torch.logsumexp(sc, dim=-1))
    got = merge_split_outputs(torch.stack(outs, dim=2), torch.stack(lses, dim=2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_split_outputs_large_logits_single_split():
    from moonlet.kernels.mla_decode import merge_split_outputs

    out = torch.randn(2, 3, 1, 4)
    lse = torch.full((2, 3, 1), 1e4)  # exp would overflow without the max shift
    torch.testing.assert_close(merge_split_outputs(out, lse), out[:, :, 0])


def test_import_and_validation_without_triton():
    # The engine imports this module on every machine; without Triton it must still import, report
    # unavailable, validate inputs, and say what is missing when called.
    code = """
import sys, math, torch
sys.modules['triton'] = None
from moonlet.kernels import mla_decode as m
assert not m.available()
q = torch.zeros(2, 4, 48); pool = torch.zeros(6, 4, 48); bt = torch.zeros(2, 3, dtype=torch.long)
ctx = torch.ones(2, dtype=torch.long)
try:
    m.paged_decode_attention_triton(q, pool, bt, ctx, 0.1, 32)
except RuntimeError as e:
    assert 'triton' in str(e), e
else:
    raise AssertionError('no error without triton')
try:
    m.paged_decode_attention_triton(q, torch.zeros(6, 4, 40), bt, ctx, 0.1, 32)
except ValueError as e:
    assert 'D=48' in str(e), e
else:
    raise AssertionError('mismatched D accepted')
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


def test_choose_num_splits_bounds():
    from moonlet.kernels.mla_decode import MAX_SPLITS, MIN_TOKENS_PER_SPLIT, choose_num_splits

    assert choose_num_splits(1, 1, 16, 132) == 1  # short context: no split
    assert choose_num_splits(256, 1, 4096, 132) == 1  # enough sequences to fill the GPU
    assert choose_num_splits(1, 1, 2 * MIN_TOKENS_PER_SPLIT - 1, 132) == 1
    for S, ctx in [(1, 4096), (8, 1000), (64, 4096), (1, 1 << 20), (3, 777)]:
        n = choose_num_splits(S, 1, ctx, 132)
        assert 1 <= n <= MAX_SPLITS
        assert n == 1 or ctx / n >= MIN_TOKENS_PER_SPLIT


@pytest.mark.skipif(not HAS_TRITON, reason="needs the `triton` package")
def test_cpu_tensors_without_interpreter_get_a_clear_error():
    from moonlet.kernels import mla_decode

    if mla_decode._INTERPRET:
        pytest.skip("this process runs the interpreter")
    q, pool, tables, ctx = make_inputs([3], 2, 32, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        mla_decode.paged_decode_attention_triton(q, pool, tables, ctx, 0.1, 32)


# ---- offline GPU compile (no GPU needed) ----

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes per block, opt-in maximum


def _compile_offline(kernel, args, consts, arch, num_warps, num_stages):
    """Compile ``kernel`` for an NVIDIA arch as the launcher would for these arguments (same integer
    and alignment specialization), through Triton's bundled ptxas: no GPU or driver involved."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    names = kernel.arg_names
    positional = [n for n in names if n not in consts]
    assert len(positional) == len(args), (positional, len(args))
    signature, constexprs, attrs = {n: "constexpr" for n in consts}, dict(consts), {}
    for name, value in zip(positional, args):
        ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


COMPILE_CASES = [  # (name, arch, dtype, heads, kv_lora, rope, block_size)
    ("moonlight-bf16-sm90", 90, torch.bfloat16, 16, 512, 64, 64),
    ("kimi-k2-bf16-sm90", 90, torch.bfloat16, 64, 512, 64, 64),
    ("tiny-bf16-sm80", 80, torch.bfloat16, 3, 48, 8, 5),
    ("tiny-fp32-sm80", 80, torch.float32, 3, 48, 8, 5),
]


@pytest.mark.skipif(not HAS_TRITON, reason="needs the `triton` package")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,arch,dtype,heads,kv_lora,rope,block_size", COMPILE_CASES,
                         ids=[c[0] for c in COMPILE_CASES])
def test_kernels_compile_for_gpu_offline(name, arch, dtype, heads, kv_lora, rope, block_size):
    # The interpreter checks the arithmetic but not what only the GPU compiler enforces (dot shapes,
    # layouts, shared memory); compiling to a cubin here catches those without a GPU.
    from moonlet.kernels import mla_decode

    if mla_decode._INTERPRET:
        pytest.skip("this process runs the interpreter")
    q, pool, tables, ctx = make_inputs([5, 70, 130], heads, kv_lora, rope, block_size, dtype)
    S, splits = q.shape[0], 3
    part = torch.empty(S, heads, splits, kv_lora)
    lse = torch.empty(S, heads, splits)
    _, args, consts = mla_decode._split_launch(q, pool, tables, ctx, part, lse, 0.1,
                                               mla_decode.heads_per_program(heads))
    kernel = _compile_offline(mla_decode._split_kernel, args, consts, arch, mla_decode.NUM_WARPS,
                              mla_decode.NUM_STAGES[pool.element_size()])
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[arch], kernel.metadata.shared
    _, args, consts = mla_decode._merge_launch(part, lse, torch.empty(S, heads, kv_lora))
    _compile_offline(mla_decode._merge_kernel, args, consts, arch, 4, 1)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the `triton` package")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("arch,heads,q_dtype", [(90, 64, torch.bfloat16), (90, 16, torch.bfloat16),
                                                (80, 16, torch.bfloat16), (80, 3, torch.float32)])
def test_fp8_kernel_compiles_for_gpu_offline(arch, heads, q_dtype):
    from moonlet.kernels import mla_decode

    if mla_decode._INTERPRET:
        pytest.skip("this process runs the interpreter")
    kv_lora, rope = (512, 64) if heads > 3 else (48, 8)
    q, pool, scales, tables, ctx = make_fp8_inputs([5, 70, 130], heads, kv_lora, rope, 64, q_dtype)
    S, splits = q.shape[0], 3
    part = torch.empty(S, heads, splits, kv_lora)
    lse = torch.empty(S, heads, splits)
    _, args, consts = mla_decode._split_launch(q, pool, tables, ctx, part, lse, 0.1,
                                               mla_decode.heads_per_program(heads), scales)
    assert consts["FP8"]
    kernel = _compile_offline(mla_decode._split_kernel, args, consts, arch, mla_decode.NUM_WARPS,
                              mla_decode.NUM_STAGES[pool.element_size()])
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[arch], kernel.metadata.shared


def test_fp8_pool_arguments_are_checked():
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    q, pool, scales, tables, ctx = make_fp8_inputs([3], 2, 32, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="needs pool_scales"):
        paged_decode_attention_triton(q, pool, tables, ctx, 0.1, 32)
    with pytest.raises(ValueError, match="needs pool_scales"):
        paged_decode_attention_triton(q, pool, tables, ctx, 0.1, 32, pool_scales=scales[..., :1])
    with pytest.raises(ValueError, match="go with an FP8 pool"):
        paged_decode_attention_triton(q, pool.float(), tables, ctx, 0.1, 32, pool_scales=scales)


# ---- CUDA ----

cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")

SHAPES = {"kimi-k2": (64, 512, 64), "moonlight": (16, 512, 64)}  # heads per GPU, kv_lora, rope


def _cuda_ctx_lens(batch: int, block_size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    fixed = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 7, 1000, 2049]
    lens = fixed + torch.randint(1, 3000, (max(0, batch - len(fixed)),), generator=g).tolist()
    return lens[:batch] if batch > 1 else [777]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("block_size", [64, 16])
def test_cuda_bf16_matches_reference(shape, batch, block_size):
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    heads, kv_lora, rope = SHAPES[shape]
    lens = _cuda_ctx_lens(batch, block_size, seed=batch + block_size)
    q, pool, tables, ctx = make_inputs(lens, heads, kv_lora, rope, block_size, torch.bfloat16, device="cuda")
    scale = 1.0 / math.sqrt(128 + rope)  # qk_nope_head_dim + rope, as the model's softmax scale
    out = paged_decode_attention_triton(q, pool, tables, ctx, scale, kv_lora)
    ref = paged_decode_attention(q, pool, tables, ctx, scale, kv_lora)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forced_splits_and_dtypes(num_splits, dtype):
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    lens = [1, 63, 64, 65, 500, 1500]
    q, pool, tables, ctx = make_inputs(lens, 16, 512, 64, 64, dtype, device="cuda", noncontiguous_q=True)
    out = paged_decode_attention_triton(q, pool, tables, ctx, 0.07, 512, num_splits=num_splits)
    ref = paged_decode_attention(q, pool, tables, ctx, 0.07, 512)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@cuda_only
@pytest.mark.gpu
def test_cuda_small_heads_and_tiny_dims():
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    q, pool, tables, ctx = make_inputs([1, 7, 40], 3, 48, 8, 5, torch.bfloat16, device="cuda")
    out = paged_decode_attention_triton(q, pool, tables, ctx, 0.2, 48)
    ref = paged_decode_attention(q, pool, tables, ctx, 0.2, 48)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@cuda_only
@pytest.mark.gpu
def test_cuda_graph_replay_with_new_lengths():
    # The engine captures decode in CUDA graphs: the kernel must not sync, and a replay must see
    # the context lengths and tables written into the captured buffers.
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    q, pool, tables, ctx = make_inputs([100, 200, 300, 5], 16, 512, 64, 64, torch.bfloat16, device="cuda")
    paged_decode_attention_triton(q, pool, tables, ctx, 0.07, 512)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention_triton(q, pool, tables, ctx, 0.07, 512)
    ctx.copy_(torch.tensor([1, 64, 129, 250], device="cuda"))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_decode_attention(q, pool, tables, ctx, 0.07, 512)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_fp8_pool_matches_reference(shape, batch):
    from moonlet.kernels.mla_decode import paged_decode_attention_triton

    heads, kv_lora, rope = SHAPES[shape]
    lens = _cuda_ctx_lens(batch, 64, seed=batch)
    q, pool, scales, tables, ctx = make_fp8_inputs(lens, heads, kv_lora, rope, 64, torch.bfloat16, device="cuda")
    scale = 1.0 / math.sqrt(128 + rope)
    out = paged_decode_attention_triton(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales)
    ref = paged_decode_attention(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    # CUDA-graph replay with new lengths and queries (decode graphs capture this kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention_triton(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales)
    ctx.copy_(torch.clamp(ctx - 17, min=1))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_decode_attention(q, pool, tables, ctx, scale, kv_lora, pool_scales=scales)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    print(json.dumps(_run_interpreter_cases()))
