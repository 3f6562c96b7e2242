"""DeepSeek-V3's multi-token-prediction (MTP) module, as a draft model for speculative decoding.

DeepSeek-V3 checkpoints (``num_nextn_predict_layers: 1``) carry one more decoder layer after the
main model, stored as ``model.layers.{num_hidden_layers}.*``, trained to predict the token after
next. At position i it combines the main model's final-normed hidden state h_i with the embedding
of the next token t_{i+1}::

    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      # [2H] -> [H]
    y = DecoderLayer(x)                                    # MLA + MoE, the layer's own latent cache
    logits(t_{i+2}) = shared_head.head(shared_head.norm(y))

(the concatenation order is the one the published weights were trained with: embedding first).
The token embedding is the layer's own copy of the main model's (``model.layers.{N}.embed_tokens``,
as the checkpoint stores it): under tensor parallelism the main model's is split over the ranks,
while the MTP layer runs whole on rank 0. For more than one draft per step the module runs again on
its own output y in place of h, with the draft it just made as the next token.

``MTPLayer`` subclasses ``DecoderLayer`` so its state-dict names under ``model.layers.{N}.`` are the
checkpoint's own (``self_attn.*``, ``mlp.*``, the two layer norms, plus ``embed_tokens``, ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head``). ``MTPHead`` holds the layers
under ``model.layers``; ``MTPDrafter`` wraps the first for the engine (``moonlet.engine.mtp``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .norm import RMSNorm
from .packing import SegmentLayout
from .rope import RotaryEmbedding
from .transformer import DecoderLayer


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """One MTP depth: the decoder layer at index ``layer_idx`` (>= num_hidden_layers) with its input
    projection and output head."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # a copy of the main model's
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, token_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's input: eh_proj([enorm(embedding of the next token); hnorm(hidden)])."""
        return self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(y))


class _Layers(nn.Module):
    def __init__(self, layers: dict[str, MTPLayer]):
        super().__init__()
        self.layers = nn.ModuleDict(layers)


class MTPHead(nn.Module):
    """The checkpoint's MTP layers, named as stored (``model.layers.{N}``, ``N`` from num_hidden_layers)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.num_nextn_predict_layers or 0
        if n < 1:
            raise ValueError("the config has no MTP layers (num_nextn_predict_layers is 0)")
        self.config = config
        first = config.num_hidden_layers
        self.model = _Layers({str(first + i): MTPLayer(config, first + i) for i in range(n)})

    @property
    def layers(self) -> list[MTPLayer]:
        return list(self.model.layers.values())

    @property
    def layer_ids(self) -> list[int]:
        return [layer.layer_idx for layer in self.layers]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "MTPHead":
        """Random weights (tests and new training runs), as ``Transformer.init_weights`` does."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        return self

    def forward_train(self, rotary: RotaryEmbedding, hidden: torch.Tensor, input_ids: torch.Tensor,
                      positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Plain full-sequence forward of the first MTP layer (no cache), the reference the engine is
        tested against and the training path: hidden [B, T, H] (the main model's final-normed states),
        input_ids [B, T] -> logits [B, T - 1, vocab] where row i predicts token i + 2. Packed documents:
        the main model's ``positions`` and ``segment_ids`` [B, T]; row i then attends within its segment
        (a row whose token i + 1 is in the next segment predicts nothing useful: mask its loss)."""
        layer = self.layers[0]
        B, T = input_ids.shape
        x = layer.combine(layer.embed_tokens(input_ids[:, 1:]), hidden[:, :-1])
        positions = (torch.arange(T - 1, device=input_ids.device)[None] if positions is None
                     else positions[:, :-1])
        cos, sin = rotary(positions)
        mask = segments = None  # None: causal (a MoBA layer takes no explicit mask)
        if segment_ids is not None:
            seg = segment_ids[:, :-1]
            causal = torch.ones(T - 1, T - 1, dtype=torch.bool, device=input_ids.device).tril()[None]
            mask = causal & (seg[:, :, None] == seg[:, None, :])
            if getattr(layer.self_attn, "moba", None) is not None:  # MoBA runs each piece in its own row
                segments = SegmentLayout(seg)
        return layer.logits(layer(x, cos, sin, mask=mask, segments=segments))


class MTPDrafter(nn.Module):
    """The engine's view of the first MTP layer: a model with ``hidden_states`` / ``lm_head`` that a
    ``ModelRunner`` runs over its own paged latent cache. ``inputs_embeds`` carries, per token, the
    hidden state to combine with it (the main model's, or the drafter's own output when chaining)."""

    def __init__(self, head: MTPHead):
        super().__init__()
        self.config = head.config
        self.head = head
        self.layer = head.layers[0]
        self.rotary_emb = RotaryEmbedding(head.config).to(self.layer.eh_proj.weight.device)
        self.model = self  # ModelRunner reads model.model.embed_tokens only for image rows
        self.embed_tokens = self.layer.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.layer.eh_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.eh_proj.weight.dtype

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, kv=None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [1, T] (the next tokens), inputs_embeds [1, T, H] (the hidden states they go with)
        -> the layer's output [1, T, H] (not normed: the next chained step takes it as its hidden)."""
        if inputs_embeds is None:
            raise ValueError("the MTP drafter needs the hidden state of every token (inputs_embeds)")
        T = input_ids.shape[1]
        if positions is None:
            positions = kv.positions(T, input_ids.device)
        if positions.dim() == 1:
            positions = positions[None]
        cos, sin = self.rotary_emb(positions)
        x = self.layer.combine(self.embed_tokens(input_ids), inputs_embeds.to(self.dtype))
        kv.begin(T)
        y = self.layer(x, cos, sin, kv=kv)
        kv.end()
        return y

    def lm_head(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer.logits(y)
