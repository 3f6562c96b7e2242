"""Distributed MuonClip: optimizer state partitioned over data-parallel ranks (ZeRO-1), as in
Moonlight's "Distributed Muon".

Plain data parallelism all-reduces every gradient and then every rank runs the whole optimizer:
each holds all momentum / Adam moments and repeats every Newton–Schulz iteration. Here each
parameter, as a whole matrix, has one owner rank (:func:`plan_owners`), and one step is

1. ``reduce_gradients``: one reduce-scatter over a flat buffer laid out as [rank 0's parameters |
   rank 1's | ...] (each segment padded to the longest), so each owner receives the summed
   gradients of its own parameters and nothing else. Newton–Schulz needs the full gradient matrix;
   since ownership is per matrix, the owner has it without a further gather.
2. ``clip_grad_norm_``: the exact global norm — every rank contributes the norms of the
   parameters it owns, one all-reduce of a vector with one entry per parameter.
3. ``step``: each owner runs MuonClip's Muon / AdamW update on its parameters only (and only it
   ever creates their state), then one all-gather of the same flat layout gives every rank all
   updated parameters, then QK-Clip runs on every rank identically (maxima all-reduced with MAX).

The reduce-scatter plus all-gather move the same bytes as the all-reduce they replace. Per rank,
optimizer-state memory and optimizer compute drop to about 1/world. With two ranks the result
equals the replicated optimizer on the summed gradients bit for bit (a + b is exact either way).

Checkpoints: ``state_dict()`` holds only this rank's shard, keyed by the global parameter index
(the index a replicated ``MuonClip.state_dict()`` uses), so shards from any world size merge into
one full state (:func:`read_optimizer_shards`) and any optimizer, sharded or not, can load it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .muonclip import MuonClip, grad_norm_and_clip


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> float:
    """Multiply-adds ×2 of ``steps`` Newton–Schulz iterations on a matrix of ``shape``: per
    iteration X·Xᵀ (2s²l), S·S (2s³) and (bS + cS²)·X (2s²l), with s, l the short and long side."""
    s, l = min(shape), max(shape)
    return float(steps) * (4.0 * s * s * l + 2.0 * s ** 3)


def plan_owners(specs: Sequence[tuple[Sequence[int], bool]], world: int, ns_steps: int = 5) -> list[int]:
    """Owner rank of each parameter, given ``(shape, uses_muon)`` per parameter in optimizer order.

    Muon matrices are placed first, largest Newton–Schulz cost first, each onto the rank with the
    least Newton–Schulz work so far (longest-processing-time greedy), so that compute is balanced.
    The AdamW tensors (cheap element-wise updates but two state tensors each) then go, largest
    first, to the rank with the least optimizer-state elements so far (Muon momentum included),
    so that memory is balanced. Ties go to the lower rank and the lower index: the plan depends
    only on shapes and world size, so every rank computes the same one. Ranks may own nothing
    when there are fewer parameters than ranks."""
    if world < 1:
        raise ValueError(f"world size must be >= 1; got {world}")
    owners = [0] * len(specs)
    numel = [int(torch.Size(shape).numel()) for shape, _ in specs]
    work = [0.0] * world
    state = [0] * world
    muon = sorted((i for i, (_, m) in enumerate(specs) if m),
                  key=lambda i: (-newton_schulz_flops(specs[i][0], ns_steps), i))
    for i in muon:
        if len(specs[i][0]) != 2:
            raise ValueError(f"parameter {i} uses Muon but has shape {tuple(specs[i][0])}; Muon needs 2-D matrices")
        r = min(range(world), key=lambda k: (work[k], k))
        owners[i] = r
        work[r] += newton_schulz_flops(specs[i][0], ns_steps)
        state[r] += numel[i]
    adam = sorted((i for i, (_, m) in enumerate(specs) if not m), key=lambda i: (-numel[i], i))
    for i in adam:
        r = min(range(world), key=lambda k: (state[k], k))
        owners[i] = r
        state[r] += 2 * numel[i]
    return owners


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor], group=None) -> None:
    """Replicated data parallelism: sum every gradient over the ranks in one flat all-reduce
    (parameters without a gradient, e.g. experts no token reached, contribute zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements in the optimizer's state tensors on this rank (scalars such as Adam's step count
    included), the quantity ZeRO-1 divides by the world size."""
    return sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


class ShardedMuonClip(MuonClip):
    """MuonClip with its state partitioned over the ranks of ``process_group`` (default: the
    world). Same arguments and update as :class:`MuonClip`; requires an initialized process group.

    Gradients are *summed* over ranks (not averaged): scale the loss as for a replicated
    optimizer after an all-reduce SUM. Call ``reduce_gradients()`` after the backward passes, then
    optionally ``clip_grad_norm_()``, then ``step()`` (which reduces the gradients itself when that
    was not done). A parameter without a gradient on any rank is treated as having a zero gradient,
    as the trainer's replicated all-reduce does. All parameters must share one dtype and device.

    ``collectives``: ``"scatter_gather"`` (reduce-scatter the gradients, all-gather the parameters:
    ZeRO-1's traffic, for NCCL), ``"all_reduce"`` (the same results through all-reduces: a SUM for
    the gradients, an integer SUM of the raw bits for the parameters, which is exact), or
    ``"auto"``: all-reduce on gloo, whose reduce-scatter and all-gather are several times slower
    than its all-reduce on CPU (bench/distributed_muon.py), scatter/gather otherwise.
    """

    def __init__(self, params: Iterable, process_group=None, collectives: str = "auto", **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedMuonClip needs an initialized torch.distributed process group; "
                               "use MuonClip for a single process")
        if collectives not in ("auto", "scatter_gather", "all_reduce"):
            raise ValueError(f"collectives must be 'auto', 'scatter_gather' or 'all_reduce'; got {collectives!r}")
        super().__init__(params, **kwargs)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.params = self._all_params()
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice in the parameter groups")
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise ValueError(f"ShardedMuonClip packs parameters into one flat buffer and needs one dtype and "
                             f"device; got {sorted(str(k) for k in kinds)}")
        use_muon = [g["use_muon"] for g in self.param_groups for _ in g["params"]]
        ns_steps = self.defaults["ns_steps"]
        self.owners = plan_owners([(tuple(p.shape), m) for p, m in zip(self.params, use_muon)], self.world, ns_steps)
        self.owned = [o == self.rank for o in self.owners]
        self.layout = [[i for i, o in enumerate(self.owners) if o == r] for r in range(self.world)]
        self.segment = max(1, max(sum(self.params[i].numel() for i in idx) for idx in self.layout))
        if collectives == "auto":
            collectives = "all_reduce" if dist.get_backend(process_group) == "gloo" else "scatter_gather"
        self.via_all_reduce = collectives == "all_reduce"
        self._reduced = False

    # ---- communication --------------------------------------------------------------------------
    def _pack(self, rank: int, tensors) -> list[torch.Tensor]:
        """Flat pieces of ``rank``'s segment: its parameters' tensors in index order, then padding."""
        pieces, used = [], 0
        for i in self.layout[rank]:
            t = tensors(i)
            n = self.params[i].numel()
            pieces.append(t.reshape(-1) if t is not None else self.params[i].new_zeros(n))
            used += n
        if used < self.segment:
            pieces.append(torch.zeros(self.segment - used, dtype=self._dtype(), device=self._device()))
        return pieces

    def _dtype(self) -> torch.dtype:
        return self.params[0].dtype if self.params else torch.float32

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum gradients over ranks into their owners (one reduce-scatter). Afterwards an owned
        parameter's ``.grad`` is the global sum (a view into one buffer) and every other ``.grad``
        is None."""
        flat = torch.cat([piece for r in range(self.world) for piece in self._pack(r, lambda i: self.params[i].grad)])
        if self.via_all_reduce:  # the same sums; keep this rank's segment
            dist.all_reduce(flat, group=self.process_group)
            mine = flat[self.rank * self.segment:(self.rank + 1) * self.segment]
        else:
            mine = torch.empty(self.segment, dtype=flat.dtype, device=flat.device)
            _reduce_scatter(mine, flat, self.process_group)
        for p in self.params:
            p.grad = None
        offset = 0
        for i in self.layout[self.rank]:
            p = self.params[i]
            p.grad = mine[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._reduced = True

    @torch.no_grad()
    def _gather_params(self) -> None:
        """Every rank receives every owner's updated parameters (one all-gather)."""
        bits = _INT_OF_SIZE.get(self._dtype().itemsize)
        if self.via_all_reduce and bits is not None:
            # a gather as an integer SUM over the raw bits: every segment is zero except on its owner,
            # so each rank receives the owners' exact bit patterns (-0.0 and NaN included)
            flat = torch.zeros(self.world * self.segment, dtype=self._dtype(), device=self._device())
            torch.cat(self._pack(self.rank, lambda i: self.params[i].detach()),
                      out=flat[self.rank * self.segment:(self.rank + 1) * self.segment])
            dist.all_reduce(flat.view(bits), group=self.process_group)
        else:
            mine = torch.cat(self._pack(self.rank, lambda i: self.params[i].detach()))
            flat = torch.empty(self.world * self.segment, dtype=mine.dtype, device=mine.device)
            _all_gather(flat, mine, self.process_group)
        for r in range(self.world):
            if r == self.rank:
                continue
            offset = r * self.segment
            for i in self.layout[r]:
                p = self.params[i]
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    # ---- the step -------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Exact global gradient norm (all ranks get the same value) and clipping of the owned
        gradients; reduces the gradients first if that was not done."""
        if not self._reduced:
            self.reduce_gradients()
        return grad_norm_and_clip(self.params, max_norm, owned=self.owned, group=self.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._reduced:
            self.reduce_gradients()
        self._reduced = False
        self._update_params()  # only owned parameters have a gradient now: only they move and get state
        self._gather_params()
        self._apply_qk_clip()  # identical parameters and maxima on every rank: identical clip
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._reduced = False  # the next gradients are local again

    # ---- state ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full (replicated or merged) state dict or a shard: this rank keeps the entries of
        the parameters it owns. Works across world sizes: the keys are global parameter indices."""
        state_dict = dict(state_dict)
        state_dict["state"] = {k: v for k, v in state_dict["state"].items() if self.owned[int(k)]}
        super().load_state_dict(state_dict)


_INT_OF_SIZE = {4: torch.int32, 8: torch.int64}


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input, group=group)


