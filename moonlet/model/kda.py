"""Kimi Delta Attention (KDA): the linear-attention layer of Kimi Linear.

Per head, a d_k × d_v state S is carried from token to token:

    S_t = (I − β_t k_t k_tᵀ) · Diag(α_t) · S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

with a per-channel decay α_t = exp(g_t) ∈ (0, 1]^{d_k} (g_t ≤ 0 is the log decay) and a scalar
write strength β_t ∈ (0, 1). Three forms of the same function live here:

- ``kda_recurrent``: token by token, the reference.
- ``kda_chunked``: chunks of 64 tokens; inside a chunk the delta-rule updates are folded into a
  WY representation (one unit-lower-triangular solve), across chunks the state is passed on.
  Plain PyTorch, differentiable: the CPU training / prefill path.
- flash-linear-attention's Triton kernels (``chunk_kda`` / ``fused_recurrent_kda``), used on CUDA
  when the ``fla`` package can be imported; never required.

``KimiDeltaAttention`` is the layer with the published checkpoint's parameter names
(``q_proj``, ``q_conv1d``, ``A_log``, ``f_a_proj``, ``dt_bias``, ``b_proj``, ``g_a_proj``,
``o_norm``, ``o_proj`` ...), so its state_dict keys are the checkpoint's tensor names.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

CHUNK_SIZE = 64
# Inside a chunk, decay products e^{γ_t − γ_s} are formed per block of this many tokens (see
# _decayed_scores); a power of two dividing CHUNK_SIZE.
SUB_BLOCK = 16
# Below this many new tokens the recurrence is cheaper than one padded chunk.
RECURRENT_MAX_TOKENS = 16
# Elements one group of chunks may hold in its pairwise decay tensor (~128 MB in float32).
_GROUP_ELEMENTS = 32 * 2**20
# L2 normalization of q and k: x / sqrt(Σx² + eps), as the published model computes it.
L2_EPS = 1e-6


class KDAState(NamedTuple):
    """What one KDA layer carries between calls for one batch of sequences.

    q_conv / k_conv / v_conv: the last (kernel − 1) inputs of each short convolution,
    [B, kernel − 1, heads · head_dim]. recurrent: the delta-rule state S, [B, heads, d_k, d_v] float32.
    """

    q_conv: torch.Tensor
    k_conv: torch.Tensor
    v_conv: torch.Tensor
    recurrent: torch.Tensor


# ---- the recurrence, three ways ---------------------------------------------------------------------

def _check_inputs(q, k, v, g, beta, initial_state):
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k and g must share one shape [batch, tokens, heads, d_k]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, tokens, heads, d_v] matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [batch, tokens, heads] = {tuple(q.shape[:3])}; got {tuple(beta.shape)}")
    B, _, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [batch, heads, d_k, d_v] = {(B, H, K, v.shape[-1])}; "
                         f"got {tuple(initial_state.shape)}")


def kda_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA token by token (the reference).

    q, k [B, T, H, K] (already L2-normalized), v [B, T, H, V], g [B, T, H, K] log decay (≤ 0),
    beta [B, T, H]; scale defaults to K^-0.5; initial_state [B, H, K, V] or None (zeros).
    Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V] in float32.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]  # Diag(α_t) S_{t-1}
        k_t = k[:, t]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)  # v_t − Sᵀk_t: what the state misses
        S = S + torch.einsum("bhk,bhv->bhkv", beta[:, t, :, None] * k_t, error)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o.to(v.dtype if v.dtype.is_floating_point else torch.float32), S


def _to_chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """[B, n·c, H, ...] -> [B, H, n, c, ...]."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, n, c, H, *x.shape[3:])
    return x.movedim(3, 1)


