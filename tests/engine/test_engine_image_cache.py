"""Image serving that does not redo work: lazy encoding (no tower run for an image inside a prefix-cache
hit), the image feature cache (LRU by digest, bounded in bytes), one packed tower forward per step, and
``LLM.chat`` with image parts. Every output is compared with the plain greedy loop over the full
multimodal forward (``test_engine_vision.reference``); the tower's calls are counted by a spy on its
forward, independently of the engine's own counters."""

import base64
import io
import random

import pytest
import torch
from test_engine_vision import GREEDY, PAD, PROCESSOR, TINY_VISION, png, reference, tiny_vlm

from moonlet.config import ModelConfig
from moonlet.engine import LLM, SamplingParams
from moonlet.engine.multimodal import ImageFeatureCache
from moonlet.model.vision import VisionLanguageModel
from moonlet.multimodal import IMAGE_PLACEHOLDER, preprocess_images
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir, tiny_vision_tokenizer_dir
from moonlet.tokenizer import Tokenizer

HIDDEN = TINY_VISION["text_hidden_size"]
TOKENS = {"a": 15, "b": 6, "c": 1}  # image tokens of the images below (40x24, 16x24, 8x8 px at patch 4)
TURN1 = [5, 7, PAD, 9, 11, 13]  # the image's 15 tokens at positions 2..16 once expanded


@pytest.fixture(scope="module")
def vlm():
    pytest.importorskip("PIL")
    return tiny_vlm(seed=5)


@pytest.fixture(scope="module")
def images():
    return {"a": png(40, 24, 1), "b": png(16, 24, 2), "c": png(8, 8, 3)}


class TowerSpy:
    """Records the patch grids of every call of the vision tower's forward."""

    def __init__(self, tower, monkeypatch):
        self.calls: list[list[tuple[int, int, int]]] = []
        forward = tower.forward

        def spy(pixel_values, grid_thws):
            self.calls.append([tuple(int(v) for v in g) for g in torch.as_tensor(grid_thws).tolist()])
            return forward(pixel_values, grid_thws)

        monkeypatch.setattr(tower, "forward", spy)


def make_llm(vlm, **kwargs) -> LLM:
    args = dict(num_blocks=64, block_size=4)
    args.update(kwargs)
    return LLM(model=vlm, image_processor=PROCESSOR, dtype="float32", **args)


def feature_bytes(name: str) -> int:
    return TOKENS[name] * HIDDEN * 4  # float32 rows of the text hidden size


@pytest.mark.parametrize("cache", [None, 0], ids=["feature_cache", "feature_cache_off"])
def test_next_chat_turn_does_not_run_the_tower_again(vlm, images, monkeypatch, cache):
    reply = reference(vlm, TURN1, [images["a"]])
    turn2 = TURN1 + reply + [21, 22, 23]  # turn 1, the reply and new user text, with the same image
    want = reference(vlm, turn2, [images["a"]])
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    llm = make_llm(vlm, image_feature_cache_memory=cache)
    first = llm.generate({"prompt": TURN1, "images": [images["a"]]}, GREEDY)[0]
    assert first.token_ids == reply
    assert len(spy.calls) == 1
    second = llm.generate({"prompt": turn2, "images": [images["a"]]}, GREEDY)[0]
    assert second.token_ids == want
    assert second.num_cached_tokens == 24 >= 2 + TOKENS["a"]  # the hit covers the whole image
    assert len(spy.calls) == 1  # not run again, with or without the feature cache
    stats = llm.stats()
    assert (stats["images_encoded"], stats["image_encoder_calls"], stats["images_skipped"],
            stats["image_cache_hits"]) == (1, 1, 1, 0)
    assert stats["image_cache_bytes"] == (0 if cache == 0 else feature_bytes("a"))


