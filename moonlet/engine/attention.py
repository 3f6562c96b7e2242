"""Absorbed MLA attention over the paged latent pool: the engine's ``LatentKV``.

A step runs many sequences in one forward over the flattened tokens [1, total_tokens]. The batch
is laid out decodes first (one new token each), then prefill chunks (several new tokens each).
Each layer's ``attend`` first writes the new tokens' [latent | k_pe] into their slots, then:

- decodes attend together: each query sees its sequence's cached tokens, gathered through a
  padded block table [S, max_blocks] (positions past the sequence's length masked out);
- each prefill chunk attends over its own sequence's blocks, causally (query i at position
  ctx_len - T + i sees keys 0 .. ctx_len - T + i).

So each sequence sees only its own cached and new tokens: a block-diagonal causal structure
without materializing a [tokens, tokens] mask. ``paged_decode_attention`` and
``paged_prefill_attention`` are the plain-PyTorch reference kernels; a GPU kernel (FlashMLA-style)
with the same signature can replace them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import LatentCachePool
from .kv_quant import read_entries
from .moba import MobaSpec, PageSums, moba_sparse_decode_attention, moba_sparse_prefill_attention

# Prefill attention materializes [rows, heads, ctx] scores; bound that to this many elements.
_MAX_SCORE_ELEMENTS = 1 << 25


def paged_decode_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                           scale: float, kv_lora: int, pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [S, h, D] (D = kv_lora + rope), pool [num_blocks, block_size, D], block_tables [S, nb] (padded
    with any valid block id), ctx_lens [S] -> [S, h, kv_lora] float32. Query s sees its first
    ctx_lens[s] cached tokens. ``pool_scales`` [num_blocks, block_size, 2]: an FP8 pool's scales
    (``kv_quant``; entries are dequantized to float32 as they are read)."""
    S, nb = block_tables.shape
    bs, D = pool.shape[1], pool.shape[2]
    keys = read_entries(pool, pool_scales, block_tables, kv_lora).view(S, nb * bs, D)  # [S, K, D] float32
    scores = torch.bmm(q.float(), keys.transpose(1, 2)) * scale  # [S, h, K]
    valid = torch.arange(nb * bs, device=q.device)[None] < ctx_lens[:, None]  # [S, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), keys[..., :kv_lora])  # [S, h, kv_lora]


def paged_prefill_attention(q: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor, ctx_len: int,
                            scale: float, kv_lora: int, pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, h, D]: the last T of a sequence's ctx_len tokens; block_ids [nb] its blocks. Causal
    attention over its cached tokens -> [T, h, kv_lora] float32. ``pool_scales``: as for decode."""
    T, h, D = q.shape
    keys = read_entries(pool, pool_scales, block_ids, kv_lora).reshape(-1, D)[:ctx_len]  # [ctx, D] float32
    values = keys[:, :kv_lora]
    q = q.float()
    out = torch.empty(T, h, kv_lora, device=q.device, dtype=torch.float32)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, h * ctx_len))
    key_pos = torch.arange(ctx_len, device=q.device)
    for r0 in range(0, T, rows):  # bounded memory for long chunks
        r1 = min(T, r0 + rows)
        scores = torch.matmul(q[r0:r1], keys.T) * scale  # [r, h, ctx]
        q_pos = ctx_len - T + torch.arange(r0, r1, device=q.device)
        future = key_pos[None] > q_pos[:, None]  # [r, ctx]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
        out[r0:r1] = torch.matmul(scores.softmax(dim=-1), values)
    return out


@dataclass
class PrefillSpan:
    start: int  # first of its tokens in the flattened batch
    num_tokens: int
    ctx_len: int  # cached + new tokens of this sequence after the step
    block_ids: torch.Tensor  # [nb] long, covering ctx_len
    state_slot: int = -1  # the sequence's recurrent-state slot (models with KDA layers)


@dataclass
class BatchLayout:
    """Everything the layers need about one step's batch (built once, shared by all layers)."""

    positions: torch.Tensor  # [N] long
    slot_mapping: torch.Tensor  # [N] long: block_id * block_size + offset of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] long
    decode_ctx_lens: torch.Tensor | None  # [num_decodes] long
    prefills: list[PrefillSpan]
    decode_state_slots: torch.Tensor | None = None  # [num_decodes] long: recurrent-state slots (KDA models)
    _written_pages: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def written_pages(self, page_size: int) -> torch.Tensor:
        """The cache pages this step writes into (computed once per step; a decode-only step takes one
        per row, duplicates and all, without a host sync, so it stays capturable in a CUDA graph)."""
        if self._written_pages is None:
            pages = self.slot_mapping // page_size
            self._written_pages = pages.unique() if self.prefills else pages
        return self._written_pages


