"""Matmuls straight from block-FP8 and group-INT4 weights (W8A16 / W4A16), as one Triton kernel.

A quantized weight matrix W [N, K] is described by ``QuantizedMatrix``: the stored values (float8_e4m3fn
[N, K], or int32 [N, ceil(K/8)] holding eight 4-bit values each, the compressed-tensors layout of
``moonlet.quant``) and a scale grid with one scale per ``block = (rows, cols)`` tile:
W[n, k] = q[n, k] · scale[n // rows, k // cols]. Block FP8 is block (128, 128) with float32
``weight_scale_inv``; INT4 is block (1, group_size) with bf16 ``weight_scale``. A stack of G matrices
(MoE experts) has a leading G dimension on both tensors.

``_quant_gemm_kernel`` computes C = A · Wᵀ with the weight tile dequantized in registers
(q · scale in fp32, rounded to the activations' dtype: the same rounding as dequantizing the whole
matrix to that dtype first) and fp32 accumulation. It has two modes:

- dense (``GROUPED=False``): rows are A's rows, one matrix; ``quant_linear_triton`` (what
  ``Fp8BlockLinear`` / ``Int4GroupLinear`` call on CUDA).
- grouped (``GROUPED=True``): the fused-MoE layout. Rows are slot ids listed expert by expert, each
  expert's list padded to a multiple of ``BLOCK_M`` with a sentinel, so every BLOCK_M-row tile
  belongs to one expert (``block_groups``); a tile's A rows are ``slot // a_row_div`` (the token of
  the slot for the first GEMM, the slot itself for the second) and its output rows are the slots.
  With ``SWIGLU`` the tile computes the gate and up products against two stacks and writes
  silu(gate) · up, so the [slots, 2I] intermediate never exists. ``moonlet.kernels.quant_moe``
  builds the row layout and drives it.

The plain-PyTorch reference (dequantize with ``moonlet.quant``, then ``F.linear``) is
``quant_linear_reference``; the tests run the kernel under ``TRITON_INTERPRET=1`` against it.
The module imports without Triton; the kernel functions raise a clear error when called without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant import FP8_DTYPE, INT4_MIN
from .mla_decode import _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU reference never needs it
    triton = None
    tl = None

_INTERPRET = _interpreting()  # fixed when triton.jit decorates, as in mla_decode

# Tile sizes. tl.dot needs every dimension >= 16; BLOCK_K = 64 divides INT4's 32-groups' multiples and
# FP8's 128 blocks, so one tile's scale varies along K only every group. Launch settings are not tuned
# on a GPU yet (see docs/gpu.md).
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3


@dataclass
class QuantizedMatrix:
    """A quantized weight matrix [N, K] (or a stack [G, N, K]) as stored in the checkpoint.

    ``kind``: "fp8" (``data`` float8_e4m3fn [.., N, K]) or "int4" (``data`` int32 [.., N, ceil(K/8)],
    value k of each word in bits 4k..4k+3, stored +8). ``scale``: [.., ceil(N/block[0]), ceil(K/block[1])],
    W[n, k] = q[n, k] · scale[n // block[0], k // block[1]]. ``shape`` is (N, K) of one matrix.
    """

    kind: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def stacked(self) -> bool:
        return self.data.dim() == 3

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype, group: int | None = None) -> torch.Tensor:
        """The dense matrix [N, K] in ``dtype`` (of stack member ``group``), through moonlet.quant."""
        from ..quant import dequantize_fp8_block, unpack_int4

        data = self.data if group is None else self.data[group]
        scale = self.scale if group is None else self.scale[group]
        if self.kind == "fp8":
            return dequantize_fp8_block(data, scale, self.block, dtype)
        return unpack_int4(data, scale, self.shape, self.block[1], dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def check_matrix(w: QuantizedMatrix) -> None:
    """Raise on a QuantizedMatrix whose tensors disagree with its kind, shape and block."""
    n, k = w.shape
    b0, b1 = w.block
    lead = tuple(w.data.shape[:-2])
    if w.kind == "fp8":
        want_data, want_dtype = (n, k), FP8_DTYPE
    elif w.kind == "int4":
        want_data, want_dtype = (n, -(-k // 8)), torch.int32
        if b0 != 1:
            raise ValueError(f"INT4 scales are per row and group: block must be (1, group_size); got {w.block}")
    else:
        raise ValueError(f"unknown quantized kind {w.kind!r}; use 'fp8' or 'int4'")
    if w.data.dtype != want_dtype or tuple(w.data.shape[-2:]) != want_data:
        raise ValueError(f"{w.kind} weight of shape {[n, k]} needs data {want_dtype} {list(want_data)}; got "
                         f"{w.data.dtype} {list(w.data.shape)}")
    want_scale = lead + (-(-n // b0), -(-k // b1))
    if tuple(w.scale.shape) != want_scale:
        raise ValueError(f"{w.kind} weight of shape {[n, k]} with blocks {list(w.block)} needs scales "
                         f"{list(want_scale)}; got {list(w.scale.shape)}")


def quant_linear_reference(x: torch.Tensor, w: QuantizedMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ in x.dtype: W dequantized to x.dtype (moonlet.quant), then ``F.linear``."""
    return F.linear(x, w.dequantize(x.dtype), bias)


def available(kind: str) -> bool:
    """True when the Triton kernel can run for ``kind`` here: Triton importable and a CUDA GPU of compute
    capability 8.0+ (INT4) or 8.9+ (FP8: Triton converts float8_e4m3fn from sm_89 on)."""
    if triton is None or not torch.cuda.is_available():
        return False
    cap = torch.cuda.get_device_capability()
    return cap >= (8, 9) if kind == "fp8" else cap >= (8, 0)


def block_m_for(rows: int) -> int:
    """Rows per tile: 16 for decode-sized inputs (tl.dot's minimum), up to 64 for prefill."""
    return 16 if rows <= 16 else 32 if rows <= 64 else 64


if triton is not None:

    INT4_LOW = tl.constexpr(INT4_MIN)  # stored nibble 0..15 -> value -8..7

    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, offs_n, offs_k, mask, w_sn, w_sk, s_sn, s_sk,
                      INT4: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr):
        """W[offs_n, offs_k] as an fp32 [BLOCK_K, BLOCK_N] tile (transposed, ready for a · w)."""
        if INT4:
            words = tl.load(w_ptr + offs_n[None, :] * w_sn + (offs_k[:, None] // 8) * w_sk, mask=mask, other=0)
            q = ((words >> ((offs_k[:, None] % 8) * 4)) & 0xF) + INT4_LOW
            q = q.to(tl.float32)
        else:
            q = tl.load(w_ptr + offs_n[None, :] * w_sn + offs_k[:, None] * w_sk, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + (offs_n[None, :] // SCALE_ROWS) * s_sn + (offs_k[:, None] // SCALE_COLS) * s_sk,
                    mask=mask, other=0.0).to(tl.float32)
        return q * s

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
        """x (fp32) rounded to ``dtype``. The interpreter's fp32 -> bf16 conversion truncates (the GPU
        rounds to nearest even), so under it the rounding is done on the bits first, exactly."""
        if EMULATE_RNE:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _quant_gemm_kernel(
        a_ptr, rows_ptr, groups_ptr,
        w_ptr, s_ptr, u_ptr, us_ptr,  # u / us: the up-projection stack (SWIGLU only)
        c_ptr,
        M, N, K, a_row_div,
        a_s0, a_s1,
        w_sg, w_sn, w_sk,
        s_sg, s_sn, s_sk,
        c_s0, c_s1,
        INT4: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr,
        GROUPED: tl.constexpr, SWIGLU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOTS_IN_FP32: tl.constexpr,  # interpreter + bf16 only: fp32 dots (its tl.dot mistakes bf16 for
                                     # uint16) and round-to-nearest by hand (its bf16 conversion truncates)
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if GROUPED:
            group = tl.load(groups_ptr + pid_m)
            if group < 0:  # a tile past the last expert's padded rows
                return
            rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # slot ids; sentinel >= M
            row_ok = rows < M
            a_rows = tl.where(row_ok, rows // a_row_div, 0)
            w_ptr += group.to(tl.int64) * w_sg
            s_ptr += group.to(tl.int64) * s_sg
            if SWIGLU:
                u_ptr += group.to(tl.int64) * w_sg
                us_ptr += group.to(tl.int64) * s_sg
        else:
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            a_rows = rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * a_s0 + offs_k[None, :] * a_s1,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            # Round the dequantized tile to the activations' dtype, as the reference's dense weight is.
            w = _round_to(_dequant_tile(w_ptr, s_ptr, offs_n, offs_k, w_mask, w_sn, w_sk, s_sn, s_sk,
                                        INT4, SCALE_ROWS, SCALE_COLS), a_ptr.dtype.element_ty, DOTS_IN_FP32)
            if DOTS_IN_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc=acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                u = _round_to(_dequant_tile(u_ptr, us_ptr, offs_n, offs_k, w_mask, w_sn, w_sk, s_sn, s_sk,
                                            INT4, SCALE_ROWS, SCALE_COLS), a_ptr.dtype.element_ty, DOTS_IN_FP32)
                if DOTS_IN_FP32:
                    u = u.to(tl.float32)
                acc_u = tl.dot(a, u, acc=acc_u, input_precision=DOT_PRECISION)

        if SWIGLU:
            # As the reference: gate and up rounded to the output dtype, silu(gate) · up in fp32, rounded once.
            g = _round_to(acc, c_ptr.dtype.element_ty, DOTS_IN_FP32).to(tl.float32)
            up = _round_to(acc_u, c_ptr.dtype.element_ty, DOTS_IN_FP32).to(tl.float32)
            out = g * tl.sigmoid(g) * up
        else:
            out = acc
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * c_s0 + offs_n[None, :] * c_s1,
                 _round_to(out, c_ptr.dtype.element_ty, DOTS_IN_FP32), mask=row_ok[:, None] & n_ok[None, :])


def _check_triton(x: torch.Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what} needs the `triton` package (pip install triton); use the reference path "
                           "(moonlet.kernels.quant_linear.quant_linear_reference) without it")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{what}: inputs are on {x.device}; the kernel runs on CUDA (or on CPU under "
                         "TRITON_INTERPRET=1 set before importing moonlet.kernels.quant_linear)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: activations must be float32, bfloat16 or float16; got {x.dtype}")


def _constants(w: QuantizedMatrix, dtype: torch.dtype, grouped: bool, swiglu: bool, block_m: int) -> dict:
    """The compile-time arguments of ``_quant_gemm_kernel``."""
    return dict(
        INT4=w.kind == "int4", SCALE_ROWS=w.block[0], SCALE_COLS=w.block[1], GROUPED=grouped, SWIGLU=swiglu,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        # fp32 activations: exact fp32 dots (the default would round operands to tf32)
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOTS_IN_FP32=_INTERPRET and dtype == torch.bfloat16,
    )


def _weight_strides(w: QuantizedMatrix) -> tuple[int, ...]:
    """(w_sg, w_sn, w_sk, s_sg, s_sn, s_sk): a single matrix has group stride 0."""
    d, s = w.data, w.scale
    if w.stacked:
        return (*d.stride(), *s.stride())
    return (0, *d.stride(), 0, *s.stride())


def _dense_launch(x2: torch.Tensor, w: QuantizedMatrix, out: torch.Tensor, block_m: int):
    """(grid, positional args, compile-time args) of the dense mode; x2 [M, K], out [M, N]."""
    M, K = x2.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, BLOCK_N))
    args = (x2, x2, x2, w.data, w.scale, w.data, w.scale, out, M, N, K, 1,
            *x2.stride(), *_weight_strides(w), *out.stride())
    return grid, args, _constants(w, x2.dtype, False, False, block_m)


def quant_linear_triton(x: torch.Tensor, w: QuantizedMatrix, bias: torch.Tensor | None = None, *,
                        block_m: int | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ (+ bias) -> [..., N] in x.dtype, W read quantized (one matrix, not a stack).
    Same result as ``quant_linear_reference`` up to the accumulation order. No device sync."""
    _check_triton(x, "quant_linear_triton")
    if w.stacked:
        raise ValueError("quant_linear_triton takes one matrix; stacks go through moonlet.kernels.quant_moe")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"quant_linear_triton: x has {x.shape[-1]} features; the weight [{N}, {K}] needs {K}")
    x2 = x.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        grid, args, consts = _dense_launch(x2, w, out, block_m or block_m_for(x2.shape[0]))
        _quant_gemm_kernel[grid](*args, **consts, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


def grouped_launch(a: torch.Tensor, rows: torch.Tensor, block_groups: torch.Tensor, w: QuantizedMatrix,
                   up: QuantizedMatrix | None, out: torch.Tensor, num_slots: int, a_row_div: int, block_m: int):
    """(grid, positional args, compile-time args) of the grouped mode (see the module docstring)."""
    N, K = w.shape
    grid = (block_groups.shape[0], triton.cdiv(N, BLOCK_N))
    u = up if up is not None else w
    args = (a, rows, block_groups, w.data, w.scale, u.data, u.scale, out, num_slots, N, K, a_row_div,
            *a.stride(), *_weight_strides(w), *out.stride())
    return grid, args, _constants(w, a.dtype, True, up is not None, block_m)


def launch_grouped(a, rows, block_groups, w, up, out, num_slots, a_row_div, block_m) -> None:
    """Run the grouped mode (``moonlet.kernels.quant_moe`` prepares the arguments)."""
    _check_triton(a, "quantized grouped experts (Triton)")
    grid, args, consts = grouped_launch(a, rows, block_groups, w, up, out, num_slots, a_row_div, block_m)
    _quant_gemm_kernel[grid](*args, **consts, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
