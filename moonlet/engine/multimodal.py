"""Image requests in the engine (K2.5 / K2.6 checkpoints with a vision tower).

A request with images carries its prompt with one run of ``<|media_pad|>`` tokens per image (the
chat template writes one pad per image; a run that is already expanded is fine too). ``VisionInputs``
(built once per engine from the ``VisionLanguageModel``) turns (prompt ids, images) into a
``MultimodalPrompt``: the images preprocessed by the K2.5 rule, each run expanded to the image's token
count, and a content digest per image. The Sequence keeps them as ``RequestImages``: per image its
span of prompt positions, digest and patches.

Encoding is lazy. Before each forward the engine calls ``VisionInputs.provide`` with the positions
every scheduled request computes; only the images with positions there get features: from the
``ImageFeatureCache`` (projected features by digest, LRU, bounded in bytes) when it has them, else
from one packed tower forward over all of the step's missing images (several requests' images
together; an image attends only within itself, so this equals encoding each alone). Hence an image
whose tokens all come from a prefix-cache hit (the next turn of a chat that re-sends it) is never
encoded, and the same image in another prompt is encoded once while it stays cached. The runner
writes the rows over the token embeddings of whatever prefill chunk covers them (a chunk may cut an
image anywhere); decodes never touch them. Once all of an image's positions are computed the
request drops its features (``RequestImages.release``): a preempted request that recomputes them
takes them from the cache again or re-encodes its kept patches.

Prefix caching: a block's hash takes, besides its tokens, the digests of the images whose tokens
lie in it (``RequestImages.block_key``), so two prompts with equal placeholders but other images
never share a block, and the same image in the same place does.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
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


class RequestImages:
    """A request's images: where each goes in the prompt, its content digest, its patches and, while
    needed, its projected features.

    Image i covers positions spans[i] = (start, length); ``pixels[i]`` / ``grids[i]`` are its packed
    patches [t * h * w, 3, p, p] (CPU) and (t, h, w) grid, kept for the request's life so that a
    preempted request can encode it again. ``features[i]`` is [length, hidden] on the model's device
    once the engine has encoded it (or found it in the feature cache) for a step that computes its
    positions, and None before that and again once all its positions are computed (``release``)."""

    def __init__(self, spans: list[tuple[int, int]], digests: list[bytes], pixels: list[torch.Tensor] | None = None,
                 grids: list[tuple[int, int, int]] | None = None):
        if len(digests) != len(spans):
            raise ValueError(f"{len(spans)} image spans but {len(digests)} digests")
        self.spans = list(spans)
        self.digests = list(digests)
        self.pixels = list(pixels) if pixels is not None else [None] * len(spans)
        self.grids = list(grids) if grids is not None else [None] * len(spans)
        self.features: list[torch.Tensor | None] = [None] * len(spans)
        self.admitted = False  # set by the engine the first time the request is scheduled
        self._starts = [s for s, _ in self.spans]

    @classmethod
    def from_prompt(cls, prompt: MultimodalPrompt) -> "RequestImages":
        pixels, first = [], 0
        grids = [tuple(int(v) for v in g) for g in prompt.grid_thws.tolist()]
        for t, h, w in grids:
            pixels.append(prompt.pixel_values[first:first + t * h * w])
            first += t * h * w
        return cls(prompt.spans, prompt.digests, pixels, grids)

    def __len__(self) -> int:
        return len(self.spans)

    def overlapping(self, start: int, end: int) -> list[int]:
        """Indices of the images with at least one position in [start, end), in order."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, end)
        return [i for i in range(first, last)
                if max(self.spans[i][0], start) < min(self.spans[i][0] + self.spans[i][1], end)]

    def rows(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """For the positions [start, end): (first position, image, first row, row count) of each piece of
        an image inside them; positions first .. first + count - 1 take rows first_row .. + count - 1
        of ``features[image]``."""
        out = []
        for i in self.overlapping(start, end):
            s, length = self.spans[i]
            a, b = max(s, start), min(s + length, end)
            out.append((a, i, a - s, b - a))
        return out

    def block_key(self, start: int, end: int) -> bytes | None:
        """What a prefix-cache block over positions [start, end) must add to its hash: the digests of
        the images with tokens in it, in order (None when it holds no image token). With the parent
        hash (which fixes where each run starts) this names the features in the block exactly."""
        keys = [self.digests[i] for i in self.overlapping(start, end)]
        return b"".join(keys) if keys else None

    def release(self, num_computed: int) -> None:
        """Drop the features of the images whose positions all lie before ``num_computed`` (computed
        into the cache): only a preemption could need them again, and then the feature cache or a new
        encode provides them."""
        for i, (s, length) in enumerate(self.spans):
            if s >= num_computed:
                break
            if s + length <= num_computed:
                self.features[i] = None


class ImageFeatureCache:
    """Projected image features by image digest, least recently used evicted first, at most
    ``max_bytes`` of tensors (0: off, nothing is kept). A tensor larger than the whole budget is not
    kept. The tensors are shared with the requests using them, never written."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the image feature cache size must be >= 0 bytes; got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_evicted = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._entries

    def get(self, digest: bytes) -> torch.Tensor | None:
        features = self._entries.get(digest)
        if features is not None:
            self._entries.move_to_end(digest)
        return features

    def put(self, digest: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or digest in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
            self.num_evicted += 1
        self._entries[digest] = features
        self.num_bytes += size


class VisionInputs:
    """The engine's image side: preprocessing, placeholder expansion and the vision tower + projector
    of a ``moonlet.model.vision.VisionLanguageModel`` (whose text model the engine runs itself)."""

    def __init__(self, vlm, processor: ImageProcessorConfig | None = None, cache_bytes: int = 0):
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
        self.cache = ImageFeatureCache(cache_bytes)
        self.images_encoded = 0  # images run through the tower
        self.vision_forwards = 0  # tower calls (each encodes one step's images, packed)
        self.cache_hits = 0  # images whose features came from the feature cache
        self.images_skipped = 0  # images never needed: all their tokens were a prefix-cache hit at admission

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
    def encode(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Run the vision tower and projector once over several images packed together (each attends
        only within itself, so this equals encoding them one by one): per image its features
        [tokens, hidden] on the text model's device and dtype."""
        vlm = self.vlm
        device = vlm.mm_projector.proj[0].weight.device
        packed = torch.cat(pixels).to(device)
        feats = vlm.encode_images(packed, torch.tensor(grids, dtype=torch.int64))
        self.images_encoded += len(grids)
        self.vision_forwards += 1
        lm = vlm.language_model
        return [f.to(device=lm.device, dtype=lm.dtype) for f in feats]

    def provide(self, work) -> None:
        """Give every image that a step computes positions of its features. ``work``: (RequestImages,
        first position, count) per scheduled request with images. Images from the feature cache come
        first; the rest (each distinct digest once) go through the tower in one packed forward and into
        the cache. A request seen for the first time counts its images that lie wholly inside its
        prefix-cache hit (``start``): the tower never runs for them."""
        missing: dict[bytes, list[tuple[RequestImages, int]]] = {}
        for images, start, count in work:
            if not images.admitted:
                images.admitted = True
                self.images_skipped += sum(1 for s, length in images.spans if s + length <= start)
            for i in images.overlapping(start, start + count):
                if images.features[i] is not None:
                    continue
                digest = images.digests[i]
                cached = self.cache.get(digest)
                if cached is not None:
                    images.features[i] = cached
                    self.cache_hits += 1
                else:
                    missing.setdefault(digest, []).append((images, i))
        if not missing:
            return
        firsts = [users[0] for users in missing.values()]
        feats = self.encode([images.pixels[i] for images, i in firsts], [images.grids[i] for images, i in firsts])
        for (digest, users), features in zip(missing.items(), feats):
            images, i = users[0]
            if features.shape[0] != images.spans[i][1]:
                raise RuntimeError(f"image {i} has {images.spans[i][1]} placeholder tokens but the tower gave "
                                   f"{features.shape[0]} features")
            self.cache.put(digest, features)
            for images, i in users:
                images.features[i] = features