def test_feature_cache_serves_the_same_image_in_another_prompt(vlm, images, monkeypatch):
    other = [40, 41, 42, 43, 44, PAD, 9]  # no block in common with TURN1: no prefix hit
    want = reference(vlm, other, [images["a"]])
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    llm = make_llm(vlm)
    llm.generate({"prompt": TURN1, "images": [images["a"]]}, GREEDY)
    out = llm.generate({"prompt": other, "images": [images["a"]]}, GREEDY)[0]
    assert out.num_cached_tokens == 0 and out.token_ids == want
    assert len(spy.calls) == 1
    stats = llm.stats()
    assert (stats["images_encoded"], stats["image_cache_hits"], stats["images_skipped"]) == (1, 1, 0)
    # with the cache off the tower runs again, and the tokens are the same
    off = make_llm(vlm, image_feature_cache_memory=0)
    off.generate({"prompt": TURN1, "images": [images["a"]]}, GREEDY)
    again = off.generate({"prompt": other, "images": [images["a"]]}, GREEDY)[0]
    assert again.token_ids == want
    assert len(spy.calls) == 3
    stats = off.stats()
    assert (stats["images_encoded"], stats["image_cache_hits"], stats["image_cache_bytes"]) == (2, 0, 0)


def test_feature_cache_evicts_least_recently_used_by_bytes(vlm, images, monkeypatch):
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    llm = make_llm(vlm, image_feature_cache_memory=feature_bytes("a") + feature_bytes("b"))
    lead = iter(range(100, 200))

    def ask(name: str) -> None:  # a fresh leading token each time: never a prefix hit
        prompt = [next(lead), PAD, 9]
        out = llm.generate({"prompt": prompt, "images": [images[name]]}, GREEDY)[0]
        assert out.num_cached_tokens == 0
        calls = len(spy.calls)
        assert out.token_ids == reference(vlm, prompt, [images[name]])
        del spy.calls[calls:]  # the reference's own tower calls

    def state():
        s = llm.stats()
        return s["images_encoded"], s["image_cache_hits"], s["image_cache_bytes"]

    ask("a")
    ask("b")
    assert state() == (2, 0, feature_bytes("a") + feature_bytes("b"))  # exactly full
    ask("a")  # a hit, and now b is the least recently used
    assert state() == (2, 1, feature_bytes("a") + feature_bytes("b"))
    ask("c")  # over the budget: b goes
    assert state() == (3, 1, feature_bytes("a") + feature_bytes("c"))
    ask("a")
    assert state() == (3, 2, feature_bytes("a") + feature_bytes("c"))
    ask("b")  # encoded again; c (least recently used) goes, which makes room
    assert state() == (4, 2, feature_bytes("a") + feature_bytes("b"))
    ask("c")  # a is now the least recently used
    assert state() == (5, 2, feature_bytes("b") + feature_bytes("c"))
    assert len(spy.calls) == 5


