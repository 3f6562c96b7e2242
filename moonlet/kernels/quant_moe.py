"""Routed experts over quantized (block-FP8 or group-INT4) weights, without dequantizing them in memory.

The quantized counterpart of ``moonlet.kernels.moe``: ``stack_quantized_experts`` copies the experts'
stored tensors into stacks (a leading expert dimension), and each expert module's buffers are then
re-pointed at its slice (``MoE.fuse_experts``), so memory is not doubled and state_dict keeps the hub
names and the file's bytes. Layout (G groups: the routed experts, then optionally the shared expert):

    gate, up: QuantizedMatrix stacks of [G] x [I, H]    down: [G] x [H, I]

Gate and up stay separate stacks (not one [2I, H] matrix as in the dense path): an FP8 scale block
of 128 rows would straddle the two when I is not a multiple of 128, and the Triton kernel computes
both products in one tile anyway.

Two ways to compute Σ_k weights[t, k] · expert_{indices[t, k]}(x[t]):

- ``quant_grouped_experts_reference`` (CPU, and CUDA without Triton): for each expert that has tokens,
  dequantize its three matrices (``moonlet.quant``) and run the SwiGLU on its rows. It reads the
  per-expert token counts on the host.
- ``quant_grouped_experts_triton`` (CUDA): the fused-MoE layout. Slots are sorted by expert and each
  expert's slots padded to a multiple of BLOCK_M (``align_slots``: static shapes, no host sync), then
  two launches of ``moonlet.kernels.quant_linear._quant_gemm_kernel``: gate+up with SwiGLU fused
  (A rows = the slots' tokens), then down (A rows = the slots). Rows are put back in token order and
  weighted as in ``grouped_experts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import quant_linear
from .quant_linear import QuantizedMatrix


@dataclass
class QuantStackedExperts:
    """Stacked quantized SwiGLU expert weights (layout in the module docstring)."""

    gate: QuantizedMatrix  # [G] x [I, H]
    up: QuantizedMatrix  # [G] x [I, H]
    down: QuantizedMatrix  # [G] x [H, I]
    hidden_size: int
    intermediate_size: int
    shared_slot: bool  # the last group is a shared expert every token uses with weight 1

    @property
    def num_groups(self) -> int:
        return self.gate.data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gate.data.device

    @property
    def kind(self) -> str:
        return self.gate.kind

    def views(self, group: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """((data, scale) of gate, of up, of down) of one group: views into the stacked storage."""
        return tuple((m.data[group], m.scale[group]) for m in (self.gate, self.up, self.down))

    def nbytes(self) -> int:
        return self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()


def _stack(mats: list[QuantizedMatrix]) -> QuantizedMatrix:
    first = mats[0]
    for m in mats[1:]:
        if (m.kind, m.shape, m.block, m.data.dtype, m.scale.dtype) != (
                first.kind, first.shape, first.block, first.data.dtype, first.scale.dtype):
            raise ValueError(f"cannot stack quantized experts of different formats: {first.kind} {first.shape} "
                             f"blocks {first.block} vs {m.kind} {m.shape} blocks {m.block}")
    return QuantizedMatrix(first.kind, torch.stack([m.data for m in mats]), torch.stack([m.scale for m in mats]),
                           first.shape, first.block)


def stack_quantized_experts(gates: list[QuantizedMatrix], ups: list[QuantizedMatrix], downs: list[QuantizedMatrix],
                            shared_slot: bool = False) -> QuantStackedExperts:
    """Copy per-expert quantized matrices (gate/up [I, H], down [H, I]) into new stacks on their device,
    bytes unchanged."""
    gate, up, down = _stack(gates), _stack(ups), _stack(downs)
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter) or up.kind != gate.kind or down.kind != gate.kind:
        raise ValueError(f"experts need gate/up [I, H] and down [H, I] of one format; got gate {gate.kind} "
                         f"{gate.shape}, up {up.kind} {up.shape}, down {down.kind} {down.shape}")
    return QuantStackedExperts(gate, up, down, hidden, inter, shared_slot)


def _with_shared_slot(weights, indices, experts):
    if experts.shared_slot:
        n = indices.shape[0]
        weights = torch.cat([weights, weights.new_ones(n, 1)], dim=1)
        indices = torch.cat([indices, indices.new_full((n, 1), experts.num_groups - 1)], dim=1)
    return weights, indices


def quant_grouped_experts_reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                                    experts: QuantStackedExperts, skip_outside: bool = False) -> torch.Tensor:
    """Σ_k weights[t, k] · expert_{indices[t, k]}(x[t]) (+ the shared slot), each expert dequantized to
    x.dtype (only the experts some token chose) and applied as ``MLP`` does. x [N, H] -> [N, H] in x.dtype;
    each expert output is rounded to x.dtype, weighted in float32 and rounded once, and a token's
    slots are summed in float32, as in ``grouped_experts``."""
    n, hidden = x.shape
    weights, indices = _with_shared_slot(weights, indices, experts)
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    # skip_outside (expert parallelism): index num_groups marks a slot another rank computes (adds 0)
    counts = torch.bincount(flat, minlength=experts.num_groups).tolist()[:experts.num_groups]
    y = x.new_zeros(n * k, hidden) if skip_outside else x.new_empty(n * k, hidden)
    start = 0
    for g, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        rows = x.index_select(0, slots // k)
        gate = F.linear(rows, experts.gate.dequantize(x.dtype, g))
        up = F.linear(rows, experts.up.dequantize(x.dtype, g))
        y[slots] = F.linear(F.silu(gate) * up, experts.down.dequantize(x.dtype, g))
        start += count
    y = y * weights.reshape(-1, 1)  # float32, one rounding below
    return y.view(n, k, hidden).sum(dim=1).to(x.dtype)


def align_slots(indices: torch.Tensor, num_groups: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused-MoE row layout, computed on the device without reading values back.

    indices [N, k] (group of each slot) -> (rows [R] int32: slot ids expert by expert, each expert's run
    padded to a multiple of ``block_m`` with the sentinel N·k; block_groups [R / block_m] int32: the
    expert of each block_m-row tile, -1 past the last). R = N·k + min(G, N·k)·(block_m - 1) rounded up
    to block_m: an upper bound that depends only on the shapes (so a CUDA graph can capture it).
    Slots of index ``num_groups`` or more (expert parallelism: another rank's experts) get no row.
    """
    flat = indices.reshape(-1)
    slots = flat.numel()
    sorted_ids, order = flat.sort(stable=True)
    groups = torch.arange(num_groups, device=flat.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, groups, right=True)
    starts = torch.searchsorted(sorted_ids, groups, right=False)
    padded = (ends - starts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    total = slots + min(num_groups, slots) * (block_m - 1)
    total = (total + block_m - 1) // block_m * block_m
    mine = sorted_ids < num_groups
    group = sorted_ids.clamp(max=num_groups - 1)
    position = torch.arange(slots, device=flat.device) - starts[group] + padded_starts[group]
    position = torch.where(mine, position, total)  # other ranks' slots land in one extra row, dropped
    rows = torch.full((total + 1,), slots, device=flat.device, dtype=torch.int32)
    rows.scatter_(0, position, order.to(torch.int32))
    rows = rows[:total]
    tile_starts = torch.arange(0, total, block_m, device=flat.device, dtype=padded_ends.dtype)
    block_groups = torch.searchsorted(padded_ends, tile_starts, right=True)
    block_groups = torch.where(block_groups < num_groups, block_groups, -1).to(torch.int32)
    return rows, block_groups


def quant_grouped_experts_triton(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                                 experts: QuantStackedExperts, *, block_m: int | None = None,
                                 skip_outside: bool = False) -> torch.Tensor:
    """Same contract as ``quant_grouped_experts_reference``; the two GEMMs read the stacks quantized
    (``_quant_gemm_kernel`` in grouped mode). No host sync."""
    n, hidden = x.shape
    weights, indices = _with_shared_slot(weights, indices, experts)
    k = indices.shape[1]
    slots = n * k
    bm = block_m or quant_linear.block_m_for(slots // max(1, min(experts.num_groups, slots)))
    rows, block_groups = align_slots(indices, experts.num_groups, bm)
    inter = experts.intermediate_size
    act = x.new_empty(slots, inter)
    quant_linear.launch_grouped(x, rows, block_groups, experts.gate, experts.up, act, slots, k, bm)
    y = x.new_zeros(slots, hidden) if skip_outside else x.new_empty(slots, hidden)  # skipped slots: no row
    quant_linear.launch_grouped(act, rows, block_groups, experts.down, None, y, slots, 1, bm)
    y = y * weights.reshape(-1, 1)
    return y.view(n, k, hidden).sum(dim=1).to(x.dtype)


def quant_grouped_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                          experts: QuantStackedExperts, skip_outside: bool = False) -> torch.Tensor:
    """The Triton path on CUDA when it can run there (``quant_linear.available``), else the reference.
    ``skip_outside`` as in ``moonlet.kernels.moe.grouped_experts``."""
    if x.is_cuda and quant_linear.available(experts.kind):
        return quant_grouped_experts_triton(x, weights, indices, experts, skip_outside=skip_outside)
    return quant_grouped_experts_reference(x, weights, indices, experts, skip_outside=skip_outside)
