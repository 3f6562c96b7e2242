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
are attended in full (all of them when there are fewer). The functions below are the plain-PyTorch
reference: they mask a dense computation, so they read the whole context; a kernel that reads only
the selected blocks can take their place with the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def update(self, layer: int, pool: torch.Tensor, pages: torch.Tensor) -> None:
        """Recompute the sums of ``pages`` (long, duplicates allowed) from the layer's pool."""
        self.layer(layer).index_copy_(0, pages, pool[pages].float().sum(dim=1))


def block_means(page_sums: torch.Tensor, tables: torch.Tensor, pages_per_block: int, block_size: int) -> torch.Tensor:
    """page_sums [P, D], tables [S, nb] (page ids) -> [S, nb // pages_per_block, D] mean entry per MoBA block
    (incomplete trailing groups dropped; blocks past a sequence's context are masked by the caller)."""
    S, nb = tables.shape
    nmb = nb // pages_per_block
    sums = page_sums[tables[:, :nmb * pages_per_block]]  # [S, nmb * r, D]
    return sums.view(S, nmb, pages_per_block, -1).sum(dim=2) / block_size


def select_blocks(q: torch.Tensor, means: torch.Tensor, q_pos: torch.Tensor, block_size: int,
                  top_k: int) -> torch.Tensor:
    """q [R, h, D], means [R or 1, nmb, D], q_pos [R] -> selected earlier blocks [R, h, nmb] bool."""
    nmb = means.shape[-2]
    if nmb == 0 or top_k <= 1:
        return torch.zeros(q.shape[0], q.shape[1], nmb, dtype=torch.bool, device=q.device)
    scores = torch.einsum("rhd,rnd->rhn", q.float(), means.float().expand(q.shape[0], -1, -1))
    earlier = torch.arange(nmb, device=q.device)[None] < (q_pos // block_size)[:, None]  # [R, nmb]
    scores = scores.masked_fill(~earlier[:, None], float("-inf"))
    k = min(top_k - 1, nmb)
    # a stable descending sort: equal scores go to the lower block index, as in the model's MoBA
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # [R, h, k]
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return selected & earlier[:, None]  # fewer than k earlier blocks: the -inf picks are dropped


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
                          top_k: int) -> torch.Tensor:
    """``paged_decode_attention`` with MoBA selection: q [S, h, D] (absorbed), pool [P, page, D],
    page_sums [P, D], block_tables [S, nb], ctx_lens [S] -> [S, h, kv_lora] float32."""
    S, nb = block_tables.shape
    page, D = pool.shape[1], pool.shape[2]
    pos = ctx_lens - 1
    means = block_means(page_sums, block_tables, block_size // page, block_size)
    selected = select_blocks(q, means, pos, block_size, top_k)
    keys = pool[block_tables].view(S, nb * page, D).float()  # [S, K, D]
    allowed = token_mask(selected, pos, nb * page, block_size)  # [S, h, K]; own-block causality bounds the context
    scores = torch.bmm(q.float(), keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), keys[..., :kv_lora])


def moba_prefill_attention(q: torch.Tensor, pool: torch.Tensor, page_sums: torch.Tensor, block_ids: torch.Tensor,
                           ctx_len: int, scale: float, kv_lora: int, block_size: int, top_k: int) -> torch.Tensor:
    """``paged_prefill_attention`` with MoBA selection: q [T, h, D], the last T of the sequence's ctx_len
    tokens; block_ids [nb] its pages -> [T, h, kv_lora] float32."""
    T, h, D = q.shape
    page = pool.shape[1]
    keys = pool[block_ids].reshape(-1, D)[:ctx_len].float()  # [ctx, D]
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
