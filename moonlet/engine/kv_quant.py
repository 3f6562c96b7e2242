"""FP8 storage of the latent KV cache (``EngineConfig.kv_cache_dtype="fp8"``).

An MLA cache entry is one token's [normalized latent (kv_lora) | rotated k_pe (rope)]. In an FP8 pool
each entry is stored as ``torch.float8_e4m3fn`` values with two float32 scales beside it, one for the
latent part and one for the k_pe part: value = fp8 · scale, the scale of a part being its largest
magnitude / 448 (e4m3's largest finite value), so the part's largest element lands exactly on 448.

Why per token, and why two scales:

- Per token entry (per layer): a token's scale depends on that token alone, so a write never touches
  other entries, an entry is the same whichever step or rank wrote it (prefix-cache blocks, host-tier
  copies and tensor-parallel ranks stay exact), and one outlier token cannot cost the other tokens of
  its block their precision. It costs 8 bytes per entry: 576 + 8 bytes against 1,152 in bf16 at K2
  shapes (1.97x the tokens in the same memory).
- Two parts: the latent comes out of an RMSNorm (magnitudes near its weight), k_pe is a raw projection
  whose magnitude varies by token and by rope dimension, often by a large factor from the latent's.
  e4m3 keeps its 3 mantissa bits only down to 2^-6 of its range top (below that, subnormals lose them),
  i.e. for elements within 1/28,672 of the scale's maximum; a shared scale set by the larger part would
  push more of the smaller part below that point. Relative error per element, for elements in the
  normal range: at most 2^-4 (half a unit in the last of 3 mantissa bits).

Attention math does not change: readers dequantize (fp8 → float32 · scale) and compute in float32 or
the model dtype as before. The Triton decode kernel reads the fp8 bytes and scales itself
(``moonlet.kernels.mla_decode``). Writes go through uint8 views (``index_copy_`` has no float8 kernel
on the CPU).
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NUM_SCALES = 2  # per entry: the latent's and the k_pe's


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; ValueError on a torch without float8 types."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ValueError(f"kv_cache_dtype='fp8' needs torch.float8_e4m3fn, which this torch ({torch.__version__}) "
                         "lacks; upgrade torch (2.1 or newer) or use kv_cache_dtype='auto'")
    return dtype


def resolve_kv_cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype for an engine's ``kv_cache_dtype`` setting: None / "auto" → the model dtype,
    "fp8" → float8_e4m3fn. ValueError for anything else."""
    if name is None or name == "auto":
        return model_dtype
    if name == "fp8":
        return fp8_dtype()
    raise ValueError(f"engine argument kv_cache_dtype={name!r} must be one of {', '.join(map(repr, KV_CACHE_DTYPES))} "
                     f"('auto': the model dtype; 'fp8': float8_e4m3fn with per-token scales)")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == getattr(torch, "float8_e4m3fn", None)


def entry_bytes(latent_dim: int, dtype: torch.dtype) -> int:
    """Bytes one cache entry (one token, one layer) takes in a pool of ``dtype``, scales included."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return latent_dim * elem + (NUM_SCALES * 4 if is_fp8(dtype) else 0)


def quantize_entries(entries: torch.Tensor, kv_lora: int) -> tuple[torch.Tensor, torch.Tensor]:
    """entries [..., D] (any float dtype; latent in the first ``kv_lora`` columns) -> (fp8 [..., D],
    scales [..., 2] float32). A part that is all zeros gets scale 1 (it dequantizes to zeros)."""
    x = entries.float()
    parts = (x[..., :kv_lora], x[..., kv_lora:])
    amax = torch.stack([p.abs().amax(dim=-1) for p in parts], dim=-1)  # [..., 2]
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    per_col = torch.cat([scales[..., :1].expand(parts[0].shape), scales[..., 1:].expand(parts[1].shape)], dim=-1)
    # amax / (amax / 448) can round a hair above 448: clamp (older torch turns out-of-range values into NaN)
    q = (x / per_col).clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype())
    return q, scales


def dequantize_entries(q: torch.Tensor, scales: torch.Tensor, kv_lora: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 entries [..., D] and their scales [..., 2] -> [..., D] in ``dtype`` (computed in float32)."""
    x = q.float()
    x[..., :kv_lora] *= scales[..., :1]
    x[..., kv_lora:] *= scales[..., 1:]
    return x.to(dtype)


def fake_quantize(entries: torch.Tensor, kv_lora: int) -> torch.Tensor:
    """What an FP8 pool gives back for ``entries``: quantize, then dequantize to ``entries``' dtype."""
    return dequantize_entries(*quantize_entries(entries, kv_lora), kv_lora, dtype=entries.dtype)


def read_entries(pool: torch.Tensor, scales: torch.Tensor | None, index, kv_lora: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``pool[index]`` in ``dtype``: dequantized when the pool is FP8 (``scales`` [..., 2] indexed alike),
    else a plain cast. ``index`` is anything tensor indexing takes (a block table, a slice, ...)."""
    if scales is None:
        return pool[index].to(dtype)
    return dequantize_entries(pool[index], scales[index], kv_lora, dtype)
