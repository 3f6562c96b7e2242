"""Image requests in the engine (K2.5 / K2.6 checkpoints with a vision tower).

A request with images carries its prompt with one run of ``<|media_pad|>`` tokens per image (the
chat template writes one pad per image; a run that is already expanded is fine too). ``VisionInputs``
(built once per engine from the ``VisionLanguageModel``) turns (prompt ids, images) into a
``MultimodalPrompt``: the images preprocessed by the K2.5 rule, each run expanded to the image's token
count, and a content digest per image. ``add_request`` then runs the vision tower once and keeps the
projected features on the Sequence as ``ImageFeatures``: the rows [n_tokens, hidden] and the
positions of the prompt they replace. The runner writes those rows over the token embeddings of
whatever prefill chunk covers them (a chunk may cut an image anywhere), so preemption and recompute
need nothing extra; decodes never touch them.

Prefix caching: a block's hash takes, besides its tokens, the digests of the images whose tokens
lie in it (``ImageFeatures.block_key``), so two prompts with equal placeholders but other images
never share a block, and the same image in the same place does.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

import torch

from ..multimodal import IMAGE_PLACEHOLDER, ImageProcessorConfig, preprocess_images


def placeholder_runs(ids: list[int], placeholder_id: int) -> list[tuple[int, int]]:
    """(first position, length) of each maximal run of ``placeholder_id`` in ``ids``, in order."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == placeholder_id:
            j = i
            while j < n and ids[j] == placeholder_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


@dataclass
class MultimodalPrompt:
    """A prompt with images, ready for the engine: ``token_ids`` has each image's placeholder run
    expanded to its token count; ``spans`` are (first position, length) of those runs; ``pixel_values``
    / ``grid_thws`` the packed patches; ``digests`` one content hash per image (of its patches and grid)."""

    token_ids: list[int]
    spans: list[tuple[int, int]]
    pixel_values: torch.Tensor
    grid_thws: torch.Tensor
    digests: list[bytes]

    @property
    def num_images(self) -> int:
        return len(self.spans)

    @property
    def num_image_tokens(self) -> int:
        return sum(length for _, length in self.spans)


class ImageFeatures:
    """A running request's projected image features and where they go.

    ``features`` [n, hidden] (on the model's device and dtype) holds every image's rows in prompt
    order; image i covers positions spans[i] = (start, length) and rows offsets[i] .. + length."""

    def __init__(self, features: torch.Tensor, spans: list[tuple[int, int]], digests: list[bytes]):
        self.features = features
        self.spans = list(spans)
        self.digests = list(digests)
        self.offsets: list[int] = []
        total = 0
        for _, length in self.spans:
            self.offsets.append(total)
            total += length
        if total != features.shape[0]:
            raise ValueError(f"the image spans cover {total} positions but there are {features.shape[0]} feature rows")
        self._starts = [s for s, _ in self.spans]

    def _overlapping(self, start: int, end: int) -> range:
        """Indices of the images whose span meets positions [start, end)."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, end)
        return range(first, last)

    def rows(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """For the positions [start, end): (first position, first row, row count) of each piece of an
        image inside them; positions first .. first + count - 1 take rows first_row .. + count - 1."""
        out = []
        for i in self._overlapping(start, end):
            s, length = self.spans[i]
            a, b = max(s, start), min(s + length, end)
            if a < b:
                out.append((a, self.offsets[i] + a - s, b - a))
        return out

    def block_key(self, start: int, end: int) -> bytes | None:
        """What a prefix-cache block over positions [start, end) must add to its hash: the digests of
        the images with tokens in it, in order (None when it holds no image token). With the parent
        hash (which fixes where each run starts) this names the features in the block exactly."""
        keys = [self.digests[i] for i in self._overlapping(start, end)
                if max(self.spans[i][0], start) < min(self.spans[i][0] + self.spans[i][1], end)]
        return b"".join(keys) if keys else None


class VisionInputs:
    """The engine's image side: preprocessing, placeholder expansion and the vision tower + projector
    of a ``moonlet.model.vision.VisionLanguageModel`` (whose text model the engine runs itself)."""

    def __init__(self, vlm, processor: ImageProcessorConfig | None = None):
        vc = vlm.vision_config
        kh, kw = vc.merge_kernel_size
        if kh != kw:
            raise ValueError(f"the image processor merges square groups; vision_config.merge_kernel_size is {[kh, kw]}")
        if processor is None:
            processor = ImageProcessorConfig(patch_size=vc.patch_size, merge_kernel_size=kh)
        if (processor.patch_size, processor.merge_kernel_size) != (vc.patch_size, kh):
            raise ValueError(f"the image processor (patch {processor.patch_size}, merge {processor.merge_kernel_size}) "
                             f"does not match vision_config (patch {vc.patch_size}, merge {kh}); check "
                             "preprocessor_config.json")
        self.vlm = vlm
        self.processor = processor
        self.placeholder_id = int(vlm.placeholder_id)

    def prepare(self, prompt_token_ids, images) -> MultimodalPrompt:
        """Preprocess ``images`` (anything ``moonlet.multimodal.load_image`` reads) and expand the
        prompt's placeholder runs, the i-th run for the i-th image. Raises ValueError when the counts
        differ or an image cannot be read."""
        ids = [int(t) for t in prompt_token_ids]
        images = list(images)
        runs = placeholder_runs(ids, self.placeholder_id)
        if len(runs) != len(images):
            raise ValueError(f"the prompt has {len(runs)} image placeholder(s) (runs of token {self.placeholder_id}) "
                             f"for {len(images)} image(s); put one {IMAGE_PLACEHOLDER} where each image goes")
        if not images:
            raise ValueError("a multimodal prompt needs at least one image")
        batch = preprocess_images(images, self.processor)
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for (start, length), count in zip(runs, batch.num_tokens):
            out.extend(ids[pos:start])
            spans.append((len(out), count))
            out.extend([self.placeholder_id] * count)
            pos = start + length
        out.extend(ids[pos:])
        digests, first = [], 0
        for (t, h, w) in batch.grid_thws.tolist():
            n = t * h * w
            d = hashlib.blake2b(digest_size=16)
            d.update(f"{t},{h},{w}|".encode())
            d.update(batch.pixel_values[first:first + n].numpy().tobytes())
            digests.append(d.digest())
            first += n
        return MultimodalPrompt(out, spans, batch.pixel_values, batch.grid_thws, digests)

    @torch.inference_mode()
    def encode(self, prompt: MultimodalPrompt) -> ImageFeatures:
        """Run the vision tower and projector once: the request's ``ImageFeatures``."""
        vlm = self.vlm
        device = vlm.mm_projector.proj[0].weight.device
        dtype = vlm.language_model.dtype
        feats = vlm.encode_images(prompt.pixel_values.to(device), prompt.grid_thws)
        features = torch.cat(feats).to(device=vlm.language_model.device, dtype=dtype)
        return ImageFeatures(features, prompt.spans, prompt.digests)