class PagedLatentKV:
    """``moonlet.model.attention.LatentKV`` over a ``LatentCachePool``, for one step's ``BatchLayout``.

    ``decode_kernel`` / ``prefill_kernel`` default to the reference functions above; a faster
    implementation with the same signature (e.g. a GPU kernel) can be passed instead. With an FP8 pool
    (``kv_cache_dtype="fp8"``) every kernel is also given ``pool_scales=`` (the layer's per-entry scales);
    with a pool in the model dtype it is not passed.

    With ``expanded_prefill=True`` the attention layers call ``attend_heads`` instead of ``attend``:
    decodes stay absorbed, prefill chunks run on expanded keys and values
    (``moonlet.kernels.mla_prefill``), and the result is per-head values rather than latents.

    With ``moba`` (a ``MobaSpec``), the layers it names attend block-sparsely (``moonlet.engine.moba``),
    decodes and prefill chunks alike, on the absorbed path; the cache keeps per-page sums for their gates.
    ``moba_decode_kernel`` / ``moba_prefill_kernel`` default to the sparse paths, which read only the own
    and the selected blocks; the masked references (``moba_decode_attention``, ``moba_prefill_attention``)
    take the same arguments.
    """

    def __init__(self, pool: LatentCachePool, kv_lora_rank: int, decode_kernel=None, prefill_kernel=None,
                 expanded_prefill: bool = False, moba: MobaSpec | None = None, states=None,
                 moba_decode_kernel=None, moba_prefill_kernel=None):
        self.pool = pool
        self.states = states  # RecurrentStates of the KDA layers (hybrid models), else None
        self.kv_lora = kv_lora_rank
        self.decode_kernel = decode_kernel or paged_decode_attention
        self.prefill_kernel = prefill_kernel or paged_prefill_attention
        self.expanded_prefill = expanded_prefill
        self.moba = moba
        self.moba_decode_kernel = moba_decode_kernel or moba_sparse_decode_attention
        self.moba_prefill_kernel = moba_prefill_kernel or moba_sparse_prefill_attention
        self.page_sums = PageSums(moba.layers, pool.num_blocks, pool.latent_dim, pool.data.device) \
            if moba is not None and moba.layers else None
        self.layout: BatchLayout | None = None
        self.lora = None  # moonlet.engine.lora.MultiLora when the engine serves LoRA adapters unmerged

    def set_batch(self, layout: BatchLayout) -> None:
        self.layout = layout

    def positions(self, num_tokens: int, device) -> torch.Tensor:
        return self.layout.positions.to(device)

    def begin(self, num_tokens: int) -> None:
        if self.layout is None or num_tokens != self.layout.num_tokens:
            raise RuntimeError(f"PagedLatentKV: forward over {num_tokens} tokens but the batch layout has "
                               f"{None if self.layout is None else self.layout.num_tokens}")

    def attend(self, layer: int, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """q_latent [1,N,h,c], q_pe [1,N,h,r], latent [1,N,c], k_pe [1,N,r] -> [1,N,h,c]."""
        pool = self._store(layer, latent, k_pe)
        q = torch.cat([q_latent[0], q_pe[0]], dim=-1)  # [N, h, D]
        return self._attend_latent(layer, q, pool, scale)[None].to(q_latent.dtype)

    def _scales_kw(self, layer: int) -> dict:
        """The kernels' ``pool_scales`` argument for an FP8 pool; nothing otherwise (so a kernel passed in
        without that parameter still serves a pool in the model dtype)."""
        scales = self.pool.layer_scales(layer)
        return {} if scales is None else {"pool_scales": scales}

    def _attend_latent(self, layer: int, q: torch.Tensor, pool: torch.Tensor, scale: float) -> torch.Tensor:
        """Absorbed attention of the step's decodes and prefill chunks: q [N, h, D] -> [N, h, kv_lora] float32
        (MoBA selection on MoBA layers)."""
        lay = self.layout
        kw = self._scales_kw(layer)
        N, h = q.shape[:2]
        out = torch.empty(N, h, self.kv_lora, device=q.device, dtype=torch.float32)
        moba = self.moba if self.page_sums is not None and layer in self.moba.layers else None
        nd = lay.num_decodes
        if nd and moba is not None:
            out[:nd] = self.moba_decode_kernel(q[:nd], pool, self.page_sums.layer(layer), lay.decode_block_tables,
                                               lay.decode_ctx_lens, scale, self.kv_lora, moba.block_size,
                                               moba.top_k, **kw)
        elif nd:
            out[:nd] = self.decode_kernel(q[:nd], pool, lay.decode_block_tables, lay.decode_ctx_lens, scale,
                                          self.kv_lora, **kw)
        for span in lay.prefills:
            s, e = span.start, span.start + span.num_tokens
            if moba is not None:
                out[s:e] = self.moba_prefill_kernel(q[s:e], pool, self.page_sums.layer(layer), span.block_ids,
                                                    span.ctx_len, scale, self.kv_lora, moba.block_size, moba.top_k,
                                                    **kw)
            else:
                out[s:e] = self.prefill_kernel(q[s:e], pool, span.block_ids, span.ctx_len, scale, self.kv_lora,
                                               **kw)
        return out

    def _store(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write the new tokens' [latent | k_pe] into their slots (quantized into an FP8 pool); returns the
        layer's pool."""
        self.pool.write(layer, self.layout.slot_mapping, torch.cat([latent[0], k_pe[0]], dim=-1))
        pool = self.pool.layer(layer)  # [num_blocks, block_size, D]
        if self.page_sums is not None and layer in self.moba.layers:
            self.page_sums.update(layer, pool, self.layout.written_pages(self.pool.block_size),
                                  self.pool.layer_scales(layer), self.kv_lora)
        return pool

    def attend_heads(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                     k_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
        """q_nope [1,N,h,nope], q_pe [1,N,h,r], latent [1,N,c], k_pe [1,N,r], W_UK [h,nope,c], W_UV [h,v,c]
        -> [1,N,h,v]: absorbed decodes, expanded prefill chunks."""
        from ..kernels.mla_prefill import expanded_prefill_attention

        lay = self.layout
        pool = self._store(layer, latent, k_pe)
        N, h = q_nope.shape[1:3]
        out = torch.empty(N, h, w_uv.shape[1], device=q_nope.device, dtype=torch.float32)
        nd = lay.num_decodes
        lora = self.lora  # per-token LoRA adapters (moonlet.engine.lora): kv_b_proj's part of W_UK / W_UV
        if self.page_sums is not None and layer in self.moba.layers:  # MoBA layers stay absorbed throughout
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
            if lora is not None:
                q_latent = lora.absorb_q(layer, q_nope, q_latent)
            q = torch.cat([q_latent[0], q_pe[0].to(q_latent.dtype)], dim=-1)
            o = self._attend_latent(layer, q, pool, scale)
            res = torch.einsum("thc,hvc->thv", o.to(w_uv.dtype), w_uv)[None]
            if lora is not None:
                res = lora.absorb_v(layer, o[None], res)
            return res.to(q_nope.dtype)
        if nd:
            q_latent = torch.einsum("thd,hdc->thc", q_nope[0, :nd], w_uk)
            if lora is not None and lora.index is not None:
                q_latent = lora.absorb_q(layer, q_nope[:, :nd], q_latent[None], rows=nd)[0]
            q = torch.cat([q_latent, q_pe[0, :nd].to(q_latent.dtype)], dim=-1)
            o = self.decode_kernel(q, pool, lay.decode_block_tables, lay.decode_ctx_lens, scale, self.kv_lora,
                                   **self._scales_kw(layer))
            res = torch.einsum("thc,hvc->thv", o.to(w_uv.dtype), w_uv)
            if lora is not None and lora.index is not None:
                res = lora.absorb_v(layer, o[None], res[None], rows=nd)[0]
            out[:nd] = res
        D = pool.shape[-1]
        scales = self.pool.layer_scales(layer)
        for span in lay.prefills:
            s, e = span.start, span.start + span.num_tokens
            ctx = pool[span.block_ids].reshape(-1, D)[:span.ctx_len]
            ctx_scales = None if scales is None else scales[span.block_ids].reshape(-1, scales.shape[-1])[:span.ctx_len]
            uk, uv = (w_uk, w_uv) if lora is None else lora.span_weights(layer, s, w_uk, w_uv)
            out[s:e] = expanded_prefill_attention(q_nope[0, s:e], q_pe[0, s:e], ctx, self.kv_lora, uk, uv,
                                                  scale, ctx_scales=ctx_scales)
        return out[None].to(q_nope.dtype)

    def recurrent(self, layer: int, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A KDA layer's output for the step's tokens x [1, N, hidden], carrying each sequence's state."""
        if self.states is None:
            raise RuntimeError(f"layer {layer} is a KDA layer but this engine keeps no recurrent state")
        return self.states.run(layer, module, x, self.layout)

    def end(self) -> None:
        pass
