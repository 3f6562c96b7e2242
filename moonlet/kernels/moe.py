"""Routed experts as grouped GEMMs over expert-sorted tokens.

The reference is ``MoE.route_tokens`` (a Python loop over experts). Here every (token, slot) pair
is sorted by expert, the sorted rows go through two ``torch.nn.functional.grouped_mm`` calls
(gate+up, then down) against the experts' stacked weights, and the rows are put back in token
order and summed over the slots. Every shape depends only on the number of tokens, and nothing
reads a tensor's values on the host, so the forward can be captured in a CUDA graph.

Layout of the stacked weights (G groups: the routed experts, then optionally the shared expert):
    gate_up [G, 2I', H']  rows [0, I) are gate_proj, rows [I', I'+I) are up_proj
    down    [G, H', I']   columns [0, I) are down_proj
where I' and H' are I and H rounded up to ``ALIGN`` with zero padding. The zeros keep the padded
activations at silu(0)·0 = 0, so padding changes no result. The padding exists because the CUDA
grouped GEMM (CUTLASS with TMA, sm90/sm100) needs 16-byte aligned row strides; every published
K2/DeepSeek shape is already aligned and gets no padding.

On CUDA, ``grouped_mm`` takes its sync-free kernel only for bfloat16 operands on sm90/sm100; other
dtypes or GPUs go through torch's fallback, which copies the group offsets to the host (correct,
but not capturable in a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Elements to which H and I are padded: 16 bytes of bf16/fp16 (and a multiple of fp32's 4).
ALIGN = 8

GROUPED_MM_AVAILABLE = hasattr(F, "grouped_mm")


def round_up(n: int, multiple: int = ALIGN) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class StackedExperts:
    """Stacked SwiGLU expert weights (layout in the module docstring)."""

    gate_up: torch.Tensor  # [G, 2I', H']
    down: torch.Tensor  # [G, H', I']
    hidden_size: int  # H (unpadded)
    intermediate_size: int  # I (unpadded)
    shared_slot: bool  # the last group is a shared expert every token uses with weight 1

    @property
    def num_groups(self) -> int:
        return self.gate_up.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    def views(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of one group: views into the stacked storage."""
        i, h, ip = self.intermediate_size, self.hidden_size, self.down.shape[-1]
        return self.gate_up[group, :i, :h], self.gate_up[group, ip:ip + i, :h], self.down[group, :h, :i]


def stack_experts(gates, ups, downs, shared_slot: bool = False) -> StackedExperts:
    """Copy per-expert weights (lists of gate [I, H], up [I, H], down [H, I]) into new stacked
    tensors on their device and in their dtype. Padding (when H or I is not a multiple of ALIGN) is zero."""
    first = gates[0]
    inter, hidden = first.shape
    ip, hp = round_up(inter), round_up(hidden)
    alloc = torch.zeros if (ip, hp) != (inter, hidden) else torch.empty
    n = len(gates)
    stacked = StackedExperts(
        gate_up=alloc(n, 2 * ip, hp, dtype=first.dtype, device=first.device),
        down=alloc(n, hp, ip, dtype=first.dtype, device=first.device),
        hidden_size=hidden, intermediate_size=inter, shared_slot=shared_slot,
    )
    with torch.no_grad():
        for g, (gate, up, down) in enumerate(zip(gates, ups, downs)):
            for dst, src in zip(stacked.views(g), (gate, up, down)):
                dst.copy_(src)
    return stacked


def sort_by_group(indices: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N, k] (group of each slot) -> (order [N*k]: flat slot ids sorted by group, stable;
    offs [G] int32: end of each group's rows in the sorted order, as grouped_mm wants them)."""
    sorted_ids, order = indices.reshape(-1).sort(stable=True)
    groups = torch.arange(num_groups, device=indices.device, dtype=sorted_ids.dtype)
    # searchsorted instead of bincount: a static output size and no host sync.
    offs = torch.searchsorted(sorted_ids, groups, right=True, out_int32=True)
    return order, offs


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                    experts: StackedExperts, skip_outside: bool = False) -> torch.Tensor:
    """Σ_k weights[t, k] · expert_{indices[t, k]}(x[t]) (+ the shared expert when ``experts.shared_slot``).

    x [N, H]; weights [N, k] (float32 from the router); indices [N, k] in [0, num routed experts).
    Inference only: no autograd (training uses the per-expert loop).
    ``skip_outside`` (expert parallelism): an index of ``num_groups`` marks a slot another rank
    computes; such slots sort after every group, grouped_mm leaves their rows unwritten, and they add 0.
    Quantized stacks (``moonlet.kernels.quant_moe.QuantStackedExperts``) go to ``quant_grouped_experts``.
    Returns [N, H] in x.dtype. As in the per-expert loop, each expert's output is rounded to x.dtype
    and its product with the float32 routing weight is computed in float32 and rounded once; the sum
    over a token's slots then accumulates in float32 (the loop adds in x.dtype) and is
    deterministic (a reduction, no atomics).
    """
    if not isinstance(experts, StackedExperts):
        from .quant_moe import quant_grouped_experts

        return quant_grouped_experts(x, weights, indices, experts, skip_outside=skip_outside)
    n, hidden = x.shape
    if experts.shared_slot:
        weights = torch.cat([weights, weights.new_ones(n, 1)], dim=1)
        indices = torch.cat([indices, indices.new_full((n, 1), experts.num_groups - 1)], dim=1)
    k = indices.shape[1]
    order, offs = sort_by_group(indices, experts.num_groups)
    token_of = order // k  # [N*k]: the token each sorted row belongs to
    rows = x.index_select(0, token_of)  # [N*k, H]
    hp = experts.gate_up.shape[-1]
    if hp != hidden:
        rows = F.pad(rows, (0, hp - hidden))
    h = F.grouped_mm(rows, experts.gate_up.transpose(1, 2), offs=offs)  # [N*k, 2I']
    ip = experts.down.shape[-1]
    act = F.silu(h[:, :ip]).mul_(h[:, ip:])  # [N*k, I']; in place: big CPU temporaries cost page faults
    y = F.grouped_mm(act, experts.down.transpose(1, 2), offs=offs)  # [N*k, H']
    # Each row times its routing weight: computed in float32 (the weights' dtype), rounded once to x.dtype.
    y.mul_(weights.reshape(-1).index_select(0, order).unsqueeze(-1))
    if skip_outside:  # rows past the last group's end hold whatever the allocator left there
        computed = indices.reshape(-1).index_select(0, order) < experts.num_groups
        y = torch.where(computed.unsqueeze(-1), y, y.new_zeros(()))
    # Back to token order: row j of y belongs to flat slot order[j]. A gather through the inverse
    # permutation (no accumulation, deterministic; index_copy_ is far slower on CPU).
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    out = y.index_select(0, inverse).view(n, k, hp).sum(dim=1)  # [N, H']; accumulates in float32
    return out if hp == hidden else out[:, :hidden].contiguous()


def fuse_moe_experts(model: torch.nn.Module) -> int:
    """Switch every MoE layer of ``model`` that supports it onto the grouped-GEMM path for inference
    (``MoE.fuse_experts``). Returns how many layers were fused; 0 when this torch has no grouped_mm,
    in which case the per-expert loop stays in use."""
    if not GROUPED_MM_AVAILABLE:
        return 0
    fused = 0
    for module in model.modules():
        fuse = getattr(module, "fuse_experts", None)
        if callable(fuse):
            fuse()
            fused += 1
    return fused
