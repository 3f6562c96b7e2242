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
states the scheduler asked for into their snapshot rows, splitting a prefill chunk at each boundary
that lies inside it (a branch point and the prompt's last boundary: up to three calls of the layer
instead of one, no extra step).

A step's tokens are laid out decodes first, then prefill chunks (``BatchLayout``). The decodes run as
one batch of single-token sequences over their gathered states; each prefill chunk runs over its
sequence's state (from zeros when the chunk starts the sequence). New states are written back to
the slots after each layer.

Decode steps replayed from CUDA graphs (``cuda_graph.DecodeGraphs``) use the same decode code with
a static slot index; their padding rows point at one more row, the scratch row, that no sequence or
snapshot uses. The loads and snapshot copies of such a step run outside the graph, before and after
the replay (``load``, ``copy_to_snapshots``): a decode's state after the step is the one to copy.
"""

from __future__ import annotations

import torch

from ..model.kda import KDAState


class RecurrentStates:
    """The KDA layers' state rows (``num_heads``: H when it is not the config's, as on a tensor-parallel
    rank): for each KDA layer, q/k/v conv states [rows, kernel − 1, H·d] in the
    model's dtype and S [rows, H, d, d] in float32. Rows 0 .. num_slots − 1 are the running sequences'
    slots, the next num_snapshots rows the snapshots (snapshot r is row num_slots + r), and with
    ``scratch_row=True`` one last row for the padding rows of decode graphs (``self.scratch_row``)."""

    def __init__(self, config, num_slots: int, dtype: torch.dtype, device, num_snapshots: int = 0,
                 scratch_row: bool = False, num_heads: int | None = None):
        lin = config.linear_attn_config
        H, d, k = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        if num_heads is not None:  # a tensor-parallel rank: its share of the heads
            H = num_heads
        self.num_slots, self.num_snapshots = num_slots, num_snapshots
        self.device = device
        rows = num_slots + num_snapshots + (1 if scratch_row else 0)
        self.scratch_row: int | None = rows - 1 if scratch_row else None
        self.states: dict[int, KDAState] = {
            layer: KDAState(*(torch.zeros(rows, k - 1, H * d, dtype=dtype, device=device) for _ in range(3)),
                            torch.zeros(rows, H, d, d, dtype=torch.float32, device=device))
            for layer in config.kda_layer_ids
        }
        # this step's snapshot copies: decodes (slots, rows) as index tensors; prefill chunks by slot,
        # (offset, row) pairs in increasing offset
        self._decode_saves: tuple[torch.Tensor, torch.Tensor] | None = None
        self._chunk_saves: dict[int, list[tuple[int, int]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states.values() for t in s)

    def copy_rows(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole rows (absolute indices: slot r is row r, snapshot s row num_slots + s): speculative
        decoding's corrections after a verification — a slot back to the state after its accepted
        tokens, and snapshots of boundaries that accepted drafts crossed (``EngineCore.step``). In order:
        a later copy may read a row an earlier one wrote."""
        for src, dst in copies:
            for s in self.states.values():
                for t in s:
                    t[dst].copy_(t[src])

    def load(self, inits: list[tuple[int, int | None]]) -> None:
        """Load the slots in ``inits``: (slot, snapshot) copies the snapshot in, (slot, None) zeros it."""
        for slot, snap in inits:
            for s in self.states.values():
                for t in s:
                    if snap is None:
                        t[slot].zero_()
                    else:
                        t[slot].copy_(t[self.num_slots + snap])

    def begin_step(self, inits: list[tuple[int, int | None]], saves: list[tuple[int, int, int]],
                   decode_slots: list[int], copies: list[tuple[int, int]] = ()) -> None:
        """Before a forward: run the row ``copies`` (``copy_rows``), load the slots in ``inits``
        ((slot, snapshot or None for zeros)), and note ``saves`` ((slot, offset, snapshot): copy the
        slot's state after its first ``offset`` new tokens) for ``run``. ``decode_slots``: the step's
        single-token sequences' slots."""
        self.copy_rows(list(copies))
        self.load(inits)
        decodes = set(decode_slots)
        dec = [(slot, self.num_slots + snap) for slot, _, snap in saves if slot in decodes]
        self._decode_saves = None
        if dec:
            src, dst = zip(*dec)
            self._decode_saves = (torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))
        self._chunk_saves = {}
        for slot, offset, snap in sorted(saves, key=lambda save: save[1]):
            if slot not in decodes:
                self._chunk_saves.setdefault(slot, []).append((offset, self.num_slots + snap))

    def end_step(self) -> None:
        self._decode_saves, self._chunk_saves = None, {}

    def copy_to_snapshots(self, saves: list[tuple[int, int, int]]) -> None:
        """After a decode-only step run without ``begin_step`` (a decode graph): copy each saved slot's
        state into its snapshot row (every offset is 1: the state after the step)."""
        if not saves:
            return
        src = torch.tensor([slot for slot, _, _ in saves], device=self.device)
        dst = torch.tensor([self.num_slots + snap for _, _, snap in saves], device=self.device)
        for s in self.states.values():
            for t in s:
                t.index_copy_(0, dst, t.index_select(0, src))

    def clear_scratch(self) -> None:
        """Zero the scratch row, so that padding rows decode from a fresh state (capturable: no host sync)."""
        for s in self.states.values():
            for t in s:
                t[self.scratch_row].zero_()

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
            done = 0  # tokens of the chunk run so far
            for offset, row in self._chunk_saves.get(slot, ()):  # snapshots: run up to each, copy, go on
                if offset > done:
                    y, state = module(x[:, s + done:s + offset], state=state, return_state=True)
                    out[:, s + done:s + offset] = y
                    done = offset
                self._write(layer, row, state)
            if done < span.num_tokens:
                y, state = module(x[:, s + done:e], state=state, return_state=True)
                out[:, s + done:e] = y
            self._write(layer, slot, state)
        return out
