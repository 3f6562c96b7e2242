"""Per-sequence recurrent state for the KDA layers of hybrid models (Kimi Linear) in the engine.

A KDA layer has no per-token cache: each sequence carries, per layer, the last (kernel − 1) inputs of
its three short convolutions and the delta-rule state S [heads, d_k, d_v] (float32). The engine keeps
them in fixed slots, one per running sequence: ``KVCacheManager`` hands a sequence a slot together
with its first blocks and takes it back whenever it frees the sequence's blocks (finish, abort,
preemption).

Prefix caching needs more: a hit skips the cached prefix's tokens, so their state must come from
somewhere. Behind the slots the same tensors hold snapshot rows: copies of some sequence's state
right after a block boundary, which ``cache.StateSnapshots`` names by the prefix they follow. Before
a step, each scheduled sequence that starts at token 0 gets its slot zeroed, and one resuming after
a prefix hit gets the snapshot copied in (``begin_step``); during the step, the forward copies the
states the scheduler asked for into their snapshot rows, splitting a prefill chunk at the boundary
when the boundary lies inside it (two calls of the layer instead of one, no extra step).

A step's tokens are laid out decodes first, then prefill chunks (``BatchLayout``). The decodes run as
one batch of single-token sequences over their gathered states; each prefill chunk runs over its
sequence's state (from zeros when the chunk starts the sequence). New states are written back to
the slots after each layer.
"""

from __future__ import annotations

import torch

from ..model.kda import KDAState


class RecurrentStates:
    """The KDA layers' state rows: for each KDA layer, q/k/v conv states [rows, kernel − 1, H·d] in the
    model's dtype and S [rows, H, d, d] in float32. Rows 0 .. num_slots − 1 are the running sequences'
    slots, the next num_snapshots rows the snapshots (snapshot r is row num_slots + r)."""

    def __init__(self, config, num_slots: int, dtype: torch.dtype, device, num_snapshots: int = 0):
        lin = config.linear_attn_config
        H, d, k = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        self.num_slots, self.num_snapshots = num_slots, num_snapshots
        self.device = device
        rows = num_slots + num_snapshots
        self.states: dict[int, KDAState] = {
            layer: KDAState(*(torch.zeros(rows, k - 1, H * d, dtype=dtype, device=device) for _ in range(3)),
                            torch.zeros(rows, H, d, d, dtype=torch.float32, device=device))
            for layer in config.kda_layer_ids
        }
        # this step's snapshot copies: decodes (slots, rows) as index tensors; prefill chunks by slot
        self._decode_saves: tuple[torch.Tensor, torch.Tensor] | None = None
        self._chunk_saves: dict[int, tuple[int, int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states.values() for t in s)

    def begin_step(self, inits: list[tuple[int, int | None]], saves: list[tuple[int, int, int]],
                   decode_slots: list[int]) -> None:
        """Before a forward: load the slots in ``inits`` ((slot, snapshot or None for zeros)), and note
        ``saves`` ((slot, offset, snapshot): copy the slot's state after its first ``offset`` new
        tokens) for ``run``. ``decode_slots``: the step's single-token sequences' slots."""
        for slot, snap in inits:
            for s in self.states.values():
                for t in s:
                    if snap is None:
                        t[slot].zero_()
                    else:
                        t[slot].copy_(t[self.num_slots + snap])
        decodes = set(decode_slots)
        dec = [(slot, self.num_slots + snap) for slot, _, snap in saves if slot in decodes]
        self._decode_saves = None
        if dec:
            src, dst = zip(*dec)
            self._decode_saves = (torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))
        self._chunk_saves = {slot: (offset, self.num_slots + snap) for slot, offset, snap in saves
                             if slot not in decodes}

    def end_step(self) -> None:
        self._decode_saves, self._chunk_saves = None, {}

    def _gather(self, layer: int, slots: torch.Tensor) -> KDAState:
        return KDAState(*(t.index_select(0, slots) for t in self.states[layer]))

    def _scatter(self, layer: int, slots: torch.Tensor, new: KDAState) -> None:
        for dst, src in zip(self.states[layer], new):
            dst.index_copy_(0, slots, src.to(dst.dtype))

    def _write(self, layer: int, row: int, new: KDAState) -> None:
        for dst, src in zip(self.states[layer], new):
            dst[row].copy_(src[0])

    def run(self, layer: int, module: torch.nn.Module, x: torch.Tensor, layout) -> torch.Tensor:
        """x [1, N, hidden] (the step's tokens, laid out as ``layout``) -> the KDA layer's output
        [1, N, hidden]; the sequences' states advance past their tokens (and are snapshotted where
        ``begin_step`` said)."""
        out = torch.empty_like(x)
        nd = layout.num_decodes
        if nd:
            slots = layout.decode_state_slots
            y, new = module(x[0, :nd, None], state=self._gather(layer, slots), return_state=True)  # [nd, 1, hidden]
            out[0, :nd] = y[:, 0]
            self._scatter(layer, slots, new)
            if self._decode_saves is not None:
                src, dst = self._decode_saves
                for t in self.states[layer]:
                    t.index_copy_(0, dst, t.index_select(0, src))
        for span in layout.prefills:
            s, e = span.start, span.start + span.num_tokens
            slot = span.state_slot
            fresh = span.ctx_len == span.num_tokens  # the chunk starts the sequence: no state to read
            state = None if fresh else KDAState(*(t[slot:slot + 1] for t in self.states[layer]))  # views
            offset, row = self._chunk_saves.get(slot, (span.num_tokens, None))
            if offset < span.num_tokens:  # a snapshot inside the chunk: run up to it, copy, go on
                y, state = module(x[:, s:s + offset], state=state, return_state=True)
                out[:, s:s + offset] = y
                self._write(layer, row, state)
                s = s + offset
            y, new = module(x[:, s:e], state=state, return_state=True)
            out[:, s:e] = y
            self._write(layer, slot, new)
            if row is not None and offset == span.num_tokens:
                self._write(layer, row, new)
        return out
