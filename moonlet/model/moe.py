"""Mixture of experts: the router (sigmoid noaux_tc, or DeepSeek-V2's softmax greedy), SwiGLU experts,
shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.moe import grouped_experts, stack_experts
from .quantized import QuantizedLinear


def _stored(linear: nn.Module) -> torch.Tensor:
    """The tensor holding a linear layer's weight values: ``weight``, or a quantized layer's stored values."""
    return linear.matrix().data if isinstance(linear, QuantizedLinear) else linear.weight


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses top-k experts per token. Returns (weights [N, k] float32, indices [N, k])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            # Not trained by gradients: updated from the measured expert load (aux-loss-free balancing).
            # Kept in float32 whatever the model's dtype.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Training statistics: when collect_stats is set, the last call's scores and choices.
        self.collect_stats = False
        self.last_scores: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        elif self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}; use 'sigmoid' or 'softmax'")

        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()  # the bias steers selection only
            if self.n_group > 1:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
                choice = self._mask_groups(choice, group_scores, float("-inf"))
            indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, indices)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).amax(dim=-1)
            weights, indices = self._mask_groups(scores, group_scores, 0.0).topk(self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "greedy":
            weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        else:
            raise ValueError(f"unsupported topk_method {self.topk_method!r}")

        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.collect_stats:
            self.last_scores, self.last_indices = scores, indices
        return weights, indices

    def _mask_groups(self, values: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)
        return values.masked_fill(~expert_mask, fill)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )
        # Set by fuse_experts: the experts' weights stacked for grouped GEMMs (a plain attribute,
        # not a buffer, so state_dict and .to() see only the per-expert views).
        self.stacked = None
        self._stack_ptrs: tuple[int, ...] = ()
        # Expert parallelism (set by moonlet.parallel.shard_transformer): this module holds the routed
        # experts [expert_offset, expert_offset + len(experts)) and its share of the shared experts'
        # intermediate dimension; ``tp`` sums every rank's partial output.
        self.expert_offset: int | None = None
        self.tp = None
        # keep the shared expert a dense MLP of its own, out of the grouped GEMM's stack (multi-LoRA serving
        # adapts its linears through their forward hooks, which a stacked group never calls)
        self.shared_apart = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat)
        if self.expert_offset is not None:  # slots routed to other ranks' experts get index len(experts): skipped
            indices = indices - self.expert_offset
            elsewhere = (indices < 0) | (indices >= len(self.experts))
            indices = indices.masked_fill(elsewhere, len(self.experts))
            weights = weights.masked_fill(elsewhere, 0.0)
        # Training keeps the loop: gradients flow per expert Linear (and Muon works per expert
        # matrix anyway); the grouped path serves inference once fuse_experts() has run.
        stacked = self._current_stack() if self.stacked is not None and not torch.is_grad_enabled() else None
        if stacked is not None:
            out = grouped_experts(flat, weights, indices, stacked, skip_outside=self.expert_offset is not None)
        else:
            out = self.route_tokens(flat, weights, indices)
        if self.shared_experts is not None and (stacked is None or not stacked.shared_slot):
            out = out + self.shared_experts(flat)
        if self.tp is not None:
            self.tp.all_reduce(out)
        return out.view(shape)

    @torch.no_grad()
    def fuse_experts(self) -> None:
        """Stack the experts' weights for the grouped-GEMM inference path (``moonlet.kernels.moe``).

        The stacked tensors become the storage of the weights: each expert's ``gate_proj`` /
        ``up_proj`` / ``down_proj`` weight is re-pointed to a view of them, so memory is not doubled
        and state_dict() keeps the hub names. A shared expert of the routed experts' size
        (n_shared_experts == 1: K2, DeepSeek-V3) is stacked as one more group that every token
        uses with weight 1; a wider one (DeepSeek-V2, Moonlight) stays a dense MLP. Calling it
        again is a no-op while the views hold; after .to(), cast() or replacing weight tensors
        it re-stacks (forward does that by itself too).
        """
        stale_shared = self.stacked is not None and self.shared_apart and self.stacked.shared_slot
        if self.stacked is not None and self._stack_is_current() and not stale_shared:
            return
        if any(isinstance(m.gate_proj, QuantizedLinear) for m in self.experts):
            self._fuse_quantized_experts()
            return
        mlps = list(self.experts)
        shared = self.shared_experts
        # (not under expert parallelism: there the shared expert's share is summed with the routed
        # experts' partial outputs, and the group index past the local experts marks skipped slots)
        shared_slot = (shared is not None and self.expert_offset is None and not self.shared_apart
                       and not isinstance(shared.gate_proj, QuantizedLinear)
                       and shared.gate_proj.weight.shape == mlps[0].gate_proj.weight.shape)
        if shared_slot:
            mlps.append(shared)
        self.stacked = None  # release the previous stack before allocating the new one
        stacked = stack_experts([m.gate_proj.weight for m in mlps], [m.up_proj.weight for m in mlps],
                                [m.down_proj.weight for m in mlps], shared_slot=shared_slot)
        for g, mlp in enumerate(mlps):
            for linear, view in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), stacked.views(g)):
                linear.weight.data = view  # same Parameter object, now backed by the stack
        self.stacked = stacked
        self._stack_ptrs = tuple(w.data_ptr() for w in self._watched_weights())

    def _fuse_quantized_experts(self) -> None:
        """``fuse_experts`` for experts kept quantized (``moonlet.model.quantized``): their stored
        values and scales are stacked as they are (``moonlet.kernels.quant_moe``) and each expert's
        buffers re-pointed at its slice. The shared expert joins as a group when it is stored in the
        same format and shape (a K2 FP8 checkpoint); otherwise (K2.5's bf16 shared expert next to
        INT4 experts) it stays a separate MLP. Experts of mixed formats stay on the per-expert loop."""
        from ..kernels.quant_moe import stack_quantized_experts

        mlps = list(self.experts)
        first = mlps[0].gate_proj.matrix()
        fmt = lambda m: (type(m), m.matrix().block, m.matrix().data.dtype, m.matrix().scale.dtype)  # noqa: E731
        projections = [p for m in mlps for p in (m.gate_proj, m.up_proj, m.down_proj)]
        if not all(isinstance(p, QuantizedLinear) and fmt(p) == fmt(mlps[0].gate_proj) for p in projections):
            self.stacked = None  # mixed storage: the per-expert loop handles it
            return
        shared = self.shared_experts
        shared_slot = (shared is not None and self.expert_offset is None and not self.shared_apart and all(isinstance(p, QuantizedLinear) and fmt(p) == fmt(mlps[0].gate_proj)
                                                  for p in (shared.gate_proj, shared.up_proj, shared.down_proj))
                       and shared.gate_proj.matrix().shape == first.shape)
        if shared_slot:
            mlps.append(shared)
        self.stacked = None
        stacked = stack_quantized_experts([m.gate_proj.matrix() for m in mlps], [m.up_proj.matrix() for m in mlps],
                                          [m.down_proj.matrix() for m in mlps], shared_slot=shared_slot)
        for g, mlp in enumerate(mlps):
            for linear, (data, scale) in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), stacked.views(g)):
                linear.point_at(data, scale)
        self.stacked = stacked
        self._stack_ptrs = tuple(w.data_ptr() for w in self._watched_weights())

    def _watched_weights(self) -> tuple[torch.Tensor, ...]:
        # The first and last group's weights: .to(), cast() and load_model replace every weight,
        # and checking all of them on every forward would cost more than the check is worth.
        last = self.shared_experts if self.stacked.shared_slot else self.experts[-1]
        return tuple(_stored(linear) for linear in (self.experts[0].gate_proj, self.experts[0].down_proj,
                                                    last.gate_proj, last.down_proj))

    def _stack_is_current(self) -> bool:
        """Whether the watched weights are still views of the stack (the stack keeps its storage
        alive, so no other tensor on its device can have the same address)."""
        watched = self._watched_weights()
        return (watched[0].device == self.stacked.device
                and tuple(w.data_ptr() for w in watched) == self._stack_ptrs)

    def _current_stack(self):
        if not self._stack_is_current():
            with torch.inference_mode(False):  # the new stack must stay usable outside inference mode
                self.fuse_experts()
        return self.stacked

    def route_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[:, k] · expert[indices[:, k]](x), visiting only the experts some token chose
        (an index of len(experts) or more marks a slot computed elsewhere: skipped)."""
        out = torch.zeros_like(x)
        flat_idx = indices.reshape(-1)
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()[:len(self.experts)]
        token_of = order // indices.shape[1]
        weight_of = weights.reshape(-1)[order]
        start = 0
        for expert_id, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start:start + n]
            y = self.experts[expert_id](x[tokens]) * weight_of[start:start + n, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += n
        return out