def test_feature_cache_against_a_brute_force_lru():
    rng = random.Random(0)
    budget = 1000
    cache = ImageFeatureCache(budget)
    model: list[tuple[bytes, int]] = []  # (digest, bytes), least recently used first
    for _ in range(2000):
        digest = bytes([rng.randrange(12)])
        if rng.random() < 0.5:
            got = cache.get(digest)
            hit = [e for e in model if e[0] == digest]
            assert (got is not None) == bool(hit)
            if hit:
                assert got.numel() * 4 == hit[0][1]
                model.remove(hit[0])
                model.append(hit[0])
        else:
            size = 4 * rng.randrange(1, 400)  # some entries are larger than the whole budget
            cache.put(digest, torch.zeros(size // 4))
            if size <= budget and all(d != digest for d, _ in model):
                model.append((digest, size))
                while sum(s for _, s in model) > budget:
                    model.pop(0)
        assert cache.num_bytes == sum(s for _, s in model) <= budget
        assert len(cache) == len(model)
    off = ImageFeatureCache(0)
    off.put(b"x", torch.zeros(1))
    assert off.get(b"x") is None and off.num_bytes == 0
    with pytest.raises(ValueError, match=">= 0"):
        ImageFeatureCache(-1)


@pytest.mark.parametrize("cache", [None, 0], ids=["feature_cache", "feature_cache_off"])
def test_preemption_after_a_skipped_encode(vlm, images, cache):
    """Turn 2 is admitted with its image inside the prefix hit (not encoded), then preempted by a growing
    text request that also takes its freed blocks; its recompute needs the image: from the feature cache,
    or (cache off) encoded from the kept patches. The tokens are the reference's either way."""
    llm = make_llm(vlm, num_blocks=12, image_feature_cache_memory=cache)
    first = llm.generate({"prompt": TURN1, "images": [images["a"]]}, GREEDY)[0]
    turn2 = TURN1 + first.token_ids + [21, 22, 23]
    long_text = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = llm.generate([list(range(100, 111)), {"prompt": turn2, "images": [images["a"]]}], [long_text, GREEDY])
    assert outs[0].token_ids == reference(vlm, list(range(100, 111)), [], n=30)
    assert outs[1].token_ids == reference(vlm, turn2, [images["a"]])
    stats = llm.stats()
    assert stats["preemptions"] >= 1 and stats["images_skipped"] == 1  # the scenario happened
    if cache == 0:
        assert (stats["images_encoded"], stats["image_cache_hits"]) == (2, 0)  # encoded again
    else:
        assert (stats["images_encoded"], stats["image_cache_hits"]) == (1, 1)
    assert stats["blocks_free"] == stats["blocks_total"]


@pytest.fixture(scope="module")
def requests(images):
    return [
        ([5, 7, PAD, 9, 11, 13], [images["a"]]),
        ([3, PAD, 8, 8, PAD, 4, 6, 17, 19], [images["b"], images["a"]]),
        ([12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], []),
        ([PAD, 2, 9], [images["c"]]),
    ]


def test_one_packed_tower_call_per_step_equals_per_image_encoding(vlm, images, requests, monkeypatch):
    expected = [reference(vlm, p, imgs) for p, imgs in requests]
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    llm = make_llm(vlm)
    outs = llm.generate([{"prompt": p, "images": imgs} if imgs else p for p, imgs in requests], GREEDY)
    assert [o.token_ids for o in outs] == expected
    # all four admitted in the first step: a, b and c (a is in two requests) through the tower at once
    assert spy.calls == [[(1, 6, 10), (1, 6, 4), (1, 2, 2)]]
    assert (llm.stats()["images_encoded"], llm.stats()["image_encoder_calls"]) == (3, 1)
    # the packed features are exactly those of each image alone
    cache = llm.engine.vision.cache
    monkeypatch.undo()
    with torch.no_grad():
        for name in ("a", "b", "c"):
            batch = preprocess_images([images[name]], PROCESSOR)
            alone = vlm.encode_images(batch.pixel_values, batch.grid_thws)[0]
            digest = llm.engine.prepare_prompt([PAD], [images[name]]).digests[0]
            assert torch.equal(cache.get(digest), alone)
    # one request at a time: a call per step that meets new images, same tokens
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    single = make_llm(vlm, max_num_seqs=1, image_feature_cache_memory=0)
    outs = single.generate([{"prompt": p, "images": imgs} if imgs else p for p, imgs in requests], GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert spy.calls == [[(1, 6, 10)], [(1, 6, 4), (1, 6, 10)], [(1, 2, 2)]]


def test_chunked_prefill_encodes_an_image_when_a_chunk_reaches_it(vlm, images, monkeypatch):
    prompt = list(range(30, 42)) + [PAD, 9]  # 12 text tokens, then the image
    want = reference(vlm, prompt, [images["b"]])
    spy = TowerSpy(vlm.vision_tower, monkeypatch)
    llm = make_llm(vlm, max_num_batched_tokens=5)
    out = llm.generate({"prompt": prompt, "images": [images["b"]]}, GREEDY)[0]
    assert out.token_ids == want
    assert spy.calls == [[(1, 6, 4)]]
    assert llm.engine.num_steps > 3


# ---- LLM.chat with image parts ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory):
    """A tokenizer with the media tokens and a tiny image-text model whose placeholder is its <|media_pad|>."""
    pytest.importorskip("PIL")
    tok = Tokenizer.from_pretrained(tiny_vision_tokenizer_dir(tmp_path_factory.mktemp("vtok")))
    text = tiny_k2_config(vocab_size=tok.vocab_size, bos_token_id=512, eos_token_id=513)
    cfg = ModelConfig.from_dict({"model_type": "kimi_k25", "media_placeholder_token_id": tok.special_tokens["<|media_pad|>"],
                                 "text_config": text.to_dict(), "vision_config": TINY_VISION})
    vlm = VisionLanguageModel(cfg, random_model(cfg, seed=8)).init_vision_weights(9, std=0.05).eval()
    llm = LLM(model=vlm, tokenizer=tok, image_processor=PROCESSOR, dtype="float32", num_blocks=64, block_size=4)
    return llm, tok


def test_llm_chat_with_image_parts_equals_generate_with_the_hand_built_prompt(chat_stack, images):
    from PIL import Image

    llm, tok = chat_stack
    url = "data:image/png;base64," + base64.b64encode(images["a"]).decode()
    pil = Image.open(io.BytesIO(images["b"]))
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "What is in"},
                                     {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "and"}, {"type": "image", "image": pil}, "?"]},
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": [{"type": "image", "image": images["c"]}, {"type": "text", "text": "And here?"}]},
    ]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = llm.chat(conversation, params, thinking=False)[0]
    by_hand = [
        {"role": "user", "content": "What is in" + IMAGE_PLACEHOLDER + "and" + IMAGE_PLACEHOLDER + "?"},
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": IMAGE_PLACEHOLDER + "And here?"},
    ]
    ids = tok.encode(tok.apply_chat_template(by_hand, thinking=False), allow_special=True)
    want = llm.generate({"prompt": ids, "images": [images["a"], images["b"], images["c"]]}, params)[0]
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.token_ids == want.token_ids
    assert got.prompt_token_ids.count(tok.special_tokens["<|media_pad|>"]) == 15 + 6 + 1
    # the kimi-k2.6 template itself renders an image part as the placeholder, where it stands
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                     {"type": "image_url", "image_url": {"url": url}},
                                                                     {"type": "text", "text": "y"}]}], thinking=False)
    assert "x" + IMAGE_PLACEHOLDER + "y" in rendered


