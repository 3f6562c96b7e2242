"""MoBA (Mixture of Block Attention): block-sparse causal attention for long context.

Semantics (the serving engine implements the same selection; keep the two in step):

- Keys are split into blocks of ``block_size`` (B) consecutive positions: [0, B), [B, 2B), ...
  The last block may be partial.
- A query at position t owns block ``t // B``. Every earlier block j < t // B is complete; for each
  head it gets the gate score ``<q_t, mean_{s in block j} k_s>``, computed in float32 from the full
  per-head query and key vectors (nope and rope parts concatenated, after RoPE), without the
  softmax scale. The gate has no parameters and carries no gradient.
- The query attends causally to its own block (positions ``t // B * B .. t``) plus the ``top_k - 1``
  earlier blocks with the highest gate scores (all earlier blocks when there are fewer than
  ``top_k - 1``). Ties between equal scores go to the lower block index (a stable descending sort).
  Blocks at or after the query's own block are never selected.
- Attention runs over the union of those keys with the ordinary softmax scale; equivalently, the
  own block (causal) and the selected history blocks (non-causal) are attended separately and
  merged by their log-sum-exp. With ``top_k`` >= the number of blocks, or T <= B, this is exactly
  dense causal attention.

Functions (q, k [batch, heads, T, d_qk]; v [batch, heads, T, d_v]):

- ``moba_select``: which history blocks each query/head selected (bool [batch, heads, T, blocks]).
- ``moba_attention_reference``: dense attention under the token mask built from that selection;
  the independent, O(T^2) reference.
- ``moba_attention``: the efficient form. The own-block part is computed block by block; the
  history part gathers, for each history block, the queries that selected it (in chunks of up to
  256 queries) and attends them to that block's keys only. Work grows with T * top_k * B
  (plus the gate, T * T/B * d_qk); memory holds no [T, T] matrix. Forward and backward are tiled
  and recompute scores in the backward from the saved log-sum-exp (the flash-attention scheme), so
  autograd keeps only q, k, v, the output and the LSE.
- ``moba_max_logit``: per-head maximum scaled logit over the pairs MoBA attends to (QK-Clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries per history chunk (one chunk is one [chunk, B] score matrix against one key block); None
# picks a power of two from the average number of queries per block, so padding stays ~1/8 of the
# work while each gathered key block serves many queries.
_CHUNK: int | None = None
_MIN_CHUNK, _MAX_CHUNK = 16, 256
# Score elements per tile (forward and backward); bounds the temporaries to ~tens of MB in float32.
_TILE_ELEMS = 1 << 22
# Queries per gate tile; bounds the [tile, blocks] gate matrix.
_GATE_TILE = 4096


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block_size: int, top_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or (v is not None and v.dim() != 4):
        raise ValueError("MoBA expects q, k, v as [batch, heads, T, dim]; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {None if v is None else tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"MoBA needs q and k of the same shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v is not None and v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, heads and T")
    if q.shape[2] < 1:
        raise ValueError("MoBA needs at least one token (T >= 1)")
    for name, value in (("block_size", block_size), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"MoBA {name} must be a positive integer; got {value!r}")


def _num_history_blocks(T: int, block_size: int) -> int:
    """Blocks that can be some query's history: all blocks before the last query's own block."""
    return (T - 1) // block_size


@torch.no_grad()
def _select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Selected history block ids [batch, heads, T, s] (long), -1 in unused slots; s = min(top_k-1, blocks)."""
    Bt, h, T, d = q.shape
    nh = _num_history_blocks(T, block_size)
    s = min(top_k - 1, nh)
    idx = torch.full((Bt, h, T, s), -1, dtype=torch.long, device=q.device)
    if s == 0:
        return idx
    means = k[:, :, : nh * block_size].float().reshape(Bt, h, nh, block_size, d).mean(dim=3)  # [b, h, nh, d]
    blocks = torch.arange(nh, device=q.device)
    for t0 in range(0, T, _GATE_TILE):
        t1 = min(T, t0 + _GATE_TILE)
        own = torch.arange(t0, t1, device=q.device) // block_size  # [n]
        scores = torch.matmul(q[:, :, t0:t1].float(), means.transpose(-1, -2))  # [b, h, n, nh]
        scores = scores.masked_fill(blocks[None, :] >= own[:, None], float("-inf"))
        # Stable sort: equal scores keep index order, so ties go to the lower block index.
        picked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :s]
        # Masked (future/own) blocks are the highest indices, so they are picked only when fewer than s
        # earlier blocks exist; drop them by index.
        idx[:, :, t0:t1] = torch.where(picked < own[:, None], picked, -1)
    return idx


