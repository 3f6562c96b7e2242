"""MLA prefill on expanded keys and values, prefix-cached latents merged by log-sum-exp.

Decode is cheapest on the absorbed path (one latent row per cached token, shared by all heads);
prefill is compute-bound and cheaper expanded: each token's latent is up-projected once into per-head
keys ``[k_nope | k_pe]`` and values, and the new tokens attend with a fused attention kernel. A chunk of
new tokens attends to

- the tokens already in the paged latent cache (an earlier chunk of the same prompt, or a cached
  prefix): all visible, expanded a bounded number of tokens at a time;
- itself: causally (query i sees new keys 0..i).

Each piece returns its output and the log-sum-exp of its scores; ``merge_by_lse`` combines them into
the softmax over the union, so no piece ever needs the others' keys. The result is in the value
space of each head ([T, h, v_head_dim]), ready for ``o_proj``.

``attention_with_lse`` uses torch's fused memory-efficient attention on CUDA (which also returns
the log-sum-exp and allows a value head size different from the query's, as MLA has: 192 vs 128 at
K2 shapes) and a plain-PyTorch computation elsewhere; the latter is the reference the CUDA path is
tested against.
"""

from __future__ import annotations

import warnings

import torch

# prefix tokens expanded at once: bounds the [tokens, heads, qk + v] expansion
PREFIX_CHUNK = 4096
# the reference materializes [h, rows, keys] scores; bound that to this many elements
_MAX_SCORE_ELEMENTS = 1 << 25


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [h, T, dq], k [h, S, dq], v [h, S, dv] -> (out [h, T, dv] float32, lse [h, T] float32).
    ``causal`` aligns query i with key i (T == S)."""
    h, T, _ = q.shape
    S = k.shape[1]
    if causal and T != S:
        raise ValueError(f"causal attention needs as many keys as queries; got {T} queries and {S} keys")
    qf, kf, vf = q.float(), k.float(), v.float()
    out = torch.empty(h, T, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(h, T, dtype=torch.float32, device=q.device)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, h * S))
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        scores = torch.matmul(qf[:, r0:r1], kf.transpose(1, 2)) * scale  # [h, r, S]
        if causal:
            future = torch.arange(S, device=q.device)[None] > torch.arange(r0, r1, device=q.device)[:, None]
            scores = scores.masked_fill(future[None], float("-inf"))
        lse[:, r0:r1] = torch.logsumexp(scores, dim=-1)
        out[:, r0:r1] = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out, lse


def _attention_cuda(q, k, v, scale, causal):
    # aten's memory-efficient kernel: [B, h, T, d] in, (out, logsumexp [B, h, T rounded up], ...) out
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q[None], k[None], v[None], None, True, 0.0, causal, scale=scale)[:2]
    return out[0].float(), lse[0, :, : q.shape[1]].float()


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_reference``'s contract; a fused kernel on CUDA for fp16/bf16 inputs."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            return _attention_cuda(q, k, v, scale, causal)
        except RuntimeError as e:  # a head size or GPU the fused kernel does not take: stay correct, say so once
            if not _warned:
                warnings.warn(f"moonlet: fused attention unavailable for q {tuple(q.shape)}, v {tuple(v.shape)} "
                              f"({e}); expanded prefill falls back to the plain PyTorch computation")
                _warned.append(True)
    return attention_reference(q, k, v, scale, causal)


_warned: list[bool] = []


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets from each set's (out [h, T, dv], lse [h, T])."""
    if len(parts) == 1:
        return parts[0][0]
    from .mla_decode import merge_split_outputs  # the decode kernel's split merge, same math

    return merge_split_outputs(torch.stack([out for out, _ in parts], dim=-2),
                               torch.stack([lse for _, lse in parts], dim=-1))


def expand(latent: torch.Tensor, k_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [S, c], k_pe [S, r] (rotated), W_UK [h, nope, c], W_UV [h, v, c] ->
    k [h, S, nope + r], v [h, S, v]."""
    k_nope = torch.einsum("sc,hdc->hsd", latent, w_uk)
    values = torch.einsum("sc,hvc->hsv", latent, w_uv)
    k = torch.cat([k_nope, k_pe[None].expand(w_uk.shape[0], -1, -1)], dim=-1)
    return k, values


def expanded_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, kv_lora: int,
                               w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                               prefix_chunk: int = PREFIX_CHUNK, ctx_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The last T of a sequence's tokens attending causally over its whole context.

    q_nope [T, h, nope], q_pe [T, h, r] (rotated); ctx [L, kv_lora + r]: the sequence's cached
    [latent | k_pe] rows in order, the T new tokens last (L >= T); W_UK [h, nope, kv_lora],
    W_UV [h, v, kv_lora] (``MLAttention.absorbed_weights``). ``ctx_scales`` [L, 2]: the rows' scales
    when ``ctx`` is FP8 (``moonlet.engine.kv_quant``), dequantized a piece at a time as it is expanded.
    Returns [T, h, v] float32."""
    T, L = q_nope.shape[0], ctx.shape[0]
    if L < T:
        raise ValueError(f"the context ({L} tokens) must include the {T} new tokens")
    dtype = w_uk.dtype
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).to(dtype)  # [h, T, nope + r]

    def rows(s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor]:  # latent, k_pe of ctx[s0:s1] in dtype
        if ctx_scales is None:
            piece = ctx[s0:s1].to(dtype)
        else:
            from ..engine.kv_quant import dequantize_entries

            piece = dequantize_entries(ctx[s0:s1], ctx_scales[s0:s1], kv_lora, dtype)
        return piece[:, :kv_lora], piece[:, kv_lora:]

    parts = []
    for s0 in range(0, L - T, prefix_chunk):  # the cached prefix: every key visible to every query
        s1 = min(L - T, s0 + prefix_chunk)
        k, v = expand(*rows(s0, s1), w_uk, w_uv)
        parts.append(attention_with_lse(q, k, v, scale, causal=False))
    k, v = expand(*rows(L - T, L), w_uk, w_uv)
    parts.append(attention_with_lse(q, k, v, scale, causal=True))
    return merge_by_lse(parts).transpose(0, 1)  # [T, h, v]
