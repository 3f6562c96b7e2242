"""Image requests in the engine: greedy tokens equal a plain greedy loop over the image-text model's full
forward (image features merged into the embeddings, no cache), however the engine chunks (also through
the middle of an image), batches with text requests, caches prefixes or preempts; the prefix cache keys
blocks by image content."""

import io

import numpy as np
import pytest
import torch

from moonlet.config import ModelConfig
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.multimodal import RequestImages, placeholder_runs
from moonlet.model.vision import VisionLanguageModel, merge_image_features
from moonlet.multimodal import expand_image_placeholders, preprocess_images
from moonlet.testing import TINY_VISION_CONFIG as TINY_VISION
from moonlet.testing import random_model, tiny_image_processor, tiny_k2_config

PAD = 300  # the tiny text model's image placeholder id
MAX_TOKENS = 6
PROCESSOR = tiny_image_processor()
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def tiny_vlm(seed: int = 0) -> VisionLanguageModel:
    outer = {"model_type": "kimi_k25", "media_placeholder_token_id": PAD, "text_config": tiny_k2_config().to_dict(),
             "vision_config": TINY_VISION}
    cfg = ModelConfig.from_dict(outer)
    # vision weights of std 0.05: features of about the token embeddings' size, so the image steers the tokens
    return VisionLanguageModel(cfg, random_model(cfg, seed=seed)).init_vision_weights(seed + 10, std=0.05).eval()