def moba_select(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """History blocks selected per query and head: bool [batch, heads, T, ceil(T / block_size)].

    True at [b, h, t, j] when query t of head h attends block j as history (j < t // block_size).
    The query's own block is always attended and is not marked here.
    """
    _check_inputs(q, k, None, block_size, top_k)
    idx = _select_blocks(q, k, block_size, top_k)
    nb = -(-q.shape[2] // block_size)
    sel = torch.zeros(*idx.shape[:3], nb + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, idx.masked_fill(idx < 0, nb), True)  # unused slots land in the dropped column
    return sel[..., :nb]


def moba_token_mask(selected: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token mask [batch, heads, T, T] (True = attends) from ``moba_select``'s output."""
    T = selected.shape[2]
    pos = torch.arange(T, device=selected.device)
    key_block = pos // block_size
    history = selected[..., key_block]  # [b, h, T, T]: selected[b, h, t, block of key s]
    own = (key_block[None, :] == key_block[:, None]) & (pos[None, :] <= pos[:, None])
    return history | own


def moba_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                             scale: float) -> torch.Tensor:
    """Dense attention under MoBA's token mask; O(T^2) memory. Returns [batch, heads, T, d_v] in q's dtype
    (computed in float32, or float64 for float64 inputs)."""
    _check_inputs(q, k, v, block_size, top_k)
    cdt = torch.promote_types(q.dtype, torch.float32)
    mask = moba_token_mask(moba_select(q, k, block_size, top_k), block_size)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v.to(cdt)).to(q.dtype)


# ---- the efficient form ---------------------------------------------------------------------------


def _blocked(x: torch.Tensor, block_size: int, fill: float = 0.0) -> torch.Tensor:
    """[N, T, d] -> [N * nb, B, d], padding T up to nb * B with ``fill``."""
    N, T = x.shape[:2]
    pad = -T % block_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad), value=fill)
    return x.reshape(N * ((T + pad) // block_size), block_size, *x.shape[2:])


def _unblocked(x: torch.Tensor, N: int, T: int) -> torch.Tensor:
    """Inverse of ``_blocked``: [N * nb, B, ...] -> [N, T, ...]."""
    return x.reshape(N, -1, *x.shape[2:])[:, :T]


class _HistoryPlan:
    """Selected (query, history block) pairs grouped by block, in chunks of up to ``chunk`` queries.

    ``entries`` [chunks, chunk]: flat slot ids ``(bh * T + t) * s + slot`` into the selection, -1 as
    padding; ``rows`` the matching query rows ``bh * T + t``; ``key_rows`` [chunks, B] the rows of the
    chunk's key block in the [bh * T] layout.
    """

    def __init__(self, idx: torch.Tensor, T: int, block_size: int):
        BH, _, s = idx.shape
        device = idx.device
        nh = _num_history_blocks(T, block_size)
        flat = idx.reshape(-1)
        ent = (flat >= 0).nonzero().squeeze(1)
        group = (ent // (T * s)) * nh + flat[ent]  # bh * nh + block
        group, order = torch.sort(group, stable=True)
        ent = ent[order]
        counts = torch.bincount(group, minlength=BH * nh)
        chunk = _CHUNK or _auto_chunk(ent.numel(), int((counts > 0).sum()))
        chunks_per_group = (counts + chunk - 1) // chunk
        chunk_start = torch.cumsum(chunks_per_group, 0) - chunks_per_group
        rank = torch.arange(ent.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[group]
        num_chunks = int(chunks_per_group.sum())
        self.entries = torch.full((num_chunks, chunk), -1, dtype=torch.long, device=device)
        self.entries[chunk_start[group] + rank // chunk, rank % chunk] = ent
        chunk_group = torch.repeat_interleave(torch.arange(BH * nh, device=device), chunks_per_group)
        self.pad = self.entries < 0
        self.rows = self.entries.clamp(min=0) // s
        block_start = (chunk_group // nh) * T + (chunk_group % nh) * block_size
        self.key_rows = block_start[:, None] + torch.arange(block_size, device=device)
        self.bh = chunk_group // nh
        self.num_chunks = num_chunks
        self.step = max(1, _TILE_ELEMS // (chunk * block_size))

    def tiles(self):
        for c0 in range(0, self.num_chunks, self.step):
            yield slice(c0, min(self.num_chunks, c0 + self.step))


def _auto_chunk(num_entries: int, num_groups: int) -> int:
    per_group = num_entries // max(num_groups, 1)
    chunk = 1 << max(0, (per_group // 4).bit_length() - 1)  # largest power of two <= per_group / 4
    return min(_MAX_CHUNK, max(_MIN_CHUNK, chunk))


def _own_tiles(num_blocks: int, block_size: int):
    step = max(1, _TILE_ELEMS // (block_size * block_size))
    for i0 in range(0, num_blocks, step):
        yield slice(i0, min(num_blocks, i0 + step))


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, cdt: torch.dtype) -> torch.Tensor:
    return torch.matmul(q.to(cdt) * scale, k.to(cdt).transpose(-1, -2))  # scaling q is cheaper than [.., B]


def _tile_forward(qt, kt, vt, scale: float, cdt: torch.dtype, mask: torch.Tensor | None = None):
    """One tile of attention: qt [n, C, d_qk], kt [n, B, d_qk], vt [n, B, d_v] -> out [n, C, d_v], lse [n, C]."""
    s = _scores(qt, kt, scale, cdt)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    return torch.matmul(p, vt.to(cdt)).div_(denom), (m + denom.log()).squeeze(-1)


def _tile_backward(qt, kt, vt, d_out, lse, delta, scale: float, cdt: torch.dtype, mask: torch.Tensor | None = None):
    """Gradients of one tile from the final LSE and delta = rowsum(dO * O) - dLSE: dq, dk, dv."""
    qs, kt, vt = qt.to(cdt) * scale, kt.to(cdt), vt.to(cdt)
    s = torch.matmul(qs, kt.transpose(-1, -2))
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    p = s.sub_(lse[..., None]).exp_()  # the global probabilities of this tile's pairs
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = torch.matmul(d_out, vt.transpose(-1, -2)).sub_(delta[..., None]).mul_(p)
    return torch.matmul(ds, kt).mul_(scale), torch.matmul(ds.transpose(-1, -2), qs), dv


class _MobaAttention(torch.autograd.Function):
    """Tiled MoBA attention over flattened heads: q, k [BH, T, d_qk], v [BH, T, d_v]; idx [BH, T, s]."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size: int, scale: float):
        BH, T, dv = v.shape
        cdt = torch.promote_types(q.dtype, torch.float32)
        causal = torch.ones(block_size, block_size, dtype=torch.bool, device=q.device).tril()

        # Own block, causal: block-diagonal tiles. Padded keys sit after every real query, so the causal
        # mask already hides them; padded query rows are dropped by _unblocked.
        qb, kb, vb = _blocked(q, block_size), _blocked(k, block_size), _blocked(v, block_size)
        own_out = torch.empty(*vb.shape[:2], dv, dtype=cdt, device=q.device)
        own_lse = torch.empty(vb.shape[:2], dtype=cdt, device=q.device)
        for sl in _own_tiles(qb.shape[0], block_size):
            own_out[sl], own_lse[sl] = _tile_forward(qb[sl], kb[sl], vb[sl], scale, cdt, causal)
        out = _unblocked(own_out, BH, T)
        lse = _unblocked(own_lse, BH, T)

        # Selected history blocks, non-causal (each is wholly before the query's own block).
        s_slots = idx.shape[-1]
        plan = _HistoryPlan(idx, T, block_size) if s_slots else None
        if plan is not None and plan.num_chunks:
            q2, k2, v2 = q.reshape(BH * T, -1), k.reshape(BH * T, -1), v.reshape(BH * T, dv)
            hist_out = torch.zeros(BH * T * s_slots, dv, dtype=cdt, device=q.device)
            hist_lse = torch.full((BH * T * s_slots,), float("-inf"), dtype=cdt, device=q.device)
            for sl in plan.tiles():
                key_rows = plan.key_rows[sl]
                o, o_lse = _tile_forward(q2[plan.rows[sl]], k2[key_rows], v2[key_rows], scale, cdt)  # [n, C, dv]
                keep = ~plan.pad[sl]
                dest = plan.entries[sl][keep]
                hist_out[dest] = o[keep]
                hist_lse[dest] = o_lse[keep]
            # Merge own block and history slots by log-sum-exp, one slot at a time (no [.., s, dv] temporary).
            hist_lse = hist_lse.view(BH, T, s_slots)
            hist_out = hist_out.view(BH, T, s_slots, dv)
            total = torch.logsumexp(torch.cat([lse[..., None], hist_lse], dim=-1), dim=-1)  # [BH, T]
            out = out * torch.exp(lse - total)[..., None]
            for slot in range(s_slots):
                out.add_(hist_out[:, :, slot] * torch.exp(hist_lse[:, :, slot] - total)[..., None])
            lse = total
        else:
            plan = None
            out, lse = out.contiguous(), lse.contiguous()

        ctx.block_size, ctx.scale, ctx.plan = block_size, scale, plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        block_size, scale, plan = ctx.block_size, ctx.scale, ctx.plan
        BH, T, dv = v.shape
        cdt = out.dtype
        d_out = d_out.to(cdt)
        # dS = P * (dP - D) with D = rowsum(dO * O); the LSE's own gradient adds P * dLSE.
        delta = (d_out * out).sum(dim=-1) - d_lse.to(cdt)  # [BH, T]
        causal = torch.ones(block_size, block_size, dtype=torch.bool, device=q.device).tril()

        qb, kb, vb = _blocked(q, block_size), _blocked(k, block_size), _blocked(v, block_size)
        dob, deltab = _blocked(d_out, block_size), _blocked(delta, block_size)
        lseb = _blocked(lse, block_size, fill=float("inf"))  # padded rows get P = 0
        dqb = torch.zeros(qb.shape, dtype=cdt, device=q.device)
        dkb = torch.zeros(kb.shape, dtype=cdt, device=q.device)
        dvb = torch.zeros(vb.shape, dtype=cdt, device=q.device)
        for sl in _own_tiles(qb.shape[0], block_size):
            dqb[sl], dkb[sl], dvb[sl] = _tile_backward(qb[sl], kb[sl], vb[sl], dob[sl], lseb[sl], deltab[sl],
                                                       scale, cdt, causal)
        dq = _unblocked(dqb, BH, T).contiguous()
        dk = _unblocked(dkb, BH, T).contiguous()
        dvv = _unblocked(dvb, BH, T).contiguous()

        if plan is not None:
            q2, k2, v2 = q.reshape(BH * T, -1), k.reshape(BH * T, -1), v.reshape(BH * T, dv)
            dq2, dk2, dv2 = dq.view(BH * T, -1), dk.view(BH * T, -1), dvv.view(BH * T, dv)
            lse2, delta2, do2 = lse.reshape(-1), delta.reshape(-1), d_out.reshape(BH * T, dv)
            for sl in plan.tiles():
                rows, key_rows = plan.rows[sl], plan.key_rows[sl]
                row_lse = lse2[rows].masked_fill(plan.pad[sl], float("inf"))  # padding entries: P = 0
                dq_t, dk_t, dv_t = _tile_backward(q2[rows], k2[key_rows], v2[key_rows], do2[rows], row_lse,
                                                  delta2[rows], scale, cdt)
                flat_keys = key_rows.reshape(-1)
                dv2.index_add_(0, flat_keys, dv_t.reshape(-1, dv))
                dk2.index_add_(0, flat_keys, dk_t.reshape(-1, dk2.shape[1]))
                dq2.index_add_(0, rows.reshape(-1), dq_t.reshape(-1, dq2.shape[1]))
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None, None


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, scale: float,
                   return_lse: bool = False):
    """MoBA attention, tiled (see the module docstring for the exact semantics).

    q, k [batch, heads, T, d_qk], v [batch, heads, T, d_v] -> out [batch, heads, T, d_v] in q's dtype,
    and with ``return_lse`` also the log-sum-exp of the attended scaled logits [batch, heads, T] in
    float32 (float64 for float64 inputs; differentiable). Arithmetic is in float32 (float64 for float64 inputs). With T <= block_size
    and no LSE requested this is exactly ``scaled_dot_product_attention(is_causal=True)``.
    """
    _check_inputs(q, k, v, block_size, top_k)
    Bt, h, T, _ = q.shape
    if T <= block_size and not return_lse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    idx = _select_blocks(q.detach(), k.detach(), block_size, top_k)
    flat = lambda x: x.reshape(Bt * h, T, x.shape[-1])  # noqa: E731
    out, lse = _MobaAttention.apply(flat(q), flat(k), flat(v), idx.reshape(Bt * h, T, -1), block_size, scale)
    out = out.view(Bt, h, T, -1)
    return (out, lse.view(Bt, h, T)) if return_lse else out


@torch.no_grad()
def moba_max_logit(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, scale: float,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head maximum of the scaled logits over the (query, key) pairs MoBA attends to, across the
    batch: [heads] float32. Tiled like ``moba_attention`` (no [T, T] matrix).

    valid [batch, T] bool: rows right-padded after their real tokens (True = real); padded queries
    are left out (the real ones attend only real keys, being causal)."""
    _check_inputs(q, k, None, block_size, top_k)
    Bt, h, T, d = q.shape
    BH = Bt * h
    if valid is not None and tuple(valid.shape) != (Bt, T):
        raise ValueError(f"valid must be [batch, T] = {[Bt, T]}; got {list(valid.shape)}")
    real_query = (torch.ones(BH * T, dtype=torch.bool, device=q.device) if valid is None
                  else valid.to(torch.bool)[:, None].expand(Bt, h, T).reshape(BH * T))
    cdt = torch.promote_types(q.dtype, torch.float32)
    q3, k3 = q.reshape(BH, T, d), k.reshape(BH, T, d)
    nb = -(-T // block_size)
    pos = torch.arange(block_size, device=q.device)
    causal = pos[None, :] <= pos[:, None]
    qb, kb = _blocked(q3, block_size), _blocked(k3, block_size)
    real_row = _blocked(real_query.view(BH, T, 1).float(), block_size)[..., 0] > 0  # [BH*nb, B]
    per_block = torch.empty(qb.shape[0], dtype=torch.float32, device=q.device)
    for sl in _own_tiles(qb.shape[0], block_size):
        allowed = causal & real_row[sl][:, :, None]
        per_block[sl] = _scores(qb[sl], kb[sl], scale, cdt).masked_fill(~allowed, float("-inf")).amax(dim=(1, 2))
    head_max = per_block.view(BH, nb).amax(dim=1)
    idx = _select_blocks(q, k, block_size, top_k).reshape(BH, T, -1)
    if idx.shape[-1]:
        plan = _HistoryPlan(idx, T, block_size)
        q2, k2 = q3.reshape(BH * T, d), k3.reshape(BH * T, d)
        for sl in plan.tiles():
            s = _scores(q2[plan.rows[sl]], k2[plan.key_rows[sl]], scale, cdt)
            skip = plan.pad[sl] | ~real_query[plan.rows[sl]]
            chunk_max = s.masked_fill(skip[..., None], float("-inf")).amax(dim=(1, 2)).float()
            head_max = head_max.scatter_reduce(0, plan.bh[sl], chunk_max, reduce="amax")
    return head_max.view(Bt, h).amax(dim=0)
