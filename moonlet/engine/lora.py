"""Multi-LoRA serving: several PEFT LoRA adapters over one base model, unmerged, batched together.

``MultiLora`` keeps

- a **registry**: adapters by name, read from their PEFT directories (``moonlet.model.lora.read_adapter``)
  into host memory when registered (``add`` / ``remove``), each with a content digest (its identity in
  prefix-cache block hashes);
- **resident slots**: ``max_loras`` adapters live on the device at once, in stacked tensors per
  targeted linear (ranks zero-padded to ``max_lora_rank``, the scaling folded into B). A request's
  adapter is loaded into a slot when the request is admitted (``acquire``); a slot no running sequence
  uses is reused least recently used first. When every slot is held by running sequences of other
  adapters, the request waits in the queue (the scheduler admits later requests past it);
- the **per-step forward**: a forward hook on every targeted linear adds, per token,
  ``B_a (A_a x)`` of that token's adapter ``a``. The stacked factors make this two dense matmuls with
  static shapes — ``x @ A_all^T`` [tokens, slots x rank], masked to the token's own slot's columns,
  then ``@ B_all^T`` — so a batch mixing adapters (and the base model: an all-zero mask) needs no
  Python loop over requests or tokens, and the same code is captured in CUDA decode graphs (the
  per-token slots then live in a static buffer). A step without any adapter token skips the hooks
  (eager steps), so base requests compute exactly what they compute without multi-LoRA.

MLA's ``kv_b_proj`` is never called as a linear on the serving path: its halves W_UK / W_UV are
absorbed into the query and the output (``MLAttention._absorbed``). An adapter on it changes them per
token: ``q_latent += ((q_nope · B_UK) [r]) · A`` and ``out += B_UV · (out_latent · A^T)``, per head, with
the same slot mask (``absorb_q`` / ``absorb_v``); the expanded prefill path (``attend_heads``) uses the
span's adapter's effective W_UK / W_UV (``span_weights``).

Not supported (clear errors): adapters on the routed experts, models with KDA layers (their
recurrent path runs the linears per sequence), tensor parallelism.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, DEFAULT_TARGETS, _EXPERT_RE, Adapter, \
    read_adapter


def adapter_digest(directory: str | os.PathLike) -> bytes:
    """Content identity of an adapter directory: blake2b of its config and weights files. Equal digests
    mean equal adapters, so prefix-cache blocks computed under one are valid for the other."""
    h = hashlib.blake2b(digest_size=16)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        h.update(name.encode() + b"\0")
        h.update((Path(directory) / name).read_bytes())
    return h.digest()


@dataclass
class LoraAdapter:
    """A registered adapter: its name, source, content digest, factors (host memory) and, while
    resident, its slot and how many running sequences use it."""
    name: str
    path: str
    digest: bytes
    adapter: Adapter
    rank: int
    slot: int | None = None
    users: int = 0
    requests: int = 0  # requests admitted under it (first admissions), for metrics
    modules: list[str] = field(default_factory=list)


class _Target:
    """The stacked factors of one targeted linear: A [slots * R, in], B [out, slots * R] (scaled)."""

    def __init__(self, name: str, in_features: int, out_features: int, slots: int, rank: int, dtype, device):
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.A = torch.zeros(slots * rank, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(out_features, slots * rank, dtype=dtype, device=device)


class _KvB:
    """The stacked factors of one layer's kv_b_proj, split as absorption needs them: A [slots, R, c],
    B_UK [slots, h, nope, R], B_UV [slots, h, v, R] (scaled)."""

    def __init__(self, heads: int, nope: int, v: int, c: int, slots: int, rank: int, dtype, device):
        self.heads, self.nope, self.v, self.c = heads, nope, v, c
        self.A = torch.zeros(slots, rank, c, dtype=dtype, device=device)
        self.B_uk = torch.zeros(slots, heads, nope, rank, dtype=dtype, device=device)
        self.B_uv = torch.zeros(slots, heads, v, rank, dtype=dtype, device=device)


def _is_linear(module: nn.Module) -> bool:
    from ..model.quantized import QuantizedLinear

    return type(module) is nn.Linear or isinstance(module, QuantizedLinear)


class MultiLora:
    """The adapter registry, resident slots and per-token LoRA of one engine (see the module docstring).

    ``model``: the text Transformer the engine runs (hooks are added to its targeted linears).
    ``max_loras``: resident adapters at once; ``max_lora_rank``: the largest rank an adapter may have."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int):
        config = model.config
        if config.kda_layer_ids:
            raise ValueError("multi-LoRA serving (enable_lora / lora_modules) does not support models with KDA "
                             f"layers (layers {list(config.kda_layer_ids)}): their recurrent path runs the linears "
                             "per sequence; merge the adapter instead (engine argument lora=)")
        self.model = model
        self.model_type = config.model_type
        self.max_loras, self.rank = max_loras, max_lora_rank
        dtype, device = model.dtype, model.device
        self.dtype, self.device = dtype, device
        self.targets: dict[str, _Target] = {}
        self.kv_b: dict[int, _KvB] = {}  # layer index -> its kv_b_proj's factors
        self._hooks = []
        for name, module in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in DEFAULT_TARGETS):
                continue
            if _EXPERT_RE.search("." + name) or not _is_linear(module):
                continue
            if name.endswith(".kv_b_proj"):
                attn = model.get_submodule(name.rpartition(".")[0])
                self.kv_b[attn.layer_idx] = _KvB(attn.num_heads, attn.qk_nope_head_dim, attn.v_head_dim,
                                                 attn.kv_lora_rank, max_loras, max_lora_rank, dtype, device)
                self.targets[name] = None  # registered name, factors in self.kv_b
                continue
            target = _Target(name, module.in_features, module.out_features, max_loras, max_lora_rank, dtype, device)
            self.targets[name] = target
            self._hooks.append(module.register_forward_hook(self._make_hook(target)))
        # slot of each column of the stacked factors (the mask compares the token's slot with it)
        self.col_slot = torch.arange(max_loras, device=device).repeat_interleave(max_lora_rank)
        self.slot_ids = torch.arange(max_loras, device=device)
        self.adapters: dict[str, LoraAdapter] = {}
        self.slots: list[str | None] = [None] * max_loras
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self.loads = 0  # adapters copied into a slot
        self.evictions = 0  # resident adapters replaced by another
        # the step's per-token slots (-1: no adapter), on the device, or None (no adapter token this step)
        self.index: torch.Tensor | None = None
        self.span_slots: list[int] = []  # per flat token on the host (expanded prefill spans)
        self._col_mask: torch.Tensor | None = None
        self._slot_mask: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Device bytes of the stacked factors."""
        total = 0
        for t in self.targets.values():
            if t is not None:
                total += t.A.numel() * t.A.element_size() + t.B.numel() * t.B.element_size()
        for k in self.kv_b.values():
            total += sum(x.numel() * x.element_size() for x in (k.A, k.B_uk, k.B_uv))
        return total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---- the registry ----------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """Register the PEFT adapter at ``path`` under ``name`` (read into host memory and checked against
        the model now; copied to the device when a request needs it). ValueError for a taken or empty
        name, an unreadable adapter, a rank above max_lora_rank, a module the engine does not adapt."""
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"LoRA adapter name {name!r} must be a non-empty string without whitespace")
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already registered (from "
                             f"{self.adapters[name].path!r}); remove it first or choose another name")
        adapter = read_adapter(path, self.model_type)
        source = repr(str(path))
        rank = 0
        for module, (a, b) in adapter.factors.items():
            if _EXPERT_RE.search("." + module):
                raise ValueError(f"LoRA adapter {source}: {module} is a routed expert; multi-LoRA serving adapts "
                                 "attention and dense / shared-expert MLP linears only (merge it instead: engine "
                                 "argument lora=)")
            if module not in self.targets:
                known = sorted({n.rpartition(".")[2] for n in self.targets})
                raise ValueError(f"LoRA adapter {source}: {module} is not a linear the engine can adapt on this model "
                                 f"(adaptable: {', '.join(known)}, in attention and dense / shared-expert MLPs)")
            linear = self.model.get_submodule(module)
            r = a.shape[0]
            want_a, want_b = (r, linear.in_features), (linear.out_features, r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"LoRA adapter {source}: {module} has lora_A {list(a.shape)}, lora_B "
                                 f"{list(b.shape)}; this model's {module} needs {list(want_a)} and {list(want_b)} "
                                 "(an adapter for another model size?)")
            rank = max(rank, r)
        if rank > self.rank:
            raise ValueError(f"LoRA adapter {source} has rank {rank}, above max_lora_rank={self.rank}; raise "
                             f"max_lora_rank (CLI --max-lora-rank) to at least {rank}")
        entry = LoraAdapter(name, str(path), adapter_digest(path), adapter, rank, modules=sorted(adapter.factors))
        self.adapters[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister an adapter. ValueError when unknown or while running or waiting requests use it
        (the caller checks the waiting ones: ``EngineCore.remove_lora``)."""
        entry = self.get(name)
        if entry.users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {entry.users} running sequence(s); wait for them "
                             "to finish or abort them first")
        if entry.slot is not None:
            self._clear_slot(entry.slot)
            self._lru.pop(entry.slot, None)
            self.slots[entry.slot] = None
        del self.adapters[name]

    def get(self, name: str) -> LoraAdapter:
        entry = self.adapters.get(name)
        if entry is None:
            raise ValueError(f"unknown LoRA adapter {name!r}; registered: "
                             f"{', '.join(sorted(self.adapters)) or 'none'} (add it with add_lora)")
        return entry

    # ---- residency ------------------------------------------------------------------------------
    def acquire(self, seq) -> bool:
        """Make ``seq``'s adapter resident and count ``seq`` as its user (``seq.lora_slot``). False when
        every slot is held by running sequences of other adapters: the sequence must wait."""
        name = seq.params.lora
        if name is None or seq.lora_slot is not None:
            return True
        entry = self.get(name)
        if entry.slot is None:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load(entry, slot)
        entry.users += 1
        self._lru.move_to_end(entry.slot)
        seq.lora_slot = entry.slot
        return True

    def release(self, seq) -> None:
        """``seq`` stopped running (finished, aborted or preempted): it no longer holds its adapter."""
        if seq.lora_slot is None:
            return
        entry = self.adapters.get(self.slots[seq.lora_slot])
        if entry is not None:
            entry.users -= 1
        seq.lora_slot = None

    def _free_slot(self) -> int | None:
        for slot, held in enumerate(self.slots):
            if held is None:
                return slot
        for slot in self._lru:  # least recently used first
            if self.adapters[self.slots[slot]].users == 0:
                self.adapters[self.slots[slot]].slot = None
                self.evictions += 1
                return slot
        return None

    def _clear_slot(self, slot: int) -> None:
        cols = slice(slot * self.rank, (slot + 1) * self.rank)
        for t in self.targets.values():
            if t is not None:
                t.A[cols].zero_()
                t.B[:, cols].zero_()
        for k in self.kv_b.values():
            k.A[slot].zero_()
            k.B_uk[slot].zero_()
            k.B_uv[slot].zero_()

    @torch.no_grad()
    def _load(self, entry: LoraAdapter, slot: int) -> None:
        """Copy an adapter's factors into ``slot`` (in place: decode graphs keep reading the same tensors)."""
        self._clear_slot(slot)
        R = self.rank
        for module, (a, b) in entry.adapter.factors.items():
            r, scale = a.shape[0], entry.adapter.scaling[module]
            a = a.to(device=self.device, dtype=torch.float32)
            b = b.to(device=self.device, dtype=torch.float32) * scale
            t = self.targets[module]
            if t is not None:
                t.A[slot * R:slot * R + r] = a.to(self.dtype)
                t.B[:, slot * R:slot * R + r] = b.to(self.dtype)
                continue
            k = self.kv_b[self.model.get_submodule(module.rpartition(".")[0]).layer_idx]
            b = b.view(k.heads, k.nope + k.v, r)
            k.A[slot, :r] = a.to(self.dtype)
            k.B_uk[slot, :, :, :r] = b[:, :k.nope].to(self.dtype)
            k.B_uv[slot, :, :, :r] = b[:, k.nope:].to(self.dtype)
        self.slots[slot] = entry.name
        entry.slot = slot
        self._lru[slot] = None
        self.loads += 1

    # ---- the step -------------------------------------------------------------------------------
    def set_step(self, index: torch.Tensor | None, span_slots: list[int] | None = None) -> None:
        """The coming forward's per-token slots ([tokens] long, -1 for no adapter; a static buffer under
        decode graphs), or None when no token uses an adapter (the hooks then do nothing)."""
        self.index = index
        self.span_slots = span_slots or []
        self._col_mask = self._slot_mask = None

    def _masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, slots * R] and [tokens, slots] one-hot masks of the tokens' slots (made once per forward)."""
        if self._col_mask is None:
            index = self.index.reshape(-1, 1)
            self._col_mask = (index == self.col_slot).to(self.dtype)
            self._slot_mask = (index == self.slot_ids).to(self.dtype)
        return self._col_mask, self._slot_mask

    def _make_hook(self, target: _Target):
        def hook(module, args, output):
            if self.index is None:
                return output
            x = args[0]
            n = self.index.numel()
            if x.shape[:-1].numel() != n:
                raise RuntimeError(f"multi-LoRA: {target.name} ran over {x.shape[:-1].numel()} tokens but the step "
                                   f"has {n}")
            col_mask, _ = self._masks()
            xa = x.reshape(n, -1).to(self.dtype) @ target.A.t()  # [tokens, slots * R]
            delta = (xa * col_mask) @ target.B.t()  # [tokens, out]: only the token's own slot's columns
            return output + delta.view(output.shape).to(output.dtype)
        return hook

    def absorb_q(self, layer: int, q_nope: torch.Tensor, q_latent: torch.Tensor,
                 rows: int | None = None) -> torch.Tensor:
        """``q_latent`` [1, N, h, c] (q_nope · W_UK) plus each token's adapter's kv_b_proj part; ``rows``:
        the tensors hold only the step's first ``rows`` tokens (the decodes)."""
        k = self.kv_b.get(layer)
        if self.index is None or k is None:
            return q_latent
        slot_mask = self._masks()[1][:rows]
        u = torch.einsum("bthd,lhdr->bthlr", q_nope.to(self.dtype), k.B_uk) * slot_mask[None, :, None, :, None]
        return q_latent + torch.einsum("bthlr,lrc->bthc", u, k.A).to(q_latent.dtype)

    def absorb_v(self, layer: int, out_latent: torch.Tensor, out: torch.Tensor,
                 rows: int | None = None) -> torch.Tensor:
        """``out`` [1, N, h, v] (out_latent · W_UV^T) plus each token's adapter's kv_b_proj part; ``rows``
        as for ``absorb_q``."""
        k = self.kv_b.get(layer)
        if self.index is None or k is None:
            return out
        slot_mask = self._masks()[1][:rows]
        w = torch.einsum("bthc,lrc->bthlr", out_latent.to(self.dtype), k.A) * slot_mask[None, :, None, :, None]
        return out + torch.einsum("bthlr,lhvr->bthv", w, k.B_uv).to(out.dtype)

    def span_weights(self, layer: int, flat_start: int, w_uk: torch.Tensor, w_uv: torch.Tensor):
        """W_UK [h, nope, c] and W_UV [h, v, c] of the adapter of the prefill span starting at flat token
        ``flat_start`` (a span is one sequence, so one adapter): W + B A for its slot."""
        k = self.kv_b.get(layer)
        if self.index is None or k is None or not self.span_slots:
            return w_uk, w_uv
        slot = self.span_slots[flat_start]
        if slot < 0:
            return w_uk, w_uv
        uk = w_uk + torch.einsum("hdr,rc->hdc", k.B_uk[slot], k.A[slot]).to(w_uk.dtype)
        uv = w_uv + torch.einsum("hvr,rc->hvc", k.B_uv[slot], k.A[slot]).to(w_uv.dtype)
        return uk, uv

    def stats(self) -> dict:
        return {"lora_adapters": len(self.adapters), "lora_resident": sum(s is not None for s in self.slots),
                "lora_loads": self.loads, "lora_evictions": self.evictions}
