"""MuonClip: Muon for hidden matrices, AdamW for the rest, and per-head QK-Clip for MLA (K2 report §2.1).

Muon, per 2-D hidden matrix W (A×B) with gradient G:
    M ← μM + G;  O = NS5(G + μM)  (Nesterov)           # Newton–Schulz in bf16, ≈ U Vᵀ
    W ← W − η · (0.2 · sqrt(max(A, B)) · O + λ W)      # update RMS matched to AdamW's
Embeddings, the LM head, norms and biases use AdamW (β = 0.9, 0.95) with the same η and λ.

QK-Clip, after each step: for every head h whose largest scaled pre-softmax logit S_max^h exceeded
τ, with γ = τ / S_max^h, scale that head's q_nope rows and k_nope rows by √γ and its q_pe rows by γ.
The shared k_pe (kv_a_proj_with_mqa) and the value rows are left alone, and so are heads ≤ τ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal factor U Vᵀ of a 2-D matrix g (singular values pushed towards ~1), in bf16.

    Returns a tensor of g's shape in bfloat16."""
    if g.dim() != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix; got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.bfloat16()
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the short side: S = X Xᵀ is then the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.T if transposed else x


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Hidden 2-D matrices get Muon; embeddings and the LM head (and everything 1-D) get AdamW."""
    return p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


def param_groups(model: nn.Module, weight_decay: float = 0.1, muon: bool = True) -> list[dict]:
    """Split a model's trainable parameters into a Muon group and an AdamW group (named for logging).
    With ``muon=False`` everything goes to AdamW (the baseline)."""
    muon_params, adam_params = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon_params if muon and is_muon_param(name, p) else adam_params).append(p)
    groups = []
    if muon_params:
        groups.append(dict(params=muon_params, use_muon=True, weight_decay=weight_decay, name="muon"))
    if adam_params:
        groups.append(dict(params=adam_params, use_muon=False, weight_decay=weight_decay, name="adamw"))
    return groups


class MuonClip(torch.optim.Optimizer):
    """Muon (groups with ``use_muon=True``) + AdamW (the others) + QK-Clip over ``attention_modules``.

    ``lr`` is η: AdamW uses it directly and Muon scales its orthogonalized update by
    0.2·sqrt(max(A, B)) so the same η and weight decay fit both. Set ``qk_clip_tau=None`` (or pass no
    attention modules) for plain Muon. After ``step()``, ``last_clip`` holds the per-layer clip stats
    of that step (see :func:`qk_clip`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, attention_modules: Iterable[nn.Module] = (), qk_clip_tau: float | None = 100.0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, use_muon=False)
        super().__init__(params, defaults)
        self.attention_modules = list(attention_modules)
        self.qk_clip_tau = qk_clip_tau
        self.last_clip: list[dict] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_params()
        self._apply_qk_clip()
        return loss

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients of this optimizer's parameters so their global L2 norm is at most
        ``max_norm`` (``inf``: measure only); returns the norm before clipping.

        The norm is the L2 norm of the per-parameter norms, in parameter-group order (see
        :func:`grad_norm_and_clip`), so a sharded optimizer over the same summed gradients gets the
        same number bit for bit."""
        return grad_norm_and_clip(self._all_params(), max_norm)

    def _all_params(self) -> list[torch.Tensor]:
        """Every parameter in group order: position i is index i of ``state_dict()['state']``."""
        return [p for group in self.param_groups for p in group["params"]]

    def _update_params(self) -> None:
        """Muon or AdamW update of every parameter that has a gradient (QK-Clip not included)."""
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)

    def _apply_qk_clip(self) -> None:
        if self.qk_clip_tau is not None and self.attention_modules:
            self.last_clip = qk_clip(self.attention_modules, self.qk_clip_tau)

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.dim() != 2:
                raise ValueError(f"Muon needs 2-D parameters; got shape {tuple(p.shape)} (put it in an AdamW group)")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            grad = p.grad.float() if p.grad.dtype != buf.dtype else p.grad
            buf.mul_(mu).add_(grad)
            update = grad.add(buf, alpha=mu) if group["nesterov"] else buf
            o = newton_schulz(update, steps=group["ns_steps"])
            scale = 0.2 * math.sqrt(max(p.shape))
            p.mul_(1 - lr * wd)
            p.add_(o.to(p.dtype), alpha=-lr * scale)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))


@torch.no_grad()
def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float, owned: list[bool] | None = None,
                       group=None) -> torch.Tensor:
    """Global L2 gradient norm of ``params``, then every gradient scaled by min(1, max_norm / (norm + 1e-6)).

    The per-parameter norms go into one vector (position i for ``params[i]``) whose norm is the
    total, as ``torch.nn.utils.clip_grad_norm_`` computes it. With ``owned`` (sharded optimizer
    state) a rank only has the summed gradients of the parameters it owns: it fills those
    positions, leaves the others 0, and the vector is summed over ``group`` — each position has one
    non-zero term, so every rank ends up with the exact vector a single process would build and
    the same total, bit for bit. Only the owned gradients are scaled. Parameters without a
    gradient count as 0."""
    device = params[0].device if params else torch.device("cpu")
    norms = torch.zeros(len(params), dtype=torch.float32, device=device)
    for i, p in enumerate(params):
        if p.grad is not None and (owned is None or owned[i]):
            norms[i] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
    if owned is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(norms, group=group)
    total = torch.linalg.vector_norm(norms)
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for i, p in enumerate(params):
            if p.grad is not None and (owned is None or owned[i]):
                p.grad.mul_(coef.to(p.grad.dtype))
    return total


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's MLA modules (anything with ``record_max_logit``), in layer order."""
    return [m for m in model.modules() if hasattr(m, "record_max_logit") and hasattr(m, "kv_b_proj")]


