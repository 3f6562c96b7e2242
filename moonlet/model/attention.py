"""Multi-head Latent Attention (MLA): projections, the expanded path and the absorbed latent path.

Expanded path (training, prefill without a cache): the latent is expanded per head by kv_b_proj
into k_nope and v, and ordinary causal attention runs over [k_nope | k_pe].

Absorbed path (serving): only the normalized latent (kv_lora_rank values) and the rotated k_pe
(qk_rope_head_dim values) are cached per token. The k_nope half of kv_b_proj (W_UK) is folded
into the query, attention runs over the latent itself, and the v half (W_UV) is applied to the
attended latent. The two paths compute the same function.

MoBA layers (``config.moba_config``, ``config.is_moba_layer``): the expanded path runs block-sparse
attention (``sparse.moba_attention``) instead of dense causal attention, and QK-Clip's max logit is
taken over the pairs MoBA attends to.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .quantized import dense_weight
from .rope import apply_rope
from .sparse import moba_attention, moba_max_logit


class LatentKV(Protocol):
    """Where the absorbed path keeps its cache and how it attends over it.

    ``attend`` stores the new tokens' latent [B, T, kv_lora] and rotated k_pe [B, T, rope] for
    ``layer`` and returns softmax(q_latent·latentᵀ + q_pe·k_peᵀ, scaled) · latent over the cached
    and new tokens, causally, as [B, T, heads, kv_lora] (in float32 or the input dtype).
    ``positions`` gives the positions of the T new tokens when the caller did not pass them;
    ``begin``/``end`` bracket one forward pass over T new tokens.
    """

    def positions(self, num_tokens: int, device: torch.device) -> torch.Tensor: ...

    def begin(self, num_tokens: int) -> None: ...

    def attend(self, layer: int, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor, scale: float) -> torch.Tensor: ...

    def end(self) -> None: ...


def latent_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                     scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference absorbed attention. q_latent [B,T,h,c], q_pe [B,T,h,r], latent [B,S,c], k_pe [B,S,r];
    mask [B or 1, T, S] bool (True = may attend). Returns [B,T,h,c] in float32."""
    scores = torch.einsum("bthc,bsc->bhts", q_latent.float(), latent.float())
    scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bsc->bthc", probs, latent.float())


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        self.use_rope = not config.mla_use_nope  # NoPE MLA (Kimi Linear): q_pe/k_pe stay unrotated
        # MoBA block-sparse attention on the expanded path: (block_size, top_k), or None for dense.
        self.moba = ((config.moba_config["block_size"], config.moba_config["top_k"])
                     if config.is_moba_layer(layer_idx) else None)
        H, nh = config.hidden_size, config.num_attention_heads
        bias = config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(H, nh * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_head_dim, H, bias=bias)
        # QK-Clip support: when record_max_logit is set, the expanded path keeps the running
        # per-head maximum of the scaled pre-softmax logits in ``max_logit`` ([heads], float32).
        self.record_max_logit = False
        self.max_logit: torch.Tensor | None = None

    # ---- shared projections ---------------------------------------------------------------------
    def project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,H] -> q_nope [B,T,h,nope], q_pe [B,T,h,rope] (not yet rotated)."""
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(*x.shape[:-1], self.num_heads, self.qk_head_dim)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,H] -> normalized latent [B,T,kv_lora], k_pe [B,T,rope] (not yet rotated)."""
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_pe

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [h, nope, kv_lora] and W_UV [h, v, kv_lora] (a quantized
        kv_b_proj is dequantized to the run dtype once and cached)."""
        w = dense_weight(self.kv_b_proj, self.kv_a_layernorm.weight.dtype).view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LatentKV | None = None,
                mask: torch.Tensor | None = None, segments=None) -> torch.Tensor:
        """x [B,T,H]; cos/sin [B or 1, T, rope/2]; mask [B or 1, T, T] bool for the expanded path
        (None = causal). With ``kv``, runs the absorbed path over that cache. segments: a
        ``packing.SegmentLayout`` of packed documents, which a MoBA layer attends one per row (a
        dense layer keeps them apart with ``mask``)."""
        B, T, _ = x.shape
        q_nope, q_pe = self.project_q(x)
        latent, k_pe = self.project_latent(x)
        if self.use_rope:
            q_pe = apply_rope(q_pe, cos, sin)
            k_pe = apply_rope(k_pe, cos, sin)
        if kv is None:
            out = self._expanded(q_nope, q_pe, latent, k_pe, mask, segments)
        else:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, kv)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask, segments=None) -> torch.Tensor:
        B, T = latent.shape[:2]
        kvb = self.kv_b_proj(latent).view(B, T, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kvb.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, h, T, qk]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, self.num_heads, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.moba is not None and segments is not None:
            return self._moba_per_segment(q, k, v, segments)
        if self.moba is not None and mask is not None:
            raise ValueError(
                f"layer {self.layer_idx} uses MoBA block-sparse attention (moba_config), which supports causal "
                "attention without a padding mask only; got an attention_mask. Pass attention_mask=None "
                "(unpadded or packed sequences of equal length), or list this layer in "
                "moba_config['full_attention_layers'] to keep it dense.")
        if self.record_max_logit:
            self._record_max_logit(q, k, mask)
        if self.moba is not None:
            out = moba_attention(q, k, v, self.moba[0], self.moba[1], self.softmax_scale)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        return out.transpose(1, 2)  # [B, T, h, v]

    def _moba_per_segment(self, q, k, v, segments) -> torch.Tensor:
        """MoBA over packed documents, each in a row of its own (right-padded: exact for the real
        tokens, which are causal and whose gate scores only complete blocks before their own), so
        blocks count from each document's first token. q, k, v [B, h, T, ·] -> [B, T, h, v]."""
        block_size, top_k = self.moba

        def attend(q_rows, k_rows, v_rows, valid):  # [n, L, h, ·]
            q_rows, k_rows, v_rows = (t.transpose(1, 2) for t in (q_rows, k_rows, v_rows))
            if self.record_max_logit:
                head_max = moba_max_logit(q_rows, k_rows, block_size, top_k, self.softmax_scale, valid=valid)
                self.max_logit = head_max if self.max_logit is None else torch.maximum(self.max_logit, head_max)
            out = moba_attention(q_rows, k_rows, v_rows, block_size, top_k, self.softmax_scale)
            return out.transpose(1, 2)

        return segments.apply(attend, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    @torch.no_grad()
    def _record_max_logit(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.moba is not None:  # only the pairs MoBA attends to
            head_max = moba_max_logit(q, k, self.moba[0], self.moba[1], self.softmax_scale)
            self.max_logit = head_max if self.max_logit is None else torch.maximum(self.max_logit, head_max)
            return
        T = q.shape[2]
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale  # [B, h, T, T]
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None] if mask is None else mask
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        head_max = logits.amax(dim=(0, 2, 3))
        self.max_logit = head_max if self.max_logit is None else torch.maximum(self.max_logit, head_max)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, kv: LatentKV) -> torch.Tensor:
        w_uk, w_uv = self.absorbed_weights()
        if getattr(kv, "expanded_prefill", False):  # the cache attends per head itself (see PagedLatentKV)
            return kv.attend_heads(self.layer_idx, q_nope, q_pe, latent, k_pe, w_uk, w_uv, self.softmax_scale)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # [B, T, h, kv_lora]
        lora = getattr(kv, "lora", None)  # the engine's per-token LoRA adapters (moonlet.engine.lora)
        if lora is not None:  # an adapter on kv_b_proj changes W_UK / W_UV per token
            q_latent = lora.absorb_q(self.layer_idx, q_nope, q_latent)
        out_latent = kv.attend(self.layer_idx, q_latent, q_pe, latent, k_pe, self.softmax_scale)
        out = torch.einsum("bthc,hvc->bthv", out_latent.to(w_uv.dtype), w_uv)  # [B, T, h, v]
        return out if lora is None else lora.absorb_v(self.layer_idx, out_latent, out)
