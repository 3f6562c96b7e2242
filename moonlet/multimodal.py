"""Image input for Kimi K2.5 / K2.6: decoding, the processor's resize rule, patches, prompt placeholders.

The K2.5 image processor (``media_proc_cfg`` in a checkpoint's ``preprocessor_config.json``) turns an
image into what ``moonlet.model.vision.MoonViT`` reads:

1. decode and convert to RGB (Pillow; an alpha channel is dropped, not composited);
2. shrink, never enlarge, by ``scale = min(1, sqrt(in_patch_limit / (max(1, W // p) * max(1, H // p))),
   side * p / W, side * p / H)`` (p = patch_size 14, side = patch_limit_on_one_side 512,
   in_patch_limit 16384); new size ``max(1, int(W * scale))`` x ``max(1, int(H * scale))``, each
   capped at side * p, resized with Pillow's bicubic filter (also when the size is unchanged);
3. pad right and bottom with black up to a multiple of p * merge_kernel_size (28);
4. scale to [0, 1], subtract image_mean (0.5) and divide by image_std (0.5) per channel, so padding
   becomes -1;
5. cut into p x p patches, row-major: [h * w, 3, p, p] with patch grid (t=1, h, w).

The prompt holds ``<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`` per image (what the
K2.5 chat template writes for an image part); before the model runs, the one ``<|media_pad|>`` of each
image is repeated once per merged 2x2 group: (h / 2) * (w / 2) tokens (``expand_image_placeholders``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
MEDIA_PAD = "<|media_pad|>"
MEDIA_PAD_ID = 163605  # media_placeholder_token_id of the published kimi_k25 config


@dataclass
class ImageProcessorConfig:
    """The image part of K2.5's ``media_proc_cfg`` (published values as defaults)."""

    patch_size: int = 14
    merge_kernel_size: int = 2
    in_patch_limit: int = 16384
    patch_limit_on_one_side: int = 512
    fixed_output_tokens: int | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_kernel_size", "in_patch_limit", "patch_limit_on_one_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"media_proc_cfg.{name} must be a positive integer; got {value!r}")
        if self.fixed_output_tokens is not None:
            raise ValueError("media_proc_cfg.fixed_output_tokens is not implemented (the published K2.5 processor "
                             "leaves it null); remove it")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or (name == "image_std" and any(v <= 0 for v in value)):
                raise ValueError(f"media_proc_cfg.{name} must be three numbers (std positive); got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ImageProcessorConfig":
        names = {"patch_size", "merge_kernel_size", "in_patch_limit", "patch_limit_on_one_side",
                 "fixed_output_tokens", "image_mean", "image_std"}
        return cls(**{k: v for k, v in cfg.items() if k in names},
                   extra={k: v for k, v in cfg.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageProcessorConfig":
        """``media_proc_cfg`` of ``directory/preprocessor_config.json``; the published defaults when the
        checkpoint has no such file."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data.get("media_proc_cfg", data))


@dataclass(frozen=True)
class ResizePlan:
    """Where one image goes: resized to new_width x new_height, then padded right/bottom."""

    new_width: int
    new_height: int
    pad_width: int
    pad_height: int
    patch_size: int
    merge_kernel_size: int

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        p = self.patch_size
        return (1, (self.new_height + self.pad_height) // p, (self.new_width + self.pad_width) // p)

    @property
    def num_tokens(self) -> int:
        _, h, w = self.grid_thw
        return (h // self.merge_kernel_size) * (w // self.merge_kernel_size)


def plan_resize(width: int, height: int, cfg: ImageProcessorConfig | None = None) -> ResizePlan:
    """The K2.5 processor's size rule for a width x height image (see the module docstring)."""
    cfg = cfg or ImageProcessorConfig()
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    p, side = cfg.patch_size, cfg.patch_limit_on_one_side
    by_count = math.sqrt(cfg.in_patch_limit / (max(1.0, width // p) * max(1.0, height // p)))
    scale = min(1.0, by_count, side * p / width, side * p / height)
    new_w = min(max(1, int(width * scale)), side * p)
    new_h = min(max(1, int(height * scale)), side * p)
    factor = p * cfg.merge_kernel_size
    plan = ResizePlan(new_w, new_h, (factor - new_w % factor) % factor, (factor - new_h % factor) % factor,
                      p, cfg.merge_kernel_size)
    _, gh, gw = plan.grid_thw
    if gh > side or gw > side:
        raise ValueError(f"a {width}x{height} image gives a {gh}x{gw} patch grid, over the {side} per side limit")
    return plan


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("image input needs Pillow: pip install pillow") from e
    return Image


def load_image(source: Any):
    """An RGB Pillow image from a Pillow image, raw bytes, a ``data:image/...;base64,`` URL, or a file path."""
    Image = _pil()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header or not payload:
            raise ValueError("a data URL image must be 'data:image/<type>;base64,<data>'")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ValueError(f"the data URL's base64 payload does not decode: {e}") from e
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        data = path.read_bytes()
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}; give a path, bytes, a data URL "
                        "or a PIL image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # Pillow raises several types for undecodable data
        raise ValueError(f"cannot decode the image ({len(data)} bytes): {e}") from e
    return image.convert("RGB")


def image_to_patches(image, cfg: ImageProcessorConfig | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image -> (patches [h * w, 3, p, p] float32, grid (1, h, w)) by the K2.5 rule."""
    import numpy as np

    Image = _pil()
    cfg = cfg or ImageProcessorConfig()
    image = load_image(image)
    plan = plan_resize(image.width, image.height, cfg)
    resized = np.asarray(image.resize((plan.new_width, plan.new_height), resample=Image.Resampling.BICUBIC))
    padded = np.pad(resized, ((0, plan.pad_height), (0, plan.pad_width), (0, 0)))
    # float32 after each step, the steps themselves in float64: the reference processor's rounding
    pixels = (padded / 255.0).astype(np.float32)
    pixels = (pixels - np.asarray(cfg.image_mean, dtype=np.float64)).astype(np.float32)
    pixels = (pixels * (1.0 / np.asarray(cfg.image_std, dtype=np.float64))).astype(np.float32)
    pixels = torch.from_numpy(pixels)
    p = cfg.patch_size
    _, gh, gw = plan.grid_thw
    patches = pixels.reshape(gh, p, gw, p, 3).permute(0, 2, 4, 1, 3).reshape(gh * gw, 3, p, p)
    return patches.contiguous(), plan.grid_thw


@dataclass
class ImageBatch:
    """Packed patches of several images, what ``MoonViT`` reads."""

    pixel_values: torch.Tensor  # [sum of h * w, 3, p, p]
    grid_thws: torch.Tensor  # [images, 3] int64
    num_tokens: list[int]  # placeholder tokens per image


def preprocess_images(images, cfg: ImageProcessorConfig | None = None) -> ImageBatch:
    """Images (anything ``load_image`` reads) -> packed patches, grids and token counts."""
    cfg = cfg or ImageProcessorConfig()
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    patches, grids = zip(*(image_to_patches(img, cfg) for img in images))
    k = cfg.merge_kernel_size
    return ImageBatch(torch.cat(patches), torch.tensor(grids, dtype=torch.int64),
                      [(h // k) * (w // k) for _, h, w in grids])


def expand_image_placeholders(ids: list[int], num_tokens: list[int], placeholder_id: int = MEDIA_PAD_ID) -> list[int]:
    """Repeat the i-th ``placeholder_id`` of ``ids`` num_tokens[i] times (one per image feature)."""
    count = sum(1 for t in ids if t == placeholder_id)
    if count != len(num_tokens):
        raise ValueError(f"the prompt has {count} image placeholder(s) (token {placeholder_id}) for "
                         f"{len(num_tokens)} image(s); put one {IMAGE_PLACEHOLDER} per image in the prompt")
    out, images = [], iter(num_tokens)
    for t in ids:
        out.extend([t] * next(images) if t == placeholder_id else [t])
    return out
