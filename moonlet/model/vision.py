"""Kimi K2.5 / K2.6 vision: the MoonViT encoder, the patch-merger projector and the image-text model.

A kimi_k25 checkpoint holds three parts, and the module tree here has their tensor names:

- ``vision_tower.*``: MoonViT. Pixels arrive already cut into 14x14 patches, packed over all images
  ([L, 3, 14, 14] with a (t, h, w) patch grid per image). ``patch_embed.proj`` (a Conv2d whose kernel
  is the patch, i.e. one linear map per patch) embeds them; ``patch_embed.pos_emb.weight`` is a learned
  [64, 64, D] position table, bicubically resized to each image's grid (frames of a video chunk also
  get a fixed 1D sin-cos time embedding). ``encoder.blocks.N`` are pre-LayerNorm transformer blocks:
  ``norm0`` -> ``wqkv`` (fused, with bias) -> 2D rotary embedding on q and k -> attention within each
  image only -> ``wo``; ``norm1`` -> ``mlp.fc0`` -> tanh-GELU -> ``mlp.fc1``. ``encoder.final_layernorm``
  ends the tower. Each image's output is then cut into 2x2 groups of neighbouring patches (frames
  averaged), one group per text token.
- ``mm_projector.*``: LayerNorm over each patch (``pre_norm``), the group's four patches concatenated,
  then ``proj.0`` -> GELU (erf) -> ``proj.2`` into the text model's hidden size.
- ``language_model.*``: the K2 text model (``moonlet.model.Transformer``).

The prompt carries one ``<|media_pad|>`` token (``media_placeholder_token_id``, 163605) per merged
group (``moonlet.multimodal`` expands the chat template's single placeholder); the text model embeds
the prompt and the projected image features replace the embeddings at those positions, in order.

Everything is plain PyTorch: packed images attend block-diagonally (each image's patches only see
their own image), computed image by image, so it runs anywhere and equals one image at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, VisionConfig
from .transformer import Transformer

# The 2D rotary embedding's base and the largest patch grid side it (and the image processor) allows.
ROPE_THETA = 10000.0
ROPE_MAX_GRID = 512
# LayerNorm epsilon of the tower's norms (torch's default, which the K2.5 modeling code keeps).
TOWER_LN_EPS = 1e-5


def _grid_list(grid_thws: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """grid_thws as a list of (t, h, w) integer triples, checked."""
    rows = grid_thws.tolist() if isinstance(grid_thws, torch.Tensor) else [list(g) for g in grid_thws]
    out = []
    for row in rows:
        if len(row) != 3 or any(int(v) < 1 for v in row):
            raise ValueError(f"each grid_thws row must be three positive integers (t, h, w); got {row!r}")
        out.append((int(row[0]), int(row[1]), int(row[2])))
    return out


# ---- position information ---------------------------------------------------------------------------

def rope_2d_cos_sin(grid_thws, head_dim: int, theta: float = ROPE_THETA, max_grid: int = ROPE_MAX_GRID,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim // 2] (float32) of the 2D rotary embedding for packed patches.

    Patches are in row-major order within each frame, frames in order, images in order. Rotation pair
    j of a head (elements 2j and 2j+1) turns by x * f_i for even j = 2i and by y * f_i for odd
    j = 2i + 1, where (y, x) is the patch's row and column and f_i = theta ** (-4i / head_dim); every
    frame of a video chunk reuses the same spatial angles."""
    if head_dim % 4:
        raise ValueError(f"the 2D rotary embedding needs head_dim divisible by 4; got {head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    parts = []
    for t, h, w in _grid_list(grid_thws):
        if h > max_grid or w > max_grid:
            raise ValueError(f"patch grid {h}x{w} exceeds the 2D rotary embedding's {max_grid}x{max_grid}; "
                             "resize the image (moonlet.multimodal does)")
        flat = torch.arange(h * w, device=device).float()
        x, y = flat % w, torch.div(flat, w, rounding_mode="floor")
        angles = torch.stack([torch.outer(x, freqs), torch.outer(y, freqs)], dim=-1).flatten(1)  # [hw, d/2]
        parts.append(angles.repeat(t, 1))
    angles = torch.cat(parts)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent element pairs of ``x`` [L, heads, head_dim] by the angles of ``cos``/``sin``
    [L, head_dim // 2], in float32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


def interpolate_pos_emb(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The [H0, W0, D] learned position table resized to a height x width patch grid, as [height * width, D]
    in row-major order: the table itself when the grid matches, else bicubic (half-pixel centers)."""
    if (height, width) == tuple(table.shape[:2]):
        return table.flatten(0, 1)
    resized = F.interpolate(table.permute(2, 0, 1)[None], size=(height, width), mode="bicubic", align_corners=False)
    return resized[0].permute(1, 2, 0).flatten(0, 1)


def sincos_time_embedding(num_frames: int, dim: int) -> torch.Tensor:
    """[num_frames, dim] fixed 1D embedding of frame indices: sin in the first half, cos in the second, at
    frequencies 10000 ** (-k / (dim / 2)); computed in float64, returned as float32."""
    if dim % 2:
        raise ValueError(f"the time embedding needs an even width; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.arange(num_frames, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


# ---- the tower ----------------------------------------------------------------------------------------

class PositionTable(nn.Module):
    """``patch_embed.pos_emb``: the learned [H0, W0, D] table and the fixed time embedding."""

    def __init__(self, height: int, width: int, num_frames: int, dim: int):
        super().__init__()
        self.num_frames = num_frames
        self.weight = nn.Parameter(torch.empty(height, width, dim))

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        embs = []
        for t, h, w in grids:
            if t > self.num_frames:
                raise ValueError(f"a chunk of {t} frames exceeds the tower's {self.num_frames} (init_pos_emb_time)")
            spatial = interpolate_pos_emb(self.weight, h, w)
            if t > 1:
                time = sincos_time_embedding(t, spatial.shape[-1]).to(spatial.device, spatial.dtype)
                spatial = (spatial[None] + time[:, None, :]).flatten(0, 1)
            embs.append(spatial)
        return x + torch.cat(embs).to(x.dtype)


class PatchEmbed(nn.Module):
    """``patch_embed``: patches [L, 3, P, P] -> [L, D] plus the position embedding."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, vc.vt_hidden_size, kernel_size=vc.patch_size, stride=vc.patch_size)
        self.pos_emb = PositionTable(vc.init_pos_emb_height, vc.init_pos_emb_width, vc.init_pos_emb_time,
                                     vc.vt_hidden_size)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(1)
        return self.pos_emb(x, grids)


class VisionMLP(nn.Module):
    """``mlp``: fc0 -> tanh-approximated GELU -> fc1, both with bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Sequence[int]) -> torch.Tensor:
    """Non-causal attention within each packed segment (a block-diagonal mask), q/k/v [L, heads, d];
    segment i is rows cu_seqlens[i]:cu_seqlens[i + 1]. Returns [L, heads * d]. Runs segment by segment,
    so memory is that of the largest image, not of the packed batch squared."""
    outs = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(outs).flatten(1)


class VisionBlock(nn.Module):
    """``encoder.blocks.N``: pre-LayerNorm attention with the 2D rotary embedding, then the MLP."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        D = vc.vt_hidden_size
        self.num_heads = vc.vt_num_attention_heads
        self.head_dim = vc.head_dim
        self.norm0 = nn.LayerNorm(D, eps=TOWER_LN_EPS)
        self.norm1 = nn.LayerNorm(D, eps=TOWER_LN_EPS)
        self.wqkv = nn.Linear(D, 3 * D)
        self.wo = nn.Linear(D, D)
        self.mlp = VisionMLP(D, vc.vt_intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: Sequence[int]) -> torch.Tensor:
        qkv = self.wqkv(self.norm0(x)).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=1)
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        x = x + self.wo(packed_attention(q, k, v, cu_seqlens))
        return x + self.mlp(self.norm1(x))


class VisionEncoder(nn.Module):
    """``encoder``: the blocks and the final LayerNorm."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.head_dim = vc.head_dim
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc.vt_num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(vc.vt_hidden_size, eps=TOWER_LN_EPS)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        cos, sin = rope_2d_cos_sin(grids, self.head_dim, device=x.device)
        cu_seqlens = [0]
        for t, h, w in grids:
            cu_seqlens.append(cu_seqlens[-1] + t * h * w)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.final_layernorm(x)


def merge_patches(x: torch.Tensor, grid_thws, kernel: tuple[int, int]) -> list[torch.Tensor]:
    """Cut each image's [t * h * w, D] tower output into kh x kw groups of neighbouring patches.

    Returns per image [(h // kh) * (w // kw), kh * kw, D]: groups in row-major order over the merged
    grid, patches within a group row-major, frames averaged (a video chunk becomes one set of tokens)."""
    kh, kw = kernel
    out, start = [], 0
    D = x.shape[-1]
    for t, h, w in _grid_list(grid_thws):
        if h % kh or w % kw:
            raise ValueError(f"patch grid {h}x{w} is not divisible by the merge kernel {kh}x{kw}; pad the image "
                             "to a multiple of patch_size * merge_kernel_size (moonlet.multimodal does)")
        seq = x[start:start + t * h * w].reshape(t, h // kh, kh, w // kw, kw, D)
        out.append(seq.permute(0, 1, 3, 2, 4, 5).mean(dim=0).reshape((h // kh) * (w // kw), kh * kw, D))
        start += t * h * w
    if start != x.shape[0]:
        raise ValueError(f"grid_thws cover {start} patches but the tower output has {x.shape[0]}")
    return out


class MoonViT(nn.Module):
    """``vision_tower``: patch embedding, encoder, patch merging. forward(pixel_values [L, 3, P, P],
    grid_thws [N, 3]) returns per image [tokens, kh * kw, D]."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.merge_kernel_size = vc.merge_kernel_size
        self.patch_size = vc.patch_size
        self.patch_embed = PatchEmbed(vc)
        self.encoder = VisionEncoder(vc)

    def forward(self, pixel_values: torch.Tensor, grid_thws) -> list[torch.Tensor]:
        grids = _grid_list(grid_thws)
        P = self.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, P, P):
            raise ValueError(f"pixel_values must be packed patches [L, 3, {P}, {P}]; got {tuple(pixel_values.shape)}")
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != total:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but grid_thws describe {total}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype), grids)
        return merge_patches(self.encoder(x, grids), grids, self.merge_kernel_size)


class PatchMergerProjector(nn.Module):
    """``mm_projector``: per-patch LayerNorm, the group's patches concatenated, Linear -> GELU -> Linear
    into the text hidden size. forward(list of [tokens, kh * kw, D]) -> list of [tokens, text_hidden]."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        M = vc.merged_dim
        self.pre_norm = nn.LayerNorm(vc.mm_hidden_size, eps=vc.projector_ln_eps)
        self.proj = nn.Sequential(nn.Linear(M, M), nn.GELU(), nn.Linear(M, vc.text_hidden_size))

    def forward(self, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.proj(self.pre_norm(g).flatten(1)) for g in groups]


def merge_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features,
                         placeholder_id: int) -> torch.Tensor:
    """``inputs_embeds`` [B, T, H] with the rows at ``placeholder_id`` tokens replaced, in order, by the
    rows of ``image_features`` (a [N, H] tensor or a list of them, concatenated in order). The number of
    placeholder tokens must equal N; the input is not modified."""
    if isinstance(image_features, (list, tuple)):
        image_features = torch.cat(list(image_features)) if image_features else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    mask = input_ids == placeholder_id
    n = int(mask.sum())
    if n != image_features.shape[0]:
        raise ValueError(f"the prompt has {n} image placeholder tokens (id {placeholder_id}) but the images give "
                         f"{image_features.shape[0]} features; expand each image's placeholder to its token count "
                         "(moonlet.multimodal.expand_image_placeholders)")
    out = inputs_embeds.clone()
    out[mask] = image_features.to(out.dtype)
    return out


class VisionLanguageModel(nn.Module):
    """The kimi_k25 image-text model: ``vision_tower``, ``mm_projector`` and ``language_model`` (a moonlet
    Transformer), named as the checkpoint names them.

    ``forward(input_ids, pixel_values, grid_thws, ...)`` returns logits; without images it is exactly the
    text model. ``embed`` gives the merged input embeddings for callers that drive the text model
    themselves (e.g. a prefill through a cache, then plain decoding)."""

    def __init__(self, config: ModelConfig, language_model: Transformer | None = None):
        super().__init__()
        vc = config.vision_config
        if vc is None:
            raise ValueError("this config has no vision_config: a vision-language model needs a kimi_k25 config "
                             "with one (and its vision_tower.* / mm_projector.* tensors)")
        self.config = config
        self.vision_config = vc
        self.placeholder_id = config.media_placeholder_token_id
        self.vision_tower = MoonViT(vc)
        self.mm_projector = PatchMergerProjector(vc)
        self.language_model = language_model if language_model is not None else Transformer(config)

    def encode_images(self, pixel_values: torch.Tensor, grid_thws) -> list[torch.Tensor]:
        """Per image, the projected features [tokens, text_hidden] (one per placeholder token)."""
        return self.mm_projector(self.vision_tower(pixel_values, grid_thws))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, grid_thws=None,
              image_features=None) -> torch.Tensor:
        """Text embeddings of ``input_ids`` with image features at the placeholder positions. Give either
        pixels (and grid_thws) or already computed ``image_features``."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            if grid_thws is None:
                raise ValueError("pixel_values need grid_thws (one (t, h, w) patch grid per image)")
            image_features = self.encode_images(pixel_values, grid_thws)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, self.placeholder_id)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, grid_thws=None,
                positions: torch.Tensor | None = None, kv=None, attention_mask: torch.Tensor | None = None,
                image_features=None) -> torch.Tensor:
        embeds = None
        if pixel_values is not None or image_features is not None:
            embeds = self.embed(input_ids, pixel_values, grid_thws, image_features)
        return self.language_model(input_ids, positions, kv, attention_mask, inputs_embeds=embeds)

    @torch.no_grad()
    def init_vision_weights(self, seed: int = 0, std: float = 0.02) -> "VisionLanguageModel":
        """Random vision-side weights for tests: normal(0, std) weights and biases, LayerNorm scales near 1,
        position table normal(0, 1) as the reference initializes it. The text model is left as it is."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in list(self.vision_tower.named_parameters()) + list(self.mm_projector.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("pos_emb.weight"):
                p.copy_(noise)
            else:
                p.copy_(noise * std)
        return self

    def num_parameters(self) -> dict[str, int]:
        return {"vision_tower": sum(p.numel() for p in self.vision_tower.parameters()),
                "mm_projector": sum(p.numel() for p in self.mm_projector.parameters()),
                "language_model": self.language_model.num_parameters()}

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype


def tokens_per_image(grid_thw: Sequence[int], merge_kernel_size: tuple[int, int] = (2, 2)) -> int:
    """Placeholder tokens one image (or video chunk) takes: its merged grid, (h / kh) * (w / kw)."""
    _, h, w = grid_thw
    kh, kw = merge_kernel_size
    return (h // kh) * (w // kw)