def png(width: int, height: int, seed: int | None = None, color=(255, 255, 255)) -> bytes:
    """A PNG of random pixels (``seed``) or of one ``color``."""
    from PIL import Image

    if seed is None:
        array = np.empty((height, width, 3), dtype=np.uint8)
        array[...] = color
    else:
        array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def reference(vlm: VisionLanguageModel, prompt: list[int], images: list[bytes], n: int = MAX_TOKENS) -> list[int]:
    """Greedy decoding over the full multimodal forward: the whole sequence re-embedded (image features at
    the placeholders) and re-run every step, no cache."""
    assert len(placeholder_runs(prompt, PAD)) == len(images)
    ids, feats = list(prompt), []
    out: list[int] = []
    lm = vlm.language_model
    with torch.no_grad():
        if images:
            batch = preprocess_images(images, PROCESSOR)
            ids = expand_image_placeholders(prompt, batch.num_tokens, PAD)
            feats = vlm.encode_images(batch.pixel_values, batch.grid_thws)
        prompt_ids = torch.tensor([ids])
        for _ in range(n):
            seq = torch.tensor([ids + out])
            embeds = lm.model.embed_tokens(seq)
            # the features go over the prompt's placeholders only (a generated placeholder id is a token)
            embeds[:, :len(ids)] = merge_image_features(embeds[:, :len(ids)], prompt_ids, feats, PAD)
            out.append(int(lm(seq, inputs_embeds=embeds)[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def vlm():
    pytest.importorskip("PIL")
    return tiny_vlm(seed=5)


@pytest.fixture(scope="module")
def images():
    # 40 x 24 px -> grid 6 x 10 -> 15 tokens; 16 x 24 -> grid 6 x 4 -> 6 tokens; 8 x 8 -> 1 token
    return {"a": png(40, 24, 1), "b": png(16, 24, 2), "c": png(8, 8, color=(255, 0, 0)), "a2": png(40, 24)}


@pytest.fixture(scope="module")
def requests(images):
    return [
        ([5, 7, PAD, 9, 11, 13], [images["a"]]),
        ([3, PAD, 8, 8, PAD, 4, 6, 17, 19], [images["b"], images["a"]]),  # two images in one prompt
        ([12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], []),  # text only, batched with them
        ([PAD, 2, 9], [images["c"]]),
    ]


@pytest.fixture(scope="module")
def expected(vlm, requests):
    return [reference(vlm, p, imgs) for p, imgs in requests]


def _prompts(requests):
    return [{"prompt": p, "images": imgs} if imgs else p for p, imgs in requests]


CONFIGS = {
    "batched": dict(num_blocks=64, block_size=4),
    "one_at_a_time": dict(num_blocks=64, block_size=4, max_num_seqs=1),
    # chunks of 5 tokens: the 15-token image of request 0 (positions 2..16) is cut at 5, 10 and 15
    "chunked_prefill": dict(num_blocks=64, block_size=4, max_num_batched_tokens=5),
    "chunk_of_one": dict(num_blocks=64, block_size=4, max_num_batched_tokens=1, decode_graphs="eager"),
    "tiny_pool_preempts": dict(num_blocks=12, block_size=4, max_num_batched_tokens=12),
    "prefix_cache_off": dict(num_blocks=64, block_size=4, enable_prefix_caching=False),
    "speculative": dict(num_blocks=64, block_size=4, speculative="ngram", num_speculative_tokens=3),
    "decode_graph_buffers": dict(num_blocks=64, block_size=4, decode_graphs="eager"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_the_full_multimodal_forward(vlm, requests, expected, name):
    llm = LLM(model=vlm, image_processor=PROCESSOR, dtype="float32", **CONFIGS[name])
    outs = llm.generate(_prompts(requests), GREEDY)
    assert [o.token_ids for o in outs] == expected
    # the prompt the engine ran is the expanded one: 15, 6 + 15, 0 and 1 image tokens
    assert [o.prompt_token_ids.count(PAD) for o in outs] == [15, 21, 0, 1]
    stats = llm.stats()
    assert stats["blocks_free"] == stats["blocks_total"]
    if name == "tiny_pool_preempts":
        assert stats["preemptions"] > 0  # recompute re-injected the features (tokens still equal)


def test_the_images_matter(vlm, requests, expected, images):
    """The reference is not blind to the pixels: another image gives other tokens (so equal outputs above
    check the features, not only the text)."""
    prompt, _ = requests[0]
    assert reference(vlm, prompt, [images["a2"]]) != expected[0]


def test_prefix_cache_keys_blocks_by_image_content(vlm, requests, expected, images):
    llm = LLM(model=vlm, image_processor=PROCESSOR, dtype="float32", num_blocks=64, block_size=4)
    prompt, imgs = requests[0]  # [5, 7] + 15 image tokens + [9, 11, 13]: 20 tokens, 5 blocks
    first = llm.generate({"prompt": prompt, "images": imgs}, GREEDY)[0]
    assert first.token_ids == expected[0] and first.num_cached_tokens == 0
    # the same image again: every full prompt block but the last (one token must be computed) hits
    again = llm.generate({"prompt": prompt, "images": imgs}, GREEDY)[0]
    assert again.token_ids == expected[0]
    assert again.num_cached_tokens == 16
    # the same placeholders with another image: only the blocks before the image could match, and
    # block 0 holds image tokens already, so nothing hits; the tokens are the other image's
    other = llm.generate({"prompt": prompt, "images": [images["a2"]]}, GREEDY)[0]
    assert other.num_cached_tokens == 0
    assert other.token_ids == reference(vlm, prompt, [images["a2"]])
    # a text prefix before the image is shared whatever the image
    long_prompt = list(range(20, 28)) + prompt
    llm.generate({"prompt": long_prompt, "images": imgs}, GREEDY)
    out = llm.generate({"prompt": long_prompt, "images": [images["a2"]]}, GREEDY)[0]
    assert out.num_cached_tokens == 8
    assert out.token_ids == reference(vlm, long_prompt, [images["a2"]])
    stats = llm.stats()
    assert stats["prefix_cache_hits"] == 16 + 8
    assert stats["blocks_free"] == stats["blocks_total"]


def test_request_images_rows_block_keys_and_release_against_brute_force():
    spans = [(2, 15), (20, 1), (21, 6)]
    mm = RequestImages(spans, [b"A", b"B", b"C"])
    owner = {}
    for i, (s, n) in enumerate(spans):
        for p in range(s, s + n):
            owner[p] = (i, p - s)
    for start in range(0, 30):
        for end in range(start, 31):
            got = {}
            for first, image, r, count in mm.rows(start, end):
                for k in range(count):
                    got[first + k] = (image, r + k)
            assert got == {p: o for p, o in owner.items() if start <= p < end}
            want = sorted({i for p, (i, _) in owner.items() if start <= p < end})
            assert mm.overlapping(start, end) == want
            key = mm.block_key(start, end)
            assert key == (b"".join(b"ABC"[i:i + 1] for i in want) if want else None)
    for computed in range(0, 30):
        mm.features = [torch.zeros(n, 1) for _, n in spans]
        mm.release(computed)
        assert [f is None for f in mm.features] == [s + n <= computed for s, n in spans]


def test_request_errors(vlm, images):
    llm = LLM(model=vlm, image_processor=PROCESSOR, dtype="float32", num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": [5, PAD, 6], "images": [images["a"], images["b"]]}, GREEDY)
    with pytest.raises(ValueError, match="has no images"):
        llm.generate([5, PAD, 6], GREEDY)
    with pytest.raises(ValueError, match="cannot decode"):
        llm.generate({"prompt": [5, PAD, 6], "images": [b"not an image"]}, GREEDY)
    text_llm = LLM(model=random_model(tiny_k2_config(), seed=1), num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="no vision"):
        text_llm.generate({"prompt": [5, PAD, 6], "images": [images["a"]]}, GREEDY)
    # a text-only model keeps treating the placeholder id as an ordinary token
    assert len(text_llm.generate([5, PAD, 6], GREEDY)[0].token_ids) == MAX_TOKENS