def test_llm_chat_image_errors(chat_stack, images, tmp_path):
    llm, _ = chat_stack
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="not fetched"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}],
                 params)
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\] is an image part without an image"):
        llm.chat([{"role": "user", "content": [{"type": "image"}]}], params)
    with pytest.raises(ValueError, match="cannot decode"):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": b"not a png"}]}], params)
    tiny = tiny_tokenizer_dir(tmp_path / "tok")
    text_llm = LLM(model=random_model(tiny_k2_config(vocab_size=768), seed=1), tokenizer=Tokenizer.from_pretrained(tiny),
                   num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="no vision"):
        text_llm.chat([{"role": "user", "content": [{"type": "image", "image": images["a"]}]}], params)


def test_image_feature_cache_setting_and_flag(vlm):
    import argparse

    from moonlet.engine.config import IMAGE_FEATURE_CACHE_BYTES, EngineConfig, add_engine_cli_args, engine_args_from_cli

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args([])).get("image_feature_cache_memory") is None
    args = engine_args_from_cli(parser.parse_args(["--image-feature-cache-memory", "64MiB"]))
    assert EngineConfig.from_kwargs(**args).image_cache_bytes() == 64 * 2**20
    args = engine_args_from_cli(parser.parse_args(["--image-feature-cache-memory", "0"]))
    assert make_llm(vlm, **args).engine.vision.cache.max_bytes == 0
    assert make_llm(vlm).engine.vision.cache.max_bytes == IMAGE_FEATURE_CACHE_BYTES == 256 * 2**20
    with pytest.raises(ValueError, match="image_feature_cache_memory"):
        EngineConfig(image_feature_cache_memory=-5).validate()
    with pytest.raises(ValueError, match="memory size"):
        EngineConfig(image_feature_cache_memory="lots").validate()