def set_max_logit_recording(model: nn.Module, enabled: bool = True) -> list[nn.Module]:
    """Turn per-head max-logit recording on/off for every MLA module; returns the modules."""
    mods = attention_modules(model)
    for m in mods:
        m.record_max_logit = enabled
        m.max_logit = None
    return mods


@torch.no_grad()
def qk_clip(modules: Iterable[nn.Module], tau: float) -> list[dict]:
    """Apply QK-Clip to each MLA module from its recorded ``max_logit`` [heads], then reset it.

    Under torch.distributed the maxima are all-reduced with MAX first, so every rank clips the same
    heads by the same factors. Returns per module {"max_logit": [heads] list, "clipped": [head ids]}.
    """
    modules = list(modules)
    maxima = [m.max_logit for m in modules]
    if any(x is None for x in maxima):
        missing = [m.layer_idx for m, x in zip(modules, maxima) if x is None]
        if len(missing) == len(modules):
            return []
        raise RuntimeError(f"no max logit recorded for attention layers {missing}; "
                           "run a forward pass with record_max_logit=True before the step")
    stacked = torch.stack([x.detach().float() for x in maxima])  # [layers, heads]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stacked = stacked.to(_dist_device())
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    stacked = stacked.cpu()
    stats = []
    for m, head_max in zip(modules, stacked):
        m.max_logit = None
        over = (head_max > tau).nonzero().flatten().tolist()
        for h in over:
            gamma = tau / float(head_max[h])
            _scale_head(m, h, gamma)
        stats.append({"max_logit": head_max.tolist(), "clipped": over})
    return stats


def _scale_head(m: nn.Module, h: int, gamma: float) -> None:
    """Scale head h's q_nope rows and k_nope rows by √γ and q_pe rows by γ (k_pe and v untouched)."""
    nope, rope, v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    q = m.q_b_proj.weight if m.q_lora_rank else m.q_proj.weight  # rows [head: nope | rope] * heads
    q_start = h * (nope + rope)
    q[q_start:q_start + nope].mul_(math.sqrt(gamma))
    q[q_start + nope:q_start + nope + rope].mul_(gamma)
    kv = m.kv_b_proj.weight  # rows [head: k_nope | v] * heads
    k_start = h * (nope + v)
    kv[k_start:k_start + nope].mul_(math.sqrt(gamma))


def _dist_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
