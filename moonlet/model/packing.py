"""Packed documents for the layers a mask cannot separate: KDA's recurrence and MoBA's block gating.

A packed training row holds several documents one after another (``segment_ids`` [B, T], -1 for
padding). Dense MLA keeps them apart with a [T, T] mask. A Kimi Delta Attention layer carries a
recurrent state and short convolutions from token to token, and a MoBA layer counts its key blocks
from position 0 of the row; neither can be told "start over here" by a mask. ``SegmentLayout``
instead moves each document to a row of its own, right-padded, runs the layer there, and puts the
outputs back: every document then goes through the layer exactly as if it were alone (its state
starts at zero, its convolutions see zeros before its first token, its MoBA blocks start at its
first token). Right padding is exact for both layers because they are causal: a real token never
reads a later (padded) one (KDA additionally gets the padding as ``pad_mask``; MoBA's gate only
scores complete blocks before the query's own block, which hold real tokens only).

Documents are grouped into buckets by length (rows of the next power of two, at least
``MIN_ROW``), one layer call per bucket, so the padded work stays under twice the real tokens
however uneven the documents are. Moving tokens is one gather in and one gather out per bucket
(no Python loop over tokens); padding tokens of the packed row (segment -1) get zeros from the
layer.

A document is the set of tokens with one segment id in a row, in order: the same rule as the MLA
mask (``segment_ids[t] == segment_ids[s]``), so all layers agree even if an id recurs.
"""

from __future__ import annotations

from typing import Callable

import torch

# Shortest row a bucket uses (shorter documents are padded up to it).
MIN_ROW = 16


class _Bucket:
    """Documents of one padded length: ``tokens`` [n, L] flat indices into the packed [B * T] tokens
    (0 in padded slots), ``valid`` [n, L] bool (True = a real token of the document)."""

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor):
        self.tokens = tokens
        self.valid = valid


class SegmentLayout:
    """Where each packed token goes when every document gets a row of its own, and back.

    segment_ids [B, T] integer: the document each token belongs to, -1 for padding.
    """

    def __init__(self, segment_ids: torch.Tensor, min_row: int = MIN_ROW):
        if segment_ids.dim() != 2 or segment_ids.dtype.is_floating_point:
            raise ValueError(f"segment_ids must be an integer [batch, seq] tensor; got {segment_ids.dtype} "
                             f"{tuple(segment_ids.shape)}")
        B, T = segment_ids.shape
        device = segment_ids.device
        self.shape = (B, T)
        seg = segment_ids.long().reshape(-1)
        real = seg >= 0
        num_real = int(real.sum())
        width = int(seg.max()) + 1 if num_real else 1
        row = torch.arange(B * T, device=device) // T
        key = torch.where(real, row * width + seg, B * width)  # padding sorts last
        order = torch.sort(key, stable=True).indices[:num_real]  # real tokens by (row, segment, position)
        _, counts = torch.unique_consecutive(key[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        length = torch.clamp(counts, min=1)
        padded = torch.clamp(2 ** torch.ceil(torch.log2(length.double())).long(), min=min_row)
        # out_rows[token]: the token's row in the concatenated bucket outputs; num_real = the zero row
        self.out_rows = torch.full((B * T,), num_real, dtype=torch.long, device=device)
        self.buckets: list[_Bucket] = []
        offset = 0
        for L in sorted(set(padded.tolist())):
            docs = (padded == L).nonzero().squeeze(1)
            slot = torch.arange(L, device=device)
            valid = slot[None, :] < counts[docs, None]  # [n, L]
            pos = (starts[docs, None] + slot[None, :]).clamp(max=max(num_real - 1, 0))
            tokens = torch.where(valid, order[pos], 0) if num_real else torch.zeros_like(pos)
            n_valid = int(valid.sum())
            self.out_rows[tokens[valid]] = offset + torch.arange(n_valid, device=device)
            offset += n_valid
            self.buckets.append(_Bucket(tokens, valid))

    def apply(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """Run ``fn`` with each document in a row of its own.

        xs: packed tensors [B, T, ...]. ``fn(*rows, valid)`` gets them as [n, L, ...] (zeros in the
        padded slots) with ``valid`` [n, L] bool, and returns [n, L, ...] (only the valid slots are
        kept). Returns the outputs in the packed layout [B, T, ...], zeros at padding tokens.
        """
        B, T = self.shape
        for x in xs:
            if tuple(x.shape[:2]) != (B, T):
                raise ValueError(f"packed tensors must start with [batch, seq] = {[B, T]}; got {list(x.shape)}")
        outs = []
        for bucket in self.buckets:
            rows = []
            for x in xs:
                flat = x.reshape(B * T, *x.shape[2:])
                keep = bucket.valid.view(*bucket.valid.shape, *([1] * (x.dim() - 2)))
                rows.append(torch.where(keep, flat[bucket.tokens], flat.new_zeros(())))
            outs.append(fn(*rows, bucket.valid)[bucket.valid])
        if not outs:  # nothing but padding: a zero output of fn's shape needs one call
            raise ValueError("segment_ids mark every token as padding (-1); nothing to run")
        y = torch.cat(outs)
        y = torch.cat([y, y.new_zeros(1, *y.shape[1:])])
        return y[self.out_rows].view(B, T, *y.shape[1:])