def _decayed_scores(a: torch.Tensor, b: torch.Tensor, gc: torch.Tensor, bs: int = SUB_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Within each chunk, P[t, s] = Σ_d a[t,d] b[s,d] e^{γ[t,d] − γ[s,d]} for s ≤ t (0 above the diagonal).

    a, b, gc [..., C, K] (gc: cumulative log decay inside the chunk). Returns (P with the diagonal,
    and the same P for (b, b) strictly below it) — the output scores and the WY matrix.

    e^{γ_t − γ_s} is never split as e^{γ_t} · e^{−γ_s} over the whole chunk (e^{−γ_s} overflows once
    the decay is strong): between blocks it is split at the first row r of the row block,
    e^{γ_t − γ_r} · e^{γ_r − γ_s}, both factors ≤ 1 since s < r ≤ t; inside a diagonal block it is
    formed pair by pair.
    """
    C = gc.shape[-2]
    rows_a, rows_b = [], []
    causal = torch.ones(bs, bs, dtype=torch.bool, device=gc.device).tril()
    for r in range(0, C, bs):
        a_i, b_i, g_i = a[..., r:r + bs, :], b[..., r:r + bs, :], gc[..., r:r + bs, :]
        # diagonal block: pairwise decays, -inf above the diagonal so exp gives exactly 0
        diff = (g_i[..., :, None, :] - g_i[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        decay = diff.exp()  # [..., bs, bs, K]
        diag_a = torch.einsum("...td,...tsd,...sd->...ts", a_i, decay, b_i)
        diag_b = torch.einsum("...td,...tsd,...sd->...ts", b_i, decay, b_i).tril(-1)
        parts_a, parts_b = [], []
        if r:
            ref = g_i[..., :1, :]  # γ_r
            past = b[..., :r, :] * (ref - gc[..., :r, :]).exp()  # b_s e^{γ_r − γ_s}
            parts_a.append((a_i * (g_i - ref).exp()) @ past.transpose(-1, -2))
            parts_b.append((b_i * (g_i - ref).exp()) @ past.transpose(-1, -2))
        parts_a.append(diag_a)
        parts_b.append(diag_b)
        if r + bs < C:
            zeros = a.new_zeros(*a.shape[:-2], bs, C - r - bs)
            parts_a.append(zeros)
            parts_b.append(zeros)
        rows_a.append(torch.cat(parts_a, dim=-1))
        rows_b.append(torch.cat(parts_b, dim=-1))
    return torch.cat(rows_a, dim=-2), torch.cat(rows_b, dim=-2)


def kda_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA in chunks (WY representation), the same function as ``kda_recurrent``; differentiable.

    Same arguments and results as ``kda_recurrent``. T need not be a multiple of ``chunk_size``:
    the tail is padded with tokens that neither decay nor write the state (g = 0, β = 0, k = 0).

    Inside a chunk with incoming state S₀ and cumulative log decay Γ (γ_t = Σ_{s≤t} g_s), the
    corrected values U (what each token writes) satisfy (I + Diag(β) A) U = Diag(β) (V − (K ⊙ e^Γ) S₀),
    A[t, s] = Σ_d k_td k_sd e^{γ_td − γ_sd} for s < t. Solving once for [V | K ⊙ e^Γ] gives
    U = u − w S₀; then O = (Q ⊙ e^Γ) S₀ + P U with P[t, s] = Σ_d q_td k_sd e^{γ_td − γ_sd} (s ≤ t), and
    S_C = e^{γ_C} ⊙ S₀ + (K ⊙ e^{γ_C − Γ})ᵀ U.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    if chunk_size % SUB_BLOCK:
        raise ValueError(f"chunk_size must be a multiple of {SUB_BLOCK}; got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return v.new_zeros(v.shape), S
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    pad = (-T) % chunk_size
    if pad:  # padded tokens: no decay (g = 0), no write (β = 0, k = 0), output dropped
        q, k, v, g = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
        beta = F.pad(beta, (0, 0, 0, pad))
    n = (T + pad) // chunk_size
    q, k, v, g = (_to_chunks(t, n, chunk_size) for t in (q, k, v, g))  # [B, H, n, C, ·]
    beta = _to_chunks(beta, n, chunk_size)  # [B, H, n, C]
    q = q * scale
    gc = g.cumsum(dim=-2)
    eye = torch.eye(chunk_size, device=q.device)
    group = max(1, _GROUP_ELEMENTS // max(1, B * H * chunk_size * SUB_BLOCK * K))
    outs = []
    for start in range(0, n, group):
        sl = slice(start, min(start + group, n))
        q_, k_, v_, gc_, beta_ = q[:, :, sl], k[:, :, sl], v[:, :, sl], gc[:, :, sl], beta[:, :, sl]
        P, A = _decayed_scores(q_, k_, gc_)  # [B, H, G, C, C]
        M = eye + beta_[..., :, None] * A  # unit lower triangular
        rhs = beta_[..., None] * torch.cat([v_, k_ * gc_.exp()], dim=-1)
        uw = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
        u, w = uw.split([V, K], dim=-1)
        q_decayed = q_ * gc_.exp()  # q_t e^{γ_t}
        last = gc_[..., -1:, :]
        k_to_end = k_ * (last - gc_).exp()  # k_s e^{γ_C − γ_s}
        chunk_decay = last.squeeze(-2).exp()[..., None]  # [B, H, G, K, 1]
        for j in range(u.shape[2]):
            new = u[:, :, j] - w[:, :, j] @ S  # [B, H, C, V]
            outs.append(q_decayed[:, :, j] @ S + P[:, :, j] @ new)
            S = chunk_decay[:, :, j] * S + k_to_end[:, :, j].transpose(-1, -2) @ new
    o = torch.stack(outs, dim=2)  # [B, H, n, C, V]
    o = o.movedim(1, 3).reshape(B, n * chunk_size, H, V)[:, :T]
    return o.to(out_dtype), S


_FLA_KERNELS: tuple | None | bool = False  # False: not looked up yet; None: not available


def _fla_kernels():
    """flash-linear-attention's (chunk_kda, fused_recurrent_kda), or None when it cannot be imported."""
    global _FLA_KERNELS
    if _FLA_KERNELS is False:
        try:
            from fla.ops.kda import chunk_kda, fused_recurrent_kda
            _FLA_KERNELS = (chunk_kda, fused_recurrent_kda)
        except Exception:  # not installed, or no working Triton: the PyTorch path serves
            _FLA_KERNELS = None
    return _FLA_KERNELS


def kda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """KDA by the fastest available path; arguments and results as ``kda_recurrent``.

    backend: "auto" (fla's Triton kernels on CUDA when importable, else ``kda_recurrent`` for at most
    RECURRENT_MAX_TOKENS tokens and ``kda_chunked`` beyond), "fla", "chunked" or "recurrent".
    """
    T = q.shape[1]
    if backend == "auto":
        if q.is_cuda and _fla_kernels() is not None:
            backend = "fla"
        else:
            backend = "recurrent" if T <= RECURRENT_MAX_TOKENS else "chunked"
    if backend == "recurrent":
        return kda_recurrent(q, k, v, g, beta, scale, initial_state)
    if backend == "chunked":
        return kda_chunked(q, k, v, g, beta, scale, initial_state)
    if backend != "fla":
        raise ValueError(f"unknown KDA backend {backend!r}; use 'auto', 'fla', 'chunked' or 'recurrent'")
    kernels = _fla_kernels()
    if kernels is None or not q.is_cuda:
        raise RuntimeError("the 'fla' KDA backend needs CUDA tensors and flash-linear-attention "
                           "(pip install fla-core); use backend='auto' to fall back to PyTorch")
    _check_inputs(q, k, v, g, beta, initial_state)
    chunk_kda, fused_recurrent_kda = kernels
    # The recurrent kernel is inference-only; decode-sized calls take it like the published model does.
    kernel = fused_recurrent_kda if T <= CHUNK_SIZE and not torch.is_grad_enabled() else chunk_kda
    state = None if initial_state is None else initial_state.float().contiguous()
    o, final = kernel(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=g.float().contiguous(),
                      beta=beta.float().contiguous(), scale=scale, initial_state=state, output_final_state=True)
    return o, final


# ---- the layer --------------------------------------------------------------------------------------

def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(Σx² + eps) over the last dim, computed in float32, returned in x's dtype."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The log decay g = −exp(A_log) · softplus(f + dt_bias), float32.

    f [B, T, H, K] (f_b_proj(f_a_proj(x)) per head), A_log with H elements, dt_bias [H·K]."""
    H, K = f.shape[-2:]
    return -A_log.float().reshape(H, 1).exp() * F.softplus(f.float() + dt_bias.float().view(H, K))


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time followed by SiLU; ``weight`` [D, 1, kernel] as nn.Conv1d's
    (the tap weight[:, 0, -1] multiplies the current token)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        bound = 1 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D]; state [B, kernel−1, D]: the inputs before x (None: zeros, a fresh sequence).
        Returns silu(conv(x)) [B, T, D] and the new state [B, kernel−1, D]."""
        B, T, D = x.shape
        if state is None:
            state = x.new_zeros(B, self.kernel_size - 1, D)
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # [B, kernel−1+T, D]
        y = F.conv1d(xs.transpose(1, 2), self.weight.to(x.dtype), groups=D)  # [B, D, T]
        return F.silu(y.transpose(1, 2)), xs[:, xs.shape[1] - (self.kernel_size - 1):]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}"


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim, then times sigmoid(gate): the KDA output norm (``o_norm``).
    Computed in float32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (h * torch.sigmoid(gate.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class KimiDeltaAttention(nn.Module):
    """The KDA layer of Kimi Linear (``model.layers.N.self_attn`` in its checkpoint).

    x → q/k/v projections → short causal conv + SiLU each → q, k L2-normalized per head;
    g = −exp(A_log)·softplus(f_b(f_a(x)) + dt_bias) (per channel), β = sigmoid(b_proj(x));
    o = KDA(q, k, v, g, β) with scale head_dim^-0.5; o ← RMSNorm(o) · sigmoid(g_b(g_a(x))) per head;
    out = o_proj(o).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        lin = config.linear_attn_config
        if not lin:
            raise ValueError(f"layer {layer_idx} is a KDA layer but the config has no linear_attn_config")
        self.layer_idx = layer_idx
        self.num_heads = H = lin["num_heads"]
        self.head_dim = d = lin["head_dim"]
        self.conv_size = lin["short_conv_kernel_size"]
        hidden, P = config.hidden_size, H * d
        self.backend = "auto"  # see kda_attention
        self.q_proj = nn.Linear(hidden, P, bias=False)
        self.k_proj = nn.Linear(hidden, P, bias=False)
        self.v_proj = nn.Linear(hidden, P, bias=False)
        self.q_conv1d = ShortConvolution(P, self.conv_size)
        self.k_conv1d = ShortConvolution(P, self.conv_size)
        self.v_conv1d = ShortConvolution(P, self.conv_size)
        # [1, 1, H, 1] is the checkpoint's shape for A_log (it broadcasts over [B, T, H, K]).
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.f_a_proj = nn.Linear(hidden, d, bias=False)
        self.f_b_proj = nn.Linear(d, P, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(P, dtype=torch.float32))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, d, bias=False)
        self.g_b_proj = nn.Linear(d, P, bias=False)
        self.o_norm = GatedRMSNorm(d, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(P, hidden, bias=False)
        if self.A_log.device.type != "meta":
            self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initial decay parameters: A = exp(A_log) uniform in [1, 16] per head, and dt_bias the
        inverse softplus of a step size log-uniform in [1e-3, 1e-1] per channel."""
        a = torch.empty(self.A_log.shape, dtype=torch.float32).uniform_(1, 16, generator=generator)
        self.A_log.copy_(a.log())
        u = torch.rand(self.dt_bias.shape, generator=generator, dtype=torch.float32)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    @torch.no_grad()
    def reset_conv_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1 / math.sqrt(self.conv_size)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            w = torch.rand(conv.weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
            conv.weight.copy_(w.to(conv.weight.dtype))

    def forward(self, x: torch.Tensor, state: KDAState | None = None, pad_mask: torch.Tensor | None = None,
                return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDAState]:
        """x [B, T, hidden] -> [B, T, hidden].

        state: what a previous call over the tokens before x returned (None: a fresh sequence).
        pad_mask [B, T] (1 = real token, 0 = padding): padded tokens feed zeros to the convolutions
        and neither decay nor write the state, so left padding leaves the real tokens' outputs as
        without it. return_state: also return the KDAState after x, to continue from.
        """
        B, T, _ = x.shape
        H, d = self.num_heads, self.head_dim
        q_in, k_in, v_in = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        keep = None
        if pad_mask is not None:
            keep = pad_mask.to(torch.bool)
            q_in, k_in, v_in = (t.masked_fill(~keep[..., None], 0) for t in (q_in, k_in, v_in))
        q, q_conv = self.q_conv1d(q_in, None if state is None else state.q_conv)
        k, k_conv = self.k_conv1d(k_in, None if state is None else state.k_conv)
        v, v_conv = self.v_conv1d(v_in, None if state is None else state.v_conv)
        q = l2_normalize(q.view(B, T, H, d))
        k = l2_normalize(k.view(B, T, H, d))
        v = v.view(B, T, H, d)
        g = kda_gate(self.f_b_proj(self.f_a_proj(x)).view(B, T, H, d), self.A_log, self.dt_bias)
        beta = self.b_proj(x).float().sigmoid()  # [B, T, H]
        if keep is not None:
            g = g.masked_fill(~keep[..., None, None], 0.0)
            beta = beta.masked_fill(~keep[..., None], 0.0)
        o, recurrent = kda_attention(q, k, v, g, beta, scale=d**-0.5,
                                     initial_state=None if state is None else state.recurrent,
                                     backend=self.backend)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, d)
        o = self.o_norm(o.to(x.dtype), gate)
        out = self.o_proj(o.reshape(B, T, H * d))
        if return_state:
            return out, KDAState(q_conv, k_conv, v_conv, recurrent)
        return out
