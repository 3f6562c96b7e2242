"""MoBA block-sparse attention over the paged latent cache (prefill and decode).

The model's MoBA (``moonlet.model.sparse``) gates each query's attention with
<q_h, mean of k_h over a key block>. On the absorbed path the per-head key of a cached token is
[W_UK,h · latent | k_pe], which is linear in the cache entry, so the mean key of a block is
[W_UK,h · mean(latent) | mean(k_pe)] and the gate score is the absorbed query [q_latent | q_pe]
dotted with the block's mean cache entry: gating needs one D-wide vector per block, for all heads.

The engine keeps those as per-page sums (``PageSums``: [layers, num_pages, D] float32, about
4 / (2 · page_size) of the bf16 cache). A MoBA block is block_size / page_size consecutive pages
of a sequence's block table, so its mean is the sum of its pages' sums / block_size. Whenever a
step writes into a page, that page's sum is recomputed from the pool; a page is part of a complete
MoBA block only once it is full, and its last write then saw it whole, so sums of complete blocks
are always exact, also for pages shared through the prefix cache (full pages never change).

Selection, per query at position p and head h (the model's rule): the query's own block p // B is
attended causally; of the complete earlier blocks j < p // B the top-(k-1) by gate score (fp32)
are attended in full (all of them when there are fewer).

Two implementations with the same signatures, both plain PyTorch (CPU and CUDA):

- ``moba_decode_attention`` / ``moba_prefill_attention``: the masked references. They score the whole
  context and mask it, so they cost what dense attention costs; the tests compare against them.
- ``moba_sparse_decode_attention`` / ``moba_sparse_prefill_attention`` (the engine's default): they gather
  only the own block and the selected blocks from the pool, so their attention work per query is about
  top_k · block_size entries whatever the context length (the gate still scores every earlier block:
  one D-wide dot product per block and head). Same selection (the shared ``_top_blocks``), fp32 math.
  The decode path has no host sync, as CUDA-graph capture needs; the prefill path has a few per tile.
- ``moba_per_head_decode_attention``: decode through any MLA decode kernel (the Triton one included),
  with one paged table per (sequence, head) listing its picked blocks and own block (not the default).

``_MAX_SCORE_ELEMENTS`` bounds the temporaries of the prefill paths (patch it to force small tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_quant import read_entries

# Prefill scores are [rows, heads, ctx]; bound that to this many elements.
_MAX_SCORE_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class MobaSpec:
    block_size: int  # MoBA block (tokens), a multiple of the cache's page size
    top_k: int  # blocks per query, its own included
    layers: frozenset[int]  # layers whose attention is MoBA

    @classmethod
    def from_config(cls, config, page_size: int) -> "MobaSpec | None":
        moba = config.moba_config
        if moba is None:
            return None
        if moba["block_size"] % page_size:
            raise ValueError(f"moba_config.block_size={moba['block_size']} is not a multiple of the engine's "
                             f"block_size={page_size} (tokens per cache page); choose an engine block size that "
                             f"divides it (e.g. --block-size {_largest_divisor(moba['block_size'], page_size)})")
        layers = frozenset(i for i in range(config.num_hidden_layers) if config.is_moba_layer(i))
        return cls(moba["block_size"], moba["top_k"], layers)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


class PageSums:
    """Per-page float32 sums of the cache entries of the MoBA layers: [len(layers), num_pages, D]."""

    def __init__(self, layers, num_pages: int, dim: int, device):
        self.index = {layer: i for i, layer in enumerate(sorted(layers))}
        self.data = torch.zeros(len(self.index), num_pages, dim, dtype=torch.float32, device=device)

    def layer(self, layer: int) -> torch.Tensor:
        return self.data[self.index[layer]]

    def update(self, layer: int, pool: torch.Tensor, pages: torch.Tensor, pool_scales: torch.Tensor | None = None,
               kv_lora: int = 0) -> None:
        """Recompute the sums of ``pages`` (long, duplicates allowed) from the layer's pool (of the
        dequantized entries when the pool is FP8: ``pool_scales`` and the latent width ``kv_lora``)."""
        self.layer(layer).index_copy_(0, pages, read_entries(pool, pool_scales, pages, kv_lora).sum(dim=1))


def block_means(page_sums: torch.Tensor, tables: torch.Tensor, pages_per_block: int, block_size: int) -> torch.Tensor:
    """page_sums [P, D], tables [S, nb] (page ids) -> [S, nb // pages_per_block, D] mean entry per MoBA block
    (incomplete trailing groups dropped; blocks past a sequence's context are masked by the caller)."""
    S, nb = tables.shape
    nmb = nb // pages_per_block
    sums = page_sums[tables[:, :nmb * pages_per_block]]  # [S, nmb * r, D]
    return sums.view(S, nmb, pages_per_block, page_sums.shape[-1]).sum(dim=2) / block_size


def _top_blocks(q: torch.Tensor, means: torch.Tensor, q_pos: torch.Tensor, block_size: int,
                top_k: int) -> torch.Tensor:
    """q [R, h, D], means [R or 1, nmb, D], q_pos [R] -> [R, h, min(top_k - 1, nmb)] long: the selected earlier
    blocks per (query, head), best first; ``nmb`` (no block) in the slots left when there are fewer earlier blocks."""
    R, h, D = q.shape
    nmb = means.shape[-2]
    k = min(top_k - 1, nmb)
    if k <= 0:
        return torch.empty(R, h, 0, dtype=torch.long, device=q.device)
    if means.shape[0] == 1:  # one sequence's means for all rows: one matmul, no [R, nmb, D] broadcast copy
        scores = (q.reshape(R * h, D).float() @ means[0].float().T).view(R, h, nmb)
    else:
        scores = torch.bmm(q.float(), means.float().transpose(1, 2))
    own = (q_pos // block_size)[:, None, None]  # [R, 1, 1]
    scores = scores.masked_fill(torch.arange(nmb, device=q.device) >= own, float("-inf"))
    # a stable descending sort: equal scores go to the lower block index, as in the model's MoBA
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return top.masked_fill(top >= own, nmb)  # fewer than k earlier blocks: the -inf picks are dropped


def select_blocks(q: torch.Tensor, means: torch.Tensor, q_pos: torch.Tensor, block_size: int,
                  top_k: int) -> torch.Tensor:
    """q [R, h, D], means [R or 1, nmb, D], q_pos [R] -> selected earlier blocks [R, h, nmb] bool."""
    nmb = means.shape[-2]
    top = _top_blocks(q, means, q_pos, block_size, top_k)
    selected = torch.zeros(q.shape[0], q.shape[1], nmb + 1, dtype=torch.bool, device=q.device)
    return selected.scatter_(-1, top, True)[..., :nmb]  # "no block" lands in the dropped column


def token_mask(selected: torch.Tensor, q_pos: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """selected [R, h, nmb], q_pos [R] -> [R, h, num_keys] bool: own block causally + selected blocks."""
    key_pos = torch.arange(num_keys, device=q_pos.device)
    key_block = key_pos // block_size
    own = (key_block[None] == (q_pos // block_size)[:, None]) & (key_pos[None] <= q_pos[:, None])  # [R, K]
    R, h, nmb = selected.shape
    if nmb == 0:
        return own[:, None].expand(R, h, num_keys)
    # a gather, not boolean indexing: no host sync, so decode stays capturable in a CUDA graph
    picked = selected.gather(-1, key_block.clamp(max=nmb - 1).expand(R, h, num_keys))
    return own[:, None] | (picked & (key_block < nmb))


def moba_decode_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor, block_tables: torch.Tensor,
                          ctx_lens: torch.Tensor, scale: float, kv_lora: int, block_size: int,
                          top_k: int, pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``paged_decode_attention`` with MoBA selection: q [S, h, D] (absorbed), pool [P, page, D],
    page_sums [P, D], block_tables [S, nb], ctx_lens [S] -> [S, h, kv_lora] float32. ``pool_scales``
    [P, page, 2]: an FP8 pool's scales (as for every function here)."""
    S, nb = block_tables.shape
    page, D = pool.shape[1], pool.shape[2]
    pos = ctx_lens - 1
    means = block_means(page_sums, block_tables, block_size // page, block_size)
    selected = select_blocks(q, means, pos, block_size, top_k)
    keys = read_entries(pool, pool_scales, block_tables, kv_lora).view(S, nb * page, D)  # [S, K, D]
    allowed = token_mask(selected, pos, nb * page, block_size)  # [S, h, K]; own-block causality bounds the context
    scores = torch.bmm(q.float(), keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), keys[..., :kv_lora])


def moba_prefill_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor, block_ids: torch.Tensor,
                           ctx_len: int, scale: float, kv_lora: int, block_size: int, top_k: int,
                           pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``paged_prefill_attention`` with MoBA selection: q [T, h, D], the last T of the sequence's ctx_len
    tokens; block_ids [nb] its pages -> [T, h, kv_lora] float32."""
    T, h, D = q.shape
    page = pool.shape[1]
    keys = read_entries(pool, pool_scales, block_ids, kv_lora).reshape(-1, D)[:ctx_len]  # [ctx, D]
    values = keys[:, :kv_lora]
    means = block_means(page_sums, block_ids[None], block_size // page, block_size)  # [1, nmb, D]
    q = q.float()
    out = torch.empty(T, h, kv_lora, device=q.device, dtype=torch.float32)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, h * ctx_len))
    for r0 in range(0, T, rows):  # bounded memory for long chunks
        r1 = min(T, r0 + rows)
        q_pos = ctx_len - T + torch.arange(r0, r1, device=q.device)
        selected = select_blocks(q[r0:r1], means, q_pos, block_size, top_k)
        allowed = token_mask(selected, q_pos, ctx_len, block_size)  # [r, h, ctx]
        scores = torch.matmul(q[r0:r1], keys.T) * scale  # [r, h, ctx]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[r0:r1] = torch.matmul(scores.softmax(dim=-1), values)
    return out


# ---- the sparse paths: read the own block and the selected blocks only -----------------------------

# (query, head) rows per history chunk (one [chunk, block_size] score matrix against one key block); None
# picks the power of two at or above the average rows per picked block. Larger than the model's choice:
# every chunk gathers its block's B cache entries (shared by all heads) again, which costs about as much
# as 16 rows of scores, so fewer, fuller chunks beat less padding (measured on CPU).
_CHUNK: int | None = None
_MIN_CHUNK, _MAX_CHUNK = 16, 256


def moba_sparse_decode_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor,
                                 block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float, kv_lora: int,
                                 block_size: int, top_k: int, always_sparse: bool = False,
                                 pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``moba_decode_attention`` reading only the own block's pages and the selected blocks' pages.

    All heads share the cache entries, so the blocks the heads picked are gathered once, as their union,
    and each head masks the ones it did not pick. The union has a fixed size, min(h · (top_k - 1), complete
    blocks in the table), found by sorting the picks and dropping repeats on the device: no host sync and
    shapes that depend only on the inputs' shapes, as capturing decode steps in a CUDA graph needs. Keys read
    per sequence: (that size + 1) · block_size entries instead of the table's width. When that is not fewer
    than the table holds (short contexts, or many heads · top_k), this calls the masked reference instead,
    which then reads less (a choice from the shapes alone; ``always_sparse`` turns it off, for the tests).

    q [S, h, D] (absorbed), pool [P, page, D], page_sums [P, D], block_tables [S, nb], ctx_lens [S]
    -> [S, h, kv_lora] float32.
    """
    S, nb = block_tables.shape
    h = q.shape[1]
    page, D = pool.shape[1], pool.shape[2]
    per_block = block_size // page
    nmb = nb // per_block  # complete MoBA blocks the table can hold
    width = min(h * max(0, min(top_k - 1, nmb)), nmb)  # union slots
    if not always_sparse and (width + 1) * per_block >= nb:
        return moba_decode_attention(q, pool, page_sums, block_tables, ctx_lens, scale, kv_lora, block_size, top_k,
                                     pool_scales=pool_scales)
    pos = ctx_lens - 1
    own = pos // block_size  # [S]
    means = block_means(page_sums, block_tables, per_block, block_size)  # [S, nmb, D]
    top = _top_blocks(q, means, pos, block_size, top_k)  # [S, h, k], nmb = none
    if width:
        picks = top.reshape(S, -1).sort(dim=-1).values
        repeat = torch.zeros_like(picks, dtype=torch.bool)
        repeat[:, 1:] = picks[:, 1:] == picks[:, :-1]
        # distinct picks first (ascending), then "none"; at most nmb distinct blocks, so nothing is cut off
        union = picks.masked_fill(repeat, nmb).sort(dim=-1).values[:, :width]  # [S, width]
        picked = (top[:, :, None, :] == union[:, None, :, None]).any(dim=-1) & (union < nmb)[:, None]  # [S, h, w]
        blocks = torch.cat([union, own[:, None]], dim=1)  # [S, width + 1]
    else:
        picked = torch.zeros(S, h, 0, dtype=torch.bool, device=q.device)
        blocks = own[:, None]
    # the own block may run past the table (its pages beyond the context are not allocated): clamp, then mask
    page_idx = blocks[..., None] * per_block + torch.arange(per_block, device=q.device)  # [S, w + 1, r]
    pages = block_tables.gather(1, page_idx.reshape(S, -1).clamp(max=nb - 1))  # [S, (w + 1) r]
    keys = read_entries(pool, pool_scales, pages, kv_lora).view(S, (width + 1) * block_size, D)
    own_pos = own[:, None] * block_size + torch.arange(block_size, device=q.device)  # [S, B]
    allowed = torch.cat([picked[..., None].expand(S, h, width, block_size).reshape(S, h, width * block_size),
                         (own_pos <= pos[:, None])[:, None].expand(S, h, block_size)], dim=-1)
    scores = torch.bmm(q.float(), keys.transpose(1, 2)) * scale  # [S, h, (w + 1) B]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), keys[..., :kv_lora])


def _attend_rows(q: torch.Tensor, keys: torch.Tensor, kv_lora: int, scale: float,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, m, D], keys [n, L, D] (fp32; values = keys[..., :kv_lora]) -> out [n, m, kv_lora], lse [n, m]."""
    s = torch.bmm(q * scale, keys.transpose(1, 2))
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    return torch.bmm(p, keys[..., :kv_lora]).div_(denom), (m + denom.log()).squeeze(-1)


def _chunk_size(num_rows: int, num_blocks: int) -> int:
    if _CHUNK:
        return _CHUNK
    per_block = -(-num_rows // max(num_blocks, 1))
    return min(_MAX_CHUNK, max(_MIN_CHUNK, 1 << (per_block - 1).bit_length()))


def moba_sparse_prefill_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor,
                                  block_ids: torch.Tensor, ctx_len: int, scale: float, kv_lora: int,
                                  block_size: int, top_k: int, pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``moba_prefill_attention`` reading only the own blocks and the selected blocks.

    The chunk's queries are taken in tiles inside one MoBA block b, so a tile shares its own keys
    (b · B .. its last position, causal) and its candidates (blocks 0 .. b - 1). The history part is the
    model's efficient form with the heads folded into the rows (all heads share the cache entries): the
    tile's (query, head, pick) entries are grouped by picked block and cut into chunks; each chunk's rows
    attend to that one block's B entries, gathered from the pool. Own part and picks are merged by their
    log-sum-exp. Work per query and head is (top_k - 1) · B + own block; the gate adds its b dot products.
    Memory stays near ``_MAX_SCORE_ELEMENTS`` floats per tile, and no fp32 copy of the context is made.
    Needs host syncs (the chunk count), so it is for prefill, which is never captured. When every query of
    the chunk attends all its earlier blocks (top_k - 1 >= blocks before the last query's), MoBA is dense
    causal attention and this calls the masked reference, which then does less work.

    q [T, h, D]: the last T of the sequence's ctx_len tokens; block_ids [nb] its pages -> [T, h, kv_lora] float32.
    """
    if top_k - 1 >= (ctx_len - 1) // block_size:
        return moba_prefill_attention(q, pool, page_sums, block_ids, ctx_len, scale, kv_lora, block_size, top_k,
                                      pool_scales=pool_scales)
    T, h, D = q.shape
    page = pool.shape[1]
    entries = pool.reshape(-1, D)
    entry_scales = None if pool_scales is None else pool_scales.reshape(-1, pool_scales.shape[-1])
    start = ctx_len - T
    dev = q.device

    def gather(positions: torch.Tensor) -> torch.Tensor:  # token positions (any shape) -> fp32 entries
        return read_entries(entries, entry_scales, block_ids[positions // page] * page + positions % page, kv_lora)

    means = block_means(page_sums, block_ids[None], block_size // page, block_size)  # [1, nmb, D]
    out = torch.empty(T, h, kv_lora, device=dev, dtype=torch.float32)
    for b in range(start // block_size, (ctx_len - 1) // block_size + 1):
        b0, p0, p1 = b * block_size, max(start, b * block_size), min(ctx_len, (b + 1) * block_size)
        k = min(top_k - 1, b)
        rows = max(1, _MAX_SCORE_ELEMENTS // (h * max(b, k * kv_lora, block_size)))
        for t0 in range(p0, p1, rows):
            t1 = min(p1, t0 + rows)
            r = t1 - t0
            qt = q[t0 - start:t1 - start].float()  # [r, h, D]
            q_pos = torch.arange(t0, t1, device=dev)
            # own block, causal: keys b0 .. t1 - 1
            own_keys = gather(torch.arange(b0, t1, device=dev))  # [L, D]
            causal = torch.arange(b0, t1, device=dev)[None] <= q_pos[:, None]  # [r, L]
            o, lse = _attend_rows(qt.reshape(1, r * h, D), own_keys[None], kv_lora, scale,
                                  causal[:, None].expand(r, h, -1).reshape(1, r * h, -1))
            o, lse = o.view(r, h, kv_lora), lse.view(r, h)
            if k:
                top = _top_blocks(qt, means[:, :b], q_pos, block_size, top_k)  # [r, h, k], all earlier blocks
                hist_o, hist_lse = _history(qt.reshape(r * h, D), top.reshape(-1), k, b, gather, kv_lora, scale,
                                            block_size)
                hist_o, hist_lse = hist_o.view(r, h, k, kv_lora), hist_lse.view(r, h, k)
                total = torch.logsumexp(torch.cat([lse[..., None], hist_lse], dim=-1), dim=-1)  # [r, h]
                o = o * torch.exp(lse - total)[..., None]
                for slot in range(k):  # one slot at a time: no [r, h, k, kv_lora] weighted temporary
                    o.add_(hist_o[:, :, slot] * torch.exp(hist_lse[:, :, slot] - total)[..., None])
            out[t0 - start:t1 - start] = o
    return out


def _history(q_rows: torch.Tensor, picks: torch.Tensor, k: int, num_blocks: int, gather, kv_lora: int,
             scale: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_rows [n, D] (a tile's (query, head) rows), picks [n · k] (each row's k blocks) -> per pick the
    attention of its row over its block alone: out [n · k, kv_lora], lse [n · k]."""
    dev = q_rows.device
    block, entry = picks.sort(stable=True)  # entries grouped by block
    counts = torch.bincount(block, minlength=num_blocks)
    chunk = _chunk_size(picks.numel(), int((counts > 0).sum()))
    chunks_per_block = (counts + chunk - 1) // chunk
    first_chunk = torch.cumsum(chunks_per_block, 0) - chunks_per_block
    rank = torch.arange(picks.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[block]
    num_chunks = int(chunks_per_block.sum())
    slots = torch.full((num_chunks, chunk), -1, dtype=torch.long, device=dev)
    slots[first_chunk[block] + rank // chunk, rank % chunk] = entry
    chunk_block = torch.repeat_interleave(torch.arange(num_blocks, device=dev), chunks_per_block)
    out = torch.empty(picks.numel(), kv_lora, device=dev, dtype=torch.float32)
    lse = torch.empty(picks.numel(), device=dev, dtype=torch.float32)
    D = q_rows.shape[1]
    # a tile holds [n, chunk, B] scores, [n, chunk, D] rows and [n, B, D] keys
    step = max(1, _MAX_SCORE_ELEMENTS // max(chunk * block_size, chunk * D, block_size * D))
    offsets = torch.arange(block_size, device=dev)
    for c0 in range(0, num_chunks, step):
        c1 = min(num_chunks, c0 + step)
        tile = slots[c0:c1]
        keys = gather(chunk_block[c0:c1, None] * block_size + offsets)  # [n, B, D]
        o, o_lse = _attend_rows(q_rows[tile.clamp(min=0) // k], keys, kv_lora, scale)
        keep = tile >= 0
        out[tile[keep]] = o[keep]
        lse[tile[keep]] = o_lse[keep]
    return out, lse


# ---- decode through an MLA decode kernel, one table per (sequence, head) ------------------------------

def moba_head_tables(q: torch.Tensor, page_sums: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                     page_size: int, block_size: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (sequence, head)'s MoBA keys as a paged context of its own: tables [S · h, top_k · r] (r pages per
    MoBA block) listing the head's picked blocks and then its own block, and lengths [S · h] counting the picked
    blocks in full and the own block up to the query. Softmax does not care about key order, so any MLA decode
    kernel over these (one head per row) computes MoBA decode exactly. No host sync.

    q [S, h, D], page_sums [P, D], block_tables [S, nb], ctx_lens [S]."""
    S, nb = block_tables.shape
    h = q.shape[1]
    per_block = block_size // page_size
    pos = ctx_lens - 1
    own = pos // block_size  # [S]
    means = block_means(page_sums, block_tables, per_block, block_size)
    nmb = means.shape[1]
    top = _top_blocks(q, means, pos, block_size, top_k)  # [S, h, k]: real picks first (best first), then nmb
    picked = (top < nmb).sum(dim=-1)  # [S, h]
    slots = torch.cat([top, own[:, None, None].expand(S, h, 1)], dim=-1)  # [S, h, k + 1]
    slot = torch.arange(slots.shape[-1], device=q.device)
    # slot `picked` and the (unused) ones after it hold the own block; the length stops inside it
    blocks = torch.where(slot < picked[..., None], slots, own[:, None, None])
    page_idx = (blocks[..., None] * per_block + torch.arange(per_block, device=q.device)).clamp(max=nb - 1)
    tables = block_tables[:, None, :].expand(S, h, nb).gather(2, page_idx.reshape(S, h, -1))
    lens = picked * block_size + (pos - own * block_size + 1)[:, None]
    return tables.reshape(S * h, -1), lens.reshape(S * h)


def moba_per_head_decode_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor,
                                   block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float, kv_lora: int,
                                   block_size: int, top_k: int, decode_kernel=None,
                                   pool_scales: torch.Tensor | None = None) -> torch.Tensor:
    """MoBA decode as ``decode_kernel`` (``paged_decode_attention``'s signature; default that reference, or the
    Triton ``paged_decode_attention_triton``) over ``moba_head_tables``: every head reads its own
    (top_k - 1) · B + own-block keys, so compute per head is bounded, but heads that picked the same block
    read it again (a kernel that shares the union across heads reads less; see the sparse decode above).
    Same signature and result as ``moba_decode_attention``."""
    if decode_kernel is None:
        from .attention import paged_decode_attention as decode_kernel  # attention.py imports this module
    S, h, D = q.shape
    tables, lens = moba_head_tables(q, page_sums, block_tables, ctx_lens, pool.shape[1], block_size, top_k)
    kw = {} if pool_scales is None else {"pool_scales": pool_scales}
    return decode_kernel(q.reshape(S * h, 1, D), pool, tables, lens, scale, kv_lora, **kw).view(S, h, kv_lora)
