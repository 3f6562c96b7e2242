"""Per-sequence recurrent state for the KDA layers of hybrid models (Kimi Linear) in the engine.

A KDA layer has no per-token cache: each sequence carries, per layer, the last (kernel − 1) inputs of
its three short convolutions and the delta-rule state S [heads, d_k, d_v] (float32). The engine keeps
them in fixed slots, one per running sequence: ``KVCacheManager`` hands a sequence a slot together
with its first blocks and takes it back whenever it frees the sequence's blocks (finish, abort,
preemption).

A step's tokens are laid out decodes first, then prefill chunks (``BatchLayout``). The decodes run as
one batch of single-token sequences over their gathered states; each prefill chunk runs over its
sequence's state, or from zeros when the chunk starts the sequence (position 0: a fresh request or
one recomputed after preemption), so a stale slot is never read. New states are written back to
the slots after each layer.

Prefix caching cannot skip tokens of a model with KDA layers (their state after the prefix is not
in the paged cache), so the engine turns it off for such models.
"""

from __future__ import annotations

import torch

from ..model.kda import KDAState


class RecurrentStates:
    """The KDA layers' state slots: for each KDA layer, q/k/v conv states [slots, kernel − 1, H·d] in
    the model's dtype and S [slots, H, d, d] in float32."""

    def __init__(self, config, num_slots: int, dtype: torch.dtype, device):
        lin = config.linear_attn_config
        H, d, k = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        self.num_slots = num_slots
        self.states: dict[int, KDAState] = {
            layer: KDAState(*(torch.zeros(num_slots, k - 1, H * d, dtype=dtype, device=device) for _ in range(3)),
                            torch.zeros(num_slots, H, d, d, dtype=torch.float32, device=device))
            for layer in config.kda_layer_ids
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states.values() for t in s)

    def _gather(self, layer: int, slots: torch.Tensor) -> KDAState:
        return KDAState(*(t.index_select(0, slots) for t in self.states[layer]))

    def _scatter(self, layer: int, slots: torch.Tensor, new: KDAState) -> None:
        for dst, src in zip(self.states[layer], new):
            dst.index_copy_(0, slots, src.to(dst.dtype))

    def run(self, layer: int, module: torch.nn.Module, x: torch.Tensor, layout) -> torch.Tensor:
        """x [1, N, hidden] (the step's tokens, laid out as ``layout``) -> the KDA layer's output
        [1, N, hidden]; the sequences' states advance past their tokens."""
        out = torch.empty_like(x)
        nd = layout.num_decodes
        if nd:
            slots = layout.decode_state_slots
            y, new = module(x[0, :nd, None], state=self._gather(layer, slots), return_state=True)  # [nd, 1, hidden]
            out[0, :nd] = y[:, 0]
            self._scatter(layer, slots, new)
        for span in layout.prefills:
            s, e = span.start, span.start + span.num_tokens
            slot = slice(span.state_slot, span.state_slot + 1)  # a view: no index tensor per layer and chunk
            fresh = span.ctx_len == span.num_tokens  # the chunk starts the sequence: no state to read
            state = None if fresh else KDAState(*(t[slot] for t in self.states[layer]))
            y, new = module(x[:, s:e], state=state, return_state=True)
            out[:, s:e] = y
            for dst, src in zip(self.states[layer], new):
                dst[slot].copy_(src)
        return out
