"""The K2 decoder: blocks of MLA + (dense SwiGLU | MoE), final norm, untied head.

Module and parameter names are the hub checkpoint's (``model.layers.N.self_attn.kv_b_proj.weight``,
``model.layers.N.mlp.experts.E.up_proj.weight`` ...), so ``state_dict()`` keys are the tensor names
of a published checkpoint.

Kimi Linear (``model_type: kimi_linear``) is the same decoder with Kimi Delta Attention in place of
MLA in the layers ``config.is_kda_layer`` names (``model.layers.N.self_attn`` as in its checkpoint)
and NoPE MLA in the others. Its checkpoint calls the MoE block ``block_sparse_moe`` and the experts'
projections ``w1``/``w3``/``w2``; moonlet keeps one MoE layout (``mlp.experts.E.gate_proj`` ...) for
every model and ``moonlet.weights`` renames those tensors at the checkpoint boundary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import LatentKV, MLAttention
from .kda import KimiDeltaAttention
from .moe import MLP, MoE
from .norm import RMSNorm
from .packing import SegmentLayout
from .quantized import QuantizedLinear
from .rope import RotaryEmbedding

# Tensors that stay float32 whatever dtype the model runs in: the router's correction bias and
# KDA's decay parameters (exp(A_log) and softplus(· + dt_bias) set how fast the state forgets).
FP32_TENSORS = ("e_score_correction_bias", "A_log", "dt_bias")


def _kda_needs_no_cache(layer_idx: int) -> NotImplementedError:
    return NotImplementedError(
        f"layer {layer_idx} is a Kimi Delta Attention (KDA) layer: this cache has no recurrent state for it "
        "(only the engine's PagedLatentKV does). Serve the model with moonlet.engine (LLM / moonlet serve), run "
        "it without a cache (kv=None, the expanded path), or carry KimiDeltaAttention's own state "
        "(forward(..., state=..., return_state=True)) per layer.")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_kda = config.is_kda_layer(layer_idx)
        self.self_attn = KimiDeltaAttention(config, layer_idx) if self.is_kda else MLAttention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, kv=None, mask=None, pad_mask=None, segments: SegmentLayout | None = None):
        """mask [B or 1, T, T] bool for MLA's expanded path; pad_mask [B, T] (1 = real token) for KDA;
        segments: packed documents, run one per row by KDA and MoBA layers (see moonlet.model.packing)."""
        h = self.input_layernorm(x)
        if self.is_kda:
            if kv is None and segments is not None:
                x = x + segments.apply(lambda rows, valid: self.self_attn(rows, pad_mask=valid), h)
            elif kv is None:
                x = x + self.self_attn(h, pad_mask=pad_mask)
            elif hasattr(kv, "recurrent"):  # the engine's cache carries each sequence's KDA state
                x = x + kv.recurrent(self.layer_idx, self.self_attn, h)
            else:
                raise _kda_needs_no_cache(self.layer_idx)
        elif segments is not None:
            x = x + self.self_attn(h, cos, sin, kv=kv, mask=mask, segments=segments)
        else:
            x = x + self.self_attn(h, cos, sin, kv=kv, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    """K2 / DeepSeek-V3 / DeepSeek-V2 / Kimi Linear causal LM. ``forward(input_ids)`` returns logits
    [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, kv: LatentKV | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, kv, attention_mask, inputs_embeds, segment_ids))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv: LatentKV | None = None, attention_mask: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H].

        input_ids [B, T]. positions [B, T] or [T]; default 0..T-1, or the cache's next positions when
        ``kv`` is given. attention_mask [B, T] (1 = real token, 0 = padding) for the expanded path.
        inputs_embeds [B, T, H], when given, replaces the token embeddings (the image-text model puts
        projected image features at its placeholder tokens this way); input_ids still give the shape.
        With ``kv``, attention runs on the absorbed path over the latent cache (not for models with
        KDA layers: NotImplementedError). KDA layers handle left padding exactly (padded tokens do not
        touch their state); right padding only affects the padded positions.
        segment_ids [B, T]: packed documents (training), -1 for padding: a token sees only earlier
        tokens of the same segment; pass ``positions`` restarting at each segment too. Dense MLA
        layers mask; KDA and MoBA layers run each segment in a row of its own (state, convolutions
        and MoBA blocks start at the segment's first token; see moonlet.model.packing). Not with
        ``kv`` or ``attention_mask``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        if kv is not None and self.config.kda_layer_ids and not hasattr(kv, "recurrent"):
            raise _kda_needs_no_cache(self.config.kda_layer_ids[0])
        B, T = input_ids.shape
        if positions is None:
            positions = kv.positions(T, input_ids.device) if kv is not None else torch.arange(T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None]
        cos, sin = self.model.rotary_emb(positions)
        mask = segments = None
        if segment_ids is not None:
            mask = self._segment_mask(segment_ids, kv, attention_mask, (B, T))
            if self.config.kda_layer_ids or self.config.moba_config:
                segments = SegmentLayout(segment_ids)
        elif attention_mask is not None and kv is None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None] & attention_mask.bool()[:, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)[None]  # padded rows stay finite
        if inputs_embeds is None:
            x = self.model.embed_tokens(input_ids)
        elif tuple(inputs_embeds.shape) != (B, T, self.config.hidden_size):
            raise ValueError(f"inputs_embeds must be [batch, seq, hidden] = {[B, T, self.config.hidden_size]}; "
                             f"got {list(inputs_embeds.shape)}")
        else:
            x = inputs_embeds
        if kv is not None:
            kv.begin(T)
        pad_mask = attention_mask if kv is None else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv=kv, mask=mask, pad_mask=pad_mask, segments=segments)
        if kv is not None:
            kv.end()
        return self.model.norm(x)

    def _segment_mask(self, segment_ids: torch.Tensor, kv, attention_mask, shape) -> torch.Tensor:
        """Causal attention within each segment: [B, T, T] bool."""
        if kv is not None or attention_mask is not None:
            raise ValueError("segment_ids (packed documents) go without a cache and without an attention_mask "
                             "(mark padding as a segment of its own)")
        if tuple(segment_ids.shape) != shape:
            raise ValueError(f"segment_ids must be [batch, seq] = {list(shape)}; got {list(segment_ids.shape)}")
        T = shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
        return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])

    # ---- construction helpers -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float | None = None) -> "Transformer":
        """Random initialization: normal(0, initializer_range) for linear and embedding weights, ones for
        norms, zeros for biases and the router's correction bias; KDA layers' decay parameters and
        short convolutions as ``KimiDeltaAttention.reset_*_parameters`` sets them."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        for module in self.modules():
            if isinstance(module, KimiDeltaAttention):  # decay and convolution: not normal(0, std)
                module.reset_decay_parameters(gen)
                module.reset_conv_parameters(gen)
        self.reset_buffers()
        return self

    def reset_buffers(self) -> None:
        """Recompute derived (non-checkpoint) buffers, e.g. after building on the meta device."""
        self.model.rotary_emb.reset_parameters()

    def cast(self, dtype: torch.dtype) -> "Transformer":
        """Cast parameters and buffers to ``dtype``, keeping FP32_TENSORS in float32 and quantized
        layers' stored weights and scales as they are (they compute in the activations' dtype)."""
        for name, p in self.named_parameters():
            if p.is_floating_point() and not name.endswith(FP32_TENSORS):
                p.data = p.data.to(dtype)
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                continue
            for bname, b in module._buffers.items():
                if b is not None and b.is_floating_point() and not bname.endswith(FP32_TENSORS) and bname != "inv_freq":
                    module._buffers[bname] = b.to(dtype)
        return self

    def num_parameters(self) -> int:
        """Logical weights, as a dense checkpoint counts them: parameters, the router correction biases,
        and out x in for each quantized linear (not its packed words or scales)."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(b.numel() for name, b in self.named_buffers() if name.endswith("e_score_correction_bias"))
        n += sum(m.logical_numel() for m in self.modules() if isinstance(m, QuantizedLinear))
        return n

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
