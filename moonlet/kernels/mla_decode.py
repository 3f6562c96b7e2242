"""Absorbed MLA decode over the paged latent cache as a Triton flash-decoding kernel.

Drop-in for ``moonlet.engine.attention.paged_decode_attention`` (same signature, same result up to
bf16 rounding): each decode query is the absorbed ``q_latent | q_pe`` [h, kv_lora + rope]; each
cached token is ``latent | k_pe`` in the pool; scores are q . key, and the values are the keys'
first kv_lora columns.

Two launches:

1. ``_split_kernel``, grid (head groups, splits, sequences). A program takes one sequence, a group
   of its heads (all of them when there are at most ``MAX_HEADS_PER_PROGRAM``) and one contiguous
   share of its context. It loads the group's queries once, then walks its tokens in tiles of
   ``BLOCK_N`` rows gathered through the block table: each tile [BLOCK_N, kv_lora + rope] is loaded
   once and serves both the scores of every head in the group (two dots, latent part and rope part,
   so D = 576 needs no padding to 1024) and the value product (its latent columns). Online softmax
   in fp32; it writes the split's normalized output and log-sum-exp.
2. ``_merge_kernel`` combines the splits by log-sum-exp (``merge_split_outputs`` is the same in
   torch: the reference it is tested against). With one split the first launch writes the result.

Why head groups: a program holding all 64 heads of Kimi K2 would need a [64, 512] fp32 accumulator
plus the [64, 576] queries in registers, more than one SM's register file. The groups of one
(sequence, split) are adjacent in launch order, so the repeat reads of a tile come from L2, not HBM.

FP8 pools (``kv_cache_dtype="fp8"``, ``moonlet.engine.kv_quant``): the kernel reads the fp8 bytes and each
token's two float32 scales (latent, k_pe). An e4m3 byte becomes an fp16 value exactly by moving its bits
(sign to bit 15, exponent and mantissa to bits 13..7): the fp16 then holds the e4m3 value / 256, normal and
subnormal alike, so no conversion instruction of sm89+ is needed (the kernel runs on sm80). That tile,
exact in the dot dtype (the query's: bf16, fp16 or fp32), goes into the dots as it is; the scales are
applied outside them: per key column to the two score dots (latent and rope parts), and folded into the
probabilities before the value dot (p · s_latent, then cast), so no dequantized tile is ever rounded.

The module imports without Triton; the kernel functions raise a clear error when called without it.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine and the reference never need it
    triton = None
    tl = None

# Heads one program handles at most (see the module docstring). tl.dot needs M >= 16, so smaller
# head counts are padded up to 16 with masked rows.
MAX_HEADS_PER_PROGRAM = 32
# Tokens per tile: rows of the gathered latent tile; also the K dimension of the value dot (>= 16).
BLOCK_N = 32
# Launch settings, read at each call (a benchmark may change them). Chosen from an offline sm_90
# compile (no GPU run yet): at 16 or 32 heads per program, 8 warps and 3 stages keep registers at
# 100-160 per thread with no spills and pipeline the tile loads; 4 warps sit at the 255 ceiling.
# fp32 tiles are twice the bytes: one stage (shared memory within A100's 164 KiB), no spills.
NUM_WARPS = 8
NUM_STAGES = {1: 3, 2: 3, 4: 1}  # by the pool's element size (1: FP8)
# A split should read many more latent bytes than it writes partial-output bytes
# (h x kv_lora fp32 per split, ~ as much as 28 tokens' latents at 16 heads): at least this many tokens.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


def is_fp8(dtype: torch.dtype) -> bool:
    """An FP8 latent pool (``moonlet.engine.kv_quant``: float8_e4m3fn entries with per-token scales)."""
    return dtype == getattr(torch, "float8_e4m3fn", None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Whether the kernels below were built for the interpreter (triton.jit decides when it decorates).
_INTERPRET = _interpreting()


def available() -> bool:
    """True when the Triton kernel can serve the CUDA engine here: Triton importable and a CUDA GPU
    of compute capability 8.0 or newer (bf16 tensor-core dots)."""
    if triton is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNTS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are plenty
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def heads_per_program(num_heads: int) -> int:
    """Heads one program computes: all of them up to ``MAX_HEADS_PER_PROGRAM``, padded to a power of
    two >= 16 (tl.dot's minimum M)."""
    return min(max(16, _next_pow2(num_heads)), MAX_HEADS_PER_PROGRAM)


def choose_num_splits(num_seqs: int, num_head_groups: int, max_ctx: int, num_sms: int) -> int:
    """Splits of each sequence's context (flash-decoding).

    About two programs per SM (``2 * num_sms`` over sequences x head groups, rounded down), but
    never a split shorter than ``MIN_TOKENS_PER_SPLIT`` tokens of ``max_ctx`` (each split costs an
    [h, kv_lora] fp32 partial write and read) and never more than ``MAX_SPLITS``. ``max_ctx`` comes
    from the block table's width, not the context lengths, so choosing needs no device sync and is
    fixed for a CUDA-graph-captured batch shape.
    """
    by_length = max_ctx // MIN_TOKENS_PER_SPLIT
    by_occupancy = 2 * num_sms // max(1, num_seqs * num_head_groups)
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def merge_split_outputs(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Combine attention computed over disjoint key splits.

    out [..., splits, C]: each split's softmax-normalized output; lse [..., splits]: each split's
    log-sum-exp of scores (natural log; -inf for an empty split, whose ``out`` must be finite)
    -> [..., C] float32, the attention over the union of the splits.
    """
    lse = lse.float()
    top = lse.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all splits empty: no shift
    weights = torch.exp(lse - top)  # [..., splits]
    return (out.float() * weights[..., None]).sum(dim=-2) / weights.sum(dim=-1, keepdim=True)


if triton is not None:

    @triton.jit
    def _fp8_tile(bits):
        """uint8 e4m3 bits (any shape) -> float16 holding value / 256, exactly (see the module docstring)."""
        b = bits.to(tl.uint16)
        return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)

    @triton.jit
    def _split_kernel(
        q_ptr, pool_ptr, tables_ptr, ctx_ptr, out_ptr, lse_ptr, scales_ptr,
        num_heads, table_width, num_splits, qk_scale_log2,
        q_s0, q_s1, q_s2,
        p_s0, p_s1, p_s2,
        t_s0, t_s1,
        o_s0, o_s1, o_s2, o_s3,
        l_s0, l_s1, l_s2,
        sc_s0, sc_s1, sc_s2,  # the FP8 pool's scales [num_blocks, block_size, 2] (unused otherwise)
        KV_LORA: tl.constexpr, ROPE: tl.constexpr,  # model constants: one compile per model, static masks
        BLOCK_SIZE: tl.constexpr,  # tokens per cache block (any positive int)
        BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOTS_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot mistakes bf16 for uint16
        FP8: tl.constexpr,  # pool_ptr holds e4m3 bytes (as uint8) and scales_ptr their scales
    ):
        pid_h = tl.program_id(0)
        pid_split = tl.program_id(1)
        seq = tl.program_id(2).to(tl.int64)

        # Never past the block table (the reference's bound too): a bad length cannot read stray memory.
        ctx_len = tl.minimum(tl.load(ctx_ptr + seq).to(tl.int32), table_width * BLOCK_SIZE)
        # This split's tokens [start, end), aligned to whole tiles.
        tiles = tl.cdiv(ctx_len, BLOCK_N)
        tiles_per_split = tl.cdiv(tiles, num_splits)
        start = pid_split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx_len)

        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
        head_ok = heads < num_heads
        cols_c = tl.arange(0, BLOCK_C)  # latent columns
        cols_r = tl.arange(0, BLOCK_R)  # rope columns (after the latent ones)
        c_ok = cols_c < KV_LORA
        r_ok = cols_r < ROPE

        q_rows = q_ptr + seq * q_s0 + heads[:, None] * q_s1
        q_c = tl.load(q_rows + cols_c[None, :] * q_s2, mask=head_ok[:, None] & c_ok[None, :], other=0.0)
        q_r = tl.load(q_rows + (KV_LORA + cols_r[None, :]) * q_s2, mask=head_ok[:, None] & r_ok[None, :],
                      other=0.0)
        # Dot operands in the pool's dtype (values rounded as on the GPU; exact upcast when DOTS_IN_FP32);
        # with an FP8 pool in the query's dtype (the decoded tiles are exact in it).
        if FP8:
            dot_ty = q_ptr.dtype.element_ty
        else:
            dot_ty = pool_ptr.dtype.element_ty
        q_c = q_c.to(dot_ty)
        q_r = q_r.to(dot_ty)
        if DOTS_IN_FP32:
            q_c = q_c.to(tl.float32)
            q_r = q_r.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)

        for t0 in range(start, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)  # [BN] positions in the sequence
            tok_ok = toks < end
            block_ids = tl.load(tables_ptr + seq * t_s0 + (toks // BLOCK_SIZE) * t_s1, mask=tok_ok, other=0)
            rows = pool_ptr + block_ids.to(tl.int64) * p_s0 + (toks % BLOCK_SIZE) * p_s1  # [BN] row starts
            k_c = tl.load(rows[:, None] + cols_c[None, :] * p_s2, mask=tok_ok[:, None] & c_ok[None, :],
                          other=0.0)  # [BN, BC]: the latents, also the values
            k_r = tl.load(rows[:, None] + (KV_LORA + cols_r[None, :]) * p_s2,
                          mask=tok_ok[:, None] & r_ok[None, :], other=0.0)  # [BN, BR]
            if FP8:
                k_c = _fp8_tile(k_c).to(dot_ty)
                k_r = _fp8_tile(k_r).to(dot_ty)
                # the tiles hold value / 256: fold the 256 into the scales
                sc_rows = scales_ptr + block_ids.to(tl.int64) * sc_s0 + (toks % BLOCK_SIZE) * sc_s1
                scale_c = tl.load(sc_rows, mask=tok_ok, other=0.0) * 256.0  # [BN] latent scales
                scale_r = tl.load(sc_rows + sc_s2, mask=tok_ok, other=0.0) * 256.0  # [BN] k_pe scales
            if DOTS_IN_FP32:
                k_c = k_c.to(tl.float32)
                k_r = k_r.to(tl.float32)

            if FP8:
                s = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION) * scale_c[None, :]
                s += tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION) * scale_r[None, :]
            else:
                s = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
                s = tl.dot(q_r, tl.trans(k_r), acc=s, input_precision=DOT_PRECISION)  # [BH, BN]
            s = tl.where(tok_ok[None, :], s * qk_scale_log2, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a valid token
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if FP8:
                p = p * scale_c[None, :]  # the values' scales, applied before the cast
            p = p.to(dot_ty)
            if DOTS_IN_FP32:
                p = p.to(tl.float32)
            acc = tl.dot(p, k_c, acc=acc, input_precision=DOT_PRECISION)
            m_i = m_new

        # An empty split (start >= end) leaves l_i = 0: output 0, lse -inf, weight 0 in the merge.
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))

        o_rows = out_ptr + seq * o_s0 + heads[:, None] * o_s1 + pid_split * o_s2
        tl.store(o_rows + cols_c[None, :] * o_s3, out, mask=head_ok[:, None] & c_ok[None, :])
        tl.store(lse_ptr + seq * l_s0 + heads * l_s1 + pid_split * l_s2, lse, mask=head_ok)

    @triton.jit
    def _merge_kernel(
        part_ptr, lse_ptr, out_ptr, num_heads, kv_lora, num_splits,
        p_s0, p_s1, p_s2, p_s3,
        l_s0, l_s1, l_s2,
        o_s0, o_s1, o_s2,
        BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # One program per (sequence, head): weights exp(lse_k - max lse) over its splits.
        head = tl.program_id(0)
        seq = tl.program_id(1).to(tl.int64)
        ks = tl.arange(0, BLOCK_SPLITS)
        k_ok = ks < num_splits
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < kv_lora
        lse = tl.load(lse_ptr + seq * l_s0 + head * l_s1 + ks * l_s2, mask=k_ok, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)  # [splits]; 0 for empty or padded splits
        parts = tl.load(part_ptr + seq * p_s0 + head * p_s1 + ks[:, None] * p_s2 + cols[None, :] * p_s3,
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + seq * o_s0 + head * o_s1 + cols * o_s2, out, mask=c_ok)


def _split_constants(pool_dtype: torch.dtype, kv_lora: int, rope: int, block_size: int, block_h: int,
                     q_dtype: torch.dtype | None = None) -> dict:
    """The compile-time arguments of ``_split_kernel``: fixed for a model and engine, so serving compiles a
    handful of variants (Triton also specializes integer arguments equal to 1 or divisible by 16)."""
    fp8 = is_fp8(pool_dtype)
    dot_dtype = q_dtype if fp8 else pool_dtype  # FP8 pools: dots in the query's dtype
    return dict(
        KV_LORA=kv_lora, ROPE=rope, BLOCK_SIZE=block_size, BLOCK_H=block_h,
        BLOCK_C=max(16, _next_pow2(kv_lora)), BLOCK_R=max(16, _next_pow2(rope)), BLOCK_N=BLOCK_N,
        # fp32 dots: exact (the default would round operands to tf32); 16-bit: the default.
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        DOTS_IN_FP32=_INTERPRET and dot_dtype == torch.bfloat16,
        FP8=fp8,
    )


def _check(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
           kv_lora: int, pool_scales: torch.Tensor | None = None) -> None:
    if q.dim() != 3 or pool.dim() != 3:
        raise ValueError(f"paged_decode_attention_triton: q must be [S, h, D] and pool [num_blocks, block_size, D]; "
                         f"got q {tuple(q.shape)}, pool {tuple(pool.shape)}")
    S, _, D = q.shape
    if pool.shape[2] != D:
        raise ValueError(f"paged_decode_attention_triton: q has D={D} but the pool's entries have {pool.shape[2]}")
    if not 0 < kv_lora < D:
        raise ValueError(f"paged_decode_attention_triton: kv_lora={kv_lora} must be in (0, D={D})")
    if block_tables.dim() != 2 or block_tables.shape[0] != S or tuple(ctx_lens.shape) != (S,):
        raise ValueError(f"paged_decode_attention_triton: expected block_tables [S={S}, nb] and ctx_lens [{S}]; "
                         f"got {tuple(block_tables.shape)} and {tuple(ctx_lens.shape)}")
    if block_tables.dtype.is_floating_point or ctx_lens.dtype.is_floating_point:
        raise ValueError("paged_decode_attention_triton: block_tables and ctx_lens must be integer tensors")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"paged_decode_attention_triton: q dtype {q.dtype} is not float32/bfloat16/float16")
    if is_fp8(pool.dtype):
        if pool_scales is None or tuple(pool_scales.shape) != (*pool.shape[:2], 2) or \
                pool_scales.dtype != torch.float32:
            raise ValueError(f"paged_decode_attention_triton: an FP8 pool {tuple(pool.shape)} needs pool_scales "
                             f"[{pool.shape[0]}, {pool.shape[1]}, 2] float32 (latent and k_pe scale per entry); got "
                             f"{None if pool_scales is None else (tuple(pool_scales.shape), pool_scales.dtype)}")
    elif pool.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"paged_decode_attention_triton: pool dtype {pool.dtype} is not float32/bfloat16/float16 "
                         f"or float8_e4m3fn")
    elif pool_scales is not None:
        raise ValueError(f"paged_decode_attention_triton: pool_scales go with an FP8 pool; this pool is {pool.dtype}")
    tensors = (q, pool, block_tables, ctx_lens) + ((pool_scales,) if pool_scales is not None else ())
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError("paged_decode_attention_triton: all inputs must be on one device, "
                         f"got {sorted(map(str, devices))}")
    if triton is None:
        raise RuntimeError("paged_decode_attention_triton needs the `triton` package (pip install triton); "
                           "use moonlet.engine.attention.paged_decode_attention without it")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"paged_decode_attention_triton: inputs are on {q.device}; the kernel runs on CUDA "
                         "(or on CPU under TRITON_INTERPRET=1 set before importing moonlet.kernels.mla_decode)")


def paged_decode_attention_triton(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                                  ctx_lens: torch.Tensor, scale: float, kv_lora: int,
                                  pool_scales: torch.Tensor | None = None, *,
                                  num_splits: int | None = None, block_h: int | None = None) -> torch.Tensor:
    """Same contract as ``moonlet.engine.attention.paged_decode_attention``:

    q [S, h, D] (D = kv_lora + rope), pool [num_blocks, block_size, D], block_tables [S, nb] integer
    (padded with any valid block id), ctx_lens [S] integer (>= 1) -> [S, h, kv_lora] float32.
    Query s attends to its first ctx_lens[s] cached tokens; values are the keys' first kv_lora dims.

    q is cast to the pool's dtype for the dots (fp32 accumulate). An FP8 pool (float8_e4m3fn) comes with
    ``pool_scales`` [num_blocks, block_size, 2] float32; its dots run in q's dtype. ``num_splits`` and ``block_h``
    (heads per program: a power of two >= 16) override the heuristics (``choose_num_splits``,
    ``heads_per_program``); for benchmarks and tests. No device sync: safe to capture in a CUDA graph.
    """
    _check(q, pool, block_tables, ctx_lens, kv_lora, pool_scales)
    S, h, D = q.shape
    block_size = pool.shape[1]
    if S > 65535:  # the launch grid's last axis
        raise ValueError(f"paged_decode_attention_triton: {S} sequences in one call; at most 65535")
    if S == 0:
        return torch.empty(0, h, kv_lora, device=q.device, dtype=torch.float32)
    bh = block_h or heads_per_program(h)
    if bh < 16 or bh & (bh - 1):
        raise ValueError(f"paged_decode_attention_triton: block_h={bh} must be a power of two >= 16")
    splits = num_splits or choose_num_splits(S, -(-h // bh), block_tables.shape[1] * block_size, _num_sms(q.device))
    if splits < 1:
        raise ValueError(f"paged_decode_attention_triton: num_splits={splits} must be >= 1")

    part = torch.empty(S, h, splits, kv_lora, device=q.device, dtype=torch.float32)
    lse = torch.empty(S, h, splits, device=q.device, dtype=torch.float32)
    grid, args, consts = _split_launch(q, pool, block_tables, ctx_lens, part, lse, scale, bh, pool_scales)
    _split_kernel[grid](*args, **consts, num_warps=NUM_WARPS, num_stages=NUM_STAGES[pool.element_size()])
    if splits == 1:
        return part[:, :, 0]  # contiguous [S, h, kv_lora]
    out = torch.empty(S, h, kv_lora, device=q.device, dtype=torch.float32)
    grid, args, consts = _merge_launch(part, lse, out)
    _merge_kernel[grid](*args, **consts, num_warps=4)
    return out


def _split_launch(q, pool, block_tables, ctx_lens, part, lse, scale: float, block_h: int, pool_scales=None):
    """(grid, positional args, compile-time args) of ``_split_kernel``; part [S, h, splits, kv_lora] and
    lse [S, h, splits] are its outputs. An FP8 pool goes in as its uint8 bytes, with its scales."""
    S, h, splits, kv_lora = part.shape
    rope = q.shape[2] - kv_lora
    grid = (-(-h // block_h), splits, S)  # head groups vary fastest: a tile's re-reads stay in L2
    consts = _split_constants(pool.dtype, kv_lora, rope, pool.shape[1], block_h, q.dtype)
    if consts["FP8"]:
        pool_arg, scales_arg, scale_strides = pool.view(torch.uint8), pool_scales, pool_scales.stride()
    else:  # no scales: any pointer, never read
        pool_arg, scales_arg, scale_strides = pool, lse, (0, 0, 0)
    args = (q, pool_arg, block_tables, ctx_lens, part, lse, scales_arg,
            h, block_tables.shape[1], splits, float(scale) * math.log2(math.e),
            *q.stride(), *pool.stride(), *block_tables.stride(), *part.stride(), *lse.stride(), *scale_strides)
    return grid, args, consts


def _merge_launch(part, lse, out):
    """(grid, positional args, compile-time args) of ``_merge_kernel``."""
    S, h, splits, kv_lora = part.shape
    args = (part, lse, out, h, kv_lora, splits, *part.stride(), *lse.stride(), *out.stride())
    return (h, S), args, dict(BLOCK_SPLITS=_next_pow2(splits), BLOCK_C=max(16, _next_pow2(kv_lora)))