def _all_gather(output: torch.Tensor, input: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


# ---- checkpoints --------------------------------------------------------------------------------
def shard_file_name(rank: int, world: int) -> str:
    """File of one rank's optimizer shard inside a checkpoint directory."""
    return f"optimizer-{rank:05d}-of-{world:05d}.pt"


def read_optimizer_shards(directory: str | Path, world: int, keep=None) -> dict:
    """Merge the ``world`` optimizer shard files under ``directory`` into one state dict.

    ``keep(index) -> bool`` drops the other parameters' entries while reading, so a rank never
    holds more than one shard plus its own part. Shards are keyed by global parameter index, so the
    result loads into a sharded optimizer of any world size or into a single-process MuonClip."""
    directory = Path(directory)
    merged: dict = {"state": {}, "param_groups": None}
    for r in range(world):
        path = directory / shard_file_name(r, world)
        if not path.is_file():
            raise FileNotFoundError(f"optimizer shard {path.name} is missing from {directory} "
                                    f"(the checkpoint was written by {world} ranks)")
        shard = torch.load(path, map_location="cpu", weights_only=False)
        if merged["param_groups"] is None:
            merged["param_groups"] = shard["param_groups"]
        for k, v in shard["state"].items():
            if keep is None or keep(int(k)):
                merged["state"][k] = v
        del shard
    return merged
