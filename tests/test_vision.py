"""K2.5 / K2.6 vision: MoonViT, the patch-merger projector, image preprocessing, the image-text forward.

Every check compares with an independent computation: per-position loops for the 2D rotary embedding
and the patch merger, a hand-written bicubic for the position-table resize, an explicit block-diagonal
mask for packed attention, one image at a time for packing, hand-computed sizes for the resize rule,
the published K2.5 tensor list for names and shapes.
"""

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moonlet.config import ModelConfig, VisionConfig, preset
from moonlet.model import DenseLatentCache
from moonlet.model.vision import (VisionLanguageModel, apply_rope_2d, interpolate_pos_emb,
                                  merge_image_features, merge_patches, packed_attention, rope_2d_cos_sin,
                                  sincos_time_embedding)
from moonlet.multimodal import (IMAGE_PLACEHOLDER, ImageProcessorConfig, expand_image_placeholders,
                                image_to_patches, load_image, plan_resize, preprocess_images)
from moonlet.testing import TINY_VISION_CONFIG as TINY_VISION
from moonlet.testing import random_model, tiny_k2_config
from moonlet.weights import load_model, load_vision_language_model, save_model

PAD = 300  # the tiny text model's image placeholder id



def tiny_config(**vision) -> ModelConfig:
    text = tiny_k2_config()
    outer = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
             "media_placeholder_token_id": PAD, "text_config": text.to_dict(),
             "vision_config": {**TINY_VISION, **vision}}
    return ModelConfig.from_dict(outer)


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    cfg = tiny_config()
    return VisionLanguageModel(cfg, random_model(cfg, seed=seed)).init_vision_weights(seed + 10).eval()


# ---- config -----------------------------------------------------------------------------------------

# The published K2.5 checkpoint's vision tensors and shapes (from its safetensors index; N = 0..26).
PUBLISHED_SHAPES = {
    "vision_tower.patch_embed.proj.weight": (1152, 3, 14, 14), "vision_tower.patch_embed.proj.bias": (1152,),
    "vision_tower.patch_embed.pos_emb.weight": (64, 64, 1152),
    "vision_tower.encoder.blocks.N.wqkv.weight": (3456, 1152), "vision_tower.encoder.blocks.N.wqkv.bias": (3456,),
    "vision_tower.encoder.blocks.N.wo.weight": (1152, 1152), "vision_tower.encoder.blocks.N.wo.bias": (1152,),
    "vision_tower.encoder.blocks.N.mlp.fc0.weight": (4304, 1152), "vision_tower.encoder.blocks.N.mlp.fc0.bias": (4304,),
    "vision_tower.encoder.blocks.N.mlp.fc1.weight": (1152, 4304), "vision_tower.encoder.blocks.N.mlp.fc1.bias": (1152,),
    "vision_tower.encoder.blocks.N.norm0.weight": (1152,), "vision_tower.encoder.blocks.N.norm0.bias": (1152,),
    "vision_tower.encoder.blocks.N.norm1.weight": (1152,), "vision_tower.encoder.blocks.N.norm1.bias": (1152,),
    "vision_tower.encoder.final_layernorm.weight": (1152,), "vision_tower.encoder.final_layernorm.bias": (1152,),
    "mm_projector.pre_norm.weight": (1152,), "mm_projector.pre_norm.bias": (1152,),
    "mm_projector.proj.0.weight": (4608, 4608), "mm_projector.proj.0.bias": (4608,),
    "mm_projector.proj.2.weight": (7168, 4608), "mm_projector.proj.2.bias": (7168,),
}


def _expand(shapes: dict, layers: int) -> dict:
    out = {}
    for name, shape in shapes.items():
        for i in (range(layers) if ".N." in name else [None]):
            out[name.replace(".N.", f".{i}.") if i is not None else name] = shape
    return out


def test_published_vision_config_builds_the_published_tensors():
    cfg = preset("kimi-k2.5")
    vc = cfg.vision_config
    assert (vc.vt_hidden_size, vc.vt_num_hidden_layers, vc.head_dim, vc.merged_dim) == (1152, 27, 72, 4608)
    assert cfg.media_placeholder_token_id == 163605 and cfg.hidden_size == 7168
    with torch.device("meta"):
        model = VisionLanguageModel(cfg, language_model=torch.nn.Identity())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _expand(PUBLISHED_SHAPES, 27)
    assert got == want
    assert len([k for k in want if k.startswith("vision_tower.")]) == 329
    # counts: by hand from the shapes above; the model card says "MoonViT, 400M"
    block = 3456 * 1152 + 3456 + 1152 * 1152 + 1152 + 2 * 4304 * 1152 + 4304 + 1152 + 4 * 1152
    tower = 1152 * 3 * 14 * 14 + 1152 + 64 * 64 * 1152 + 27 * block + 2 * 1152
    projector = 2 * 1152 + 4608 * 4608 + 4608 + 7168 * 4608 + 7168
    assert vc.param_counts() == {"vision_tower": tower, "mm_projector": projector, "total": tower + projector}
    assert sum(math.prod(s) for k, s in want.items() if k.startswith("vision_tower.")) == tower == 416_866_032


def test_params_report_counts_the_vision_encoder():
    from moonlet.commands.params import report

    text = report(preset("kimi-k2.5"), "kimi-k2.5")
    assert "vision tower   416,866,032 (416.87M)" in text and "mm projector   54,277,888" in text
    assert "model_type kimi_k25, text model deepseek_v3" in text
    assert "vision" not in report(preset("kimi-k2"), "kimi-k2")


def test_vision_config_round_trips_and_refuses_what_it_does_not_implement():
    published = preset("kimi-k2.5").to_dict()
    again = ModelConfig.from_dict(published).to_dict()
    assert again == published
    assert VisionConfig.from_dict(published["vision_config"]).to_dict() == published["vision_config"]
    # vLLM's spelling (no vt_ prefix), partial configs and unknown keys come back as they were
    short = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 8, "text_hidden_size": 64,
             "_attn_implementation": "flash_attention_2"}
    vc = VisionConfig.from_dict(short)
    assert vc.vt_hidden_size == 16 and vc.mm_hidden_size == 16 and vc.vt_num_hidden_layers == 27
    assert vc.to_dict() == short
    for bad, match in (({"vt_hidden_size": 12, "vt_num_attention_heads": 2}, "divisible by 4"),
                       ({"vt_hidden_size": 16, "vt_num_attention_heads": 3}, "not divisible"),
                       ({"mm_projector_type": "mlp"}, "mm_projector_type"),
                       ({"merge_type": "sd2"}, "merge_type"),
                       ({"mm_hidden_size": 7168}, "mm_hidden_size"),
                       ({"merge_kernel_size": [2]}, "merge_kernel_size")):
        with pytest.raises(ValueError, match=match):
            VisionConfig.from_dict(bad)
    with pytest.raises(ValueError, match="text_hidden_size"):
        tiny_config(text_hidden_size=32).vision_config


# ---- pieces against direct computations --------------------------------------------------------------

def test_rope_2d_against_per_position_angles():
    d, grids = 8, [(1, 3, 5), (2, 2, 3)]
    cos, sin = rope_2d_cos_sin(grids, d)
    rows = []
    for t, h, w in grids:
        for _ in range(t):
            for y in range(h):
                for x in range(w):
                    rows.append([(x if j % 2 == 0 else y) * 10000.0 ** (-4 * (j // 2) / d) for j in range(d // 2)])
    want = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(cos.double(), want.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), want.sin(), atol=1e-5, rtol=0)
    # applying = multiplying adjacent pairs, read as complex numbers, by e^(i angle)
    q = torch.randn(len(rows), 3, d)
    turned = torch.view_as_complex(q.reshape(len(rows), 3, d // 2, 2).contiguous()) * torch.polar(
        torch.ones_like(want), want).to(torch.complex64)[:, None, :]
    torch.testing.assert_close(apply_rope_2d(q, cos, sin), torch.view_as_real(turned).flatten(-2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds"):
        rope_2d_cos_sin([(1, 513, 2)], d)


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_reference(table: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75), half-pixel centers, edge indices clamped: torch's bicubic."""
    H, W, D = table.shape

    def weights(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = (o + 0.5) * n_in / n_out - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[o, min(max(base + k, 0), n_in - 1)] += _cubic(src - (base + k))
        return m

    return np.einsum("yh,xw,hwd->yxd", weights(H, out_h), weights(W, out_w), table)


def test_position_table_resize_against_hand_written_bicubic():
    table = torch.randn(6, 5, 3, dtype=torch.float64)
    for h, w in ((4, 7), (9, 3), (6, 5), (1, 1)):
        got = interpolate_pos_emb(table, h, w)
        want = torch.from_numpy(_bicubic_reference(table.numpy(), h, w)).reshape(h * w, 3)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert interpolate_pos_emb(table, 6, 5).data_ptr() == table.data_ptr()  # the table itself, unresized
    emb = sincos_time_embedding(3, 4)
    assert torch.allclose(emb[2], torch.tensor([math.sin(2), math.sin(2 / 100), math.cos(2), math.cos(2 / 100)]))


def test_patch_merger_against_a_loop():
    grids, D = [(1, 4, 6), (2, 2, 4)], 5
    x = torch.randn(24 + 16, D)
    got = merge_patches(x, grids, (2, 2))
    start = 0
    for (t, h, w), out in zip(grids, got):
        seq = x[start:start + t * h * w].reshape(t, h, w, D)
        assert out.shape == (h // 2 * (w // 2), 4, D)
        for gy in range(h // 2):
            for gx in range(w // 2):
                for i in range(2):
                    for j in range(2):
                        want = seq[:, 2 * gy + i, 2 * gx + j].mean(0)
                        torch.testing.assert_close(out[gy * (w // 2) + gx, i * 2 + j], want)
        start += t * h * w
    with pytest.raises(ValueError, match="not divisible"):
        merge_patches(torch.randn(6, D), [(1, 2, 3)], (2, 2))


def test_packed_attention_is_block_diagonal():
    lengths = [5, 3, 7]
    cu = [0, 5, 8, 15]
    q, k, v = (torch.randn(15, 2, 4) for _ in range(3))
    mask = torch.full((15, 15), float("-inf"))
    for s, e in zip(cu[:-1], cu[1:]):
        mask[s:e, s:e] = 0
    scores = torch.einsum("qhd,khd->hqk", q, k) / 2.0 + mask
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)
    torch.testing.assert_close(packed_attention(q, k, v, cu), want, atol=1e-6, rtol=0)
    assert sum(lengths) == 15


def test_packed_images_equal_each_image_alone():
    model = tiny_model()
    tower = model.vision_tower
    a, b = torch.randn(4 * 6, 3, 4, 4), torch.randn(2 * 4, 3, 4, 4)
    with torch.no_grad():
        packed = model.encode_images(torch.cat([a, b]), [[1, 4, 6], [1, 2, 4]])
        alone = [model.encode_images(a, [[1, 4, 6]])[0], model.encode_images(b, [[1, 2, 4]])[0]]
    assert [f.shape for f in packed] == [(6, 64), (2, 64)]
    for p, s in zip(packed, alone):
        torch.testing.assert_close(p, s, atol=1e-5, rtol=1e-5)
    # the grid is read as (t, h, w) row-major: transposing it changes the result
    with torch.no_grad():
        other = tower(a, [[1, 6, 4]])[0]
    assert not torch.allclose(other, tower(a, [[1, 4, 6]])[0].detach())


# ---- checkpoints -------------------------------------------------------------------------------------

def _write_config(directory, cfg: ModelConfig):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))


def test_save_load_round_trip_and_text_only_loading(tmp_path):
    model = tiny_model(seed=2)
    save_model(model, tmp_path, dtype=torch.float32)
    loaded = load_vision_language_model(tmp_path)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    text = load_model(tmp_path)  # the text model alone still loads, skipping the vision tensors
    for name, t in model.language_model.state_dict().items():
        assert torch.equal(text.state_dict()[name], t), name
    # bf16 on disk, and the loaded model runs in the checkpoint's dtype
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    half = load_vision_language_model(tmp_path / "bf16")
    assert half.vision_tower.encoder.blocks[0].wqkv.weight.dtype == torch.bfloat16
    assert torch.equal(half.mm_projector.proj[0].weight, model.mm_projector.proj[0].weight.to(torch.bfloat16))


def test_hand_written_checkpoint_with_the_published_names_loads(tmp_path):
    cfg = tiny_config()
    text = random_model(cfg, seed=5)
    gen = torch.Generator().manual_seed(0)
    shapes = _expand({
        "vision_tower.patch_embed.proj.weight": (16, 3, 4, 4), "vision_tower.patch_embed.proj.bias": (16,),
        "vision_tower.patch_embed.pos_emb.weight": (6, 5, 16),
        "vision_tower.encoder.blocks.N.wqkv.weight": (48, 16), "vision_tower.encoder.blocks.N.wqkv.bias": (48,),
        "vision_tower.encoder.blocks.N.wo.weight": (16, 16), "vision_tower.encoder.blocks.N.wo.bias": (16,),
        "vision_tower.encoder.blocks.N.mlp.fc0.weight": (24, 16), "vision_tower.encoder.blocks.N.mlp.fc0.bias": (24,),
        "vision_tower.encoder.blocks.N.mlp.fc1.weight": (16, 24), "vision_tower.encoder.blocks.N.mlp.fc1.bias": (16,),
        "vision_tower.encoder.blocks.N.norm0.weight": (16,), "vision_tower.encoder.blocks.N.norm0.bias": (16,),
        "vision_tower.encoder.blocks.N.norm1.weight": (16,), "vision_tower.encoder.blocks.N.norm1.bias": (16,),
        "vision_tower.encoder.final_layernorm.weight": (16,), "vision_tower.encoder.final_layernorm.bias": (16,),
        "mm_projector.pre_norm.weight": (16,), "mm_projector.pre_norm.bias": (16,),
        "mm_projector.proj.0.weight": (64, 64), "mm_projector.proj.0.bias": (64,),
        "mm_projector.proj.2.weight": (64, 64), "mm_projector.proj.2.bias": (64,),
    }, 2)
    vision = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    tensors = {f"language_model.{k}": v for k, v in text.state_dict().items()}
    _write_config(tmp_path, cfg)
    save_file({**tensors, **vision}, str(tmp_path / "model.safetensors"))
    loaded = load_vision_language_model(tmp_path)
    state = loaded.state_dict()
    for name, t in vision.items():
        assert torch.equal(state[name], t), name
    assert torch.equal(loaded.vision_tower.encoder.blocks[1].mlp.fc1.bias, vision["vision_tower.encoder.blocks.1.mlp.fc1.bias"])
    # a missing, an extra and a mis-shaped tensor are each named
    for change, match in ((lambda d: d.pop("mm_projector.proj.2.bias"), "not in the checkpoint: mm_projector.proj.2.bias"),
                          (lambda d: d.__setitem__("vision_tower.encoder.blocks.2.wo.bias", torch.zeros(16)),
                           "no place for: vision_tower.encoder.blocks.2.wo.bias"),
                          (lambda d: d.__setitem__("mm_projector.proj.0.weight", torch.zeros(64, 32)), "shape")):
        broken = dict(vision)
        change(broken)
        save_file({**tensors, **broken}, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_vision_language_model(tmp_path)


def test_text_only_config_refuses_vision_loading(tmp_path):
    save_model(random_model(tiny_k2_config()), tmp_path)
    with pytest.raises(ValueError, match="no vision_config"):
        load_vision_language_model(tmp_path)


# ---- the image-text forward ------------------------------------------------------------------------

def test_image_features_land_exactly_on_the_placeholders():
    model = tiny_model(seed=3)
    pixels = torch.randn(4 * 6 + 2 * 4, 3, 4, 4)
    grids = [[1, 4, 6], [1, 2, 4]]
    ids = expand_image_placeholders([5, 7, PAD, 9, 11, PAD, 13, 2], [6, 2], PAD)
    assert ids == [5, 7] + [PAD] * 6 + [9, 11] + [PAD] * 2 + [13, 2]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        feats = model.encode_images(pixels, grids)
        embeds = model.embed(input_ids, pixels, grids)
        text_embeds = model.language_model.model.embed_tokens(input_ids)
        flat = torch.cat(feats)
        k = 0
        for pos, token in enumerate(ids):  # a loop, position by position
            if token == PAD:
                assert torch.equal(embeds[0, pos], flat[k])
                k += 1
            else:
                assert torch.equal(embeds[0, pos], text_embeds[0, pos])
        assert k == flat.shape[0]
        logits = model(input_ids, pixels, grids)
        text_logits = model.language_model(input_ids)
        # causal: before the first image the logits are the text model's (up to the rounding of a longer
        # matmul); from it on they differ
        torch.testing.assert_close(logits[0, :2], text_logits[0, :2], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(logits[0, 2:], text_logits[0, 2:])
        # the inputs_embeds path with the token embeddings is the plain forward
        assert torch.equal(model.language_model(input_ids, inputs_embeds=text_embeds), text_logits)
    with pytest.raises(ValueError, match="placeholder tokens"):
        merge_image_features(text_embeds, input_ids[:, :-4], feats, PAD)


def test_cached_prefill_with_images_then_decode_matches_the_full_forward():
    model = tiny_model(seed=4)
    pixels, grids = torch.randn(2 * 4, 3, 4, 4), [[1, 2, 4]]
    ids = torch.tensor([[5, 7, PAD, PAD, 9, 11]])
    nxt = torch.tensor([[13]])
    lm = model.language_model
    with torch.no_grad():
        embeds = model.embed(ids, pixels, grids)
        full = lm(torch.cat([ids, nxt], 1), inputs_embeds=torch.cat([embeds, lm.model.embed_tokens(nxt)], 1))
        cache = DenseLatentCache(lm.config, 1, 8)
        prefill = lm(ids, kv=cache, inputs_embeds=embeds)
        step = lm(nxt, kv=cache)
    torch.testing.assert_close(prefill[0, -1], full[0, 5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[0, -1], full[0, 6], atol=1e-4, rtol=1e-4)


# ---- preprocessing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size, new, pad, grid, tokens", [
    ((100, 50), (100, 50), (12, 6), (1, 4, 8), 8),  # no shrink; pad to multiples of 28
    ((28, 28), (28, 28), (0, 0), (1, 2, 2), 1),
    ((1, 1), (1, 1), (27, 27), (1, 2, 2), 1),
    # 285 x 214 patches > 16384: scale sqrt(16384 / 60990) = 0.51830; 4000 -> 2073, 3000 -> 1554
    ((4000, 3000), (2073, 1554), (27, 14), (1, 112, 150), 56 * 75),
    # 1800 // 14 = 128 whole patches a side: 128 * 128 = 16384, at the limit, so no shrink; pad to 1820
    ((1800, 1800), (1800, 1800), (20, 20), (1, 130, 130), 65 * 65),
])
def test_resize_rule(size, new, pad, grid, tokens):
    plan = plan_resize(*size)
    assert (plan.new_width, plan.new_height) == new
    assert (plan.pad_width, plan.pad_height) == pad
    assert plan.grid_thw == grid and plan.num_tokens == tokens


def test_resize_rule_side_limit():
    plan = plan_resize(10000, 20)  # 7168 / 10000 = 0.7168 from the 512-patch side limit
    assert plan.new_height == 14 and plan.grid_thw == (1, 2, 512) and plan.num_tokens == 256
    small = ImageProcessorConfig(in_patch_limit=64, patch_limit_on_one_side=16)
    p = plan_resize(560, 112, small)  # 40 x 8 patches: side 16*14/560 = 0.4 -> 224 x 44
    assert (p.new_width, p.new_height, p.grid_thw) == (224, 44, (1, 4, 16))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_patches_normalization_and_padding():
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)  # H x W x C
    patches, grid = image_to_patches(_png(array))
    assert grid == (1, 2, 4) and patches.shape == (8, 3, 14, 14)
    # undo the patching by hand: patch (gy, gx) holds rows 14gy.., columns 14gx.., channels first
    canvas = torch.empty(28, 56, 3)
    for gy in range(2):
        for gx in range(4):
            canvas[14 * gy:14 * gy + 14, 14 * gx:14 * gx + 14] = patches[gy * 4 + gx].permute(1, 2, 0)
    want = (torch.from_numpy(array).float() / 255.0 - 0.5) / 0.5  # same size: the resize is a copy
    torch.testing.assert_close(canvas[:20, :30], want, atol=1e-6, rtol=0)
    assert torch.all(canvas[20:] == -1) and torch.all(canvas[:, 30:] == -1)  # black padding, normalized


def test_downscaled_image_and_batch():
    pytest.importorskip("PIL")
    from PIL import Image

    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    cfg = ImageProcessorConfig(in_patch_limit=100)
    plan = plan_resize(500, 300, cfg)  # 35 x 21 patches: sqrt(100 / 735) = 0.36886 -> 184 x 110
    assert (plan.new_width, plan.new_height, plan.grid_thw, plan.num_tokens) == (184, 110, (1, 8, 14), 28)
    batch = preprocess_images([_png(big), _png(big[:28, :28])], cfg)
    assert batch.grid_thws.tolist() == [[1, 8, 14], [1, 2, 2]] and batch.num_tokens == [28, 1]
    assert batch.pixel_values.shape == (8 * 14 + 4, 3, 14, 14)
    resized = np.asarray(Image.fromarray(big).resize((184, 110), resample=Image.Resampling.BICUBIC))
    first = batch.pixel_values[0].permute(1, 2, 0)  # top-left patch
    torch.testing.assert_close(first, (torch.from_numpy(resized[:14, :14].copy()).float() / 255 - 0.5) * 2, atol=1e-6, rtol=0)


def test_load_image_sources(tmp_path):
    pytest.importorskip("PIL")
    array = np.zeros((3, 4, 4), dtype=np.uint8)
    array[..., 3] = 7  # RGBA: alpha dropped
    data = _png(array)
    for source in (data, "data:image/png;base64," + base64.b64encode(data).decode()):
        assert load_image(source).size == (4, 3) and load_image(source).mode == "RGB"
    (tmp_path / "x.png").write_bytes(data)
    assert load_image(tmp_path / "x.png").size == (4, 3)
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(b"not an image")
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png,abc")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_placeholder_expansion_errors():
    assert IMAGE_PLACEHOLDER.count("<|media_pad|>") == 1
    with pytest.raises(ValueError, match="2 image placeholder"):
        expand_image_placeholders([PAD, 1, PAD], [3], PAD)


def test_generate_with_an_image_matches_a_plain_greedy_reference(tmp_path, capsys):
    """`moonlet generate --image`: the prompt gets the image placeholder expanded to the image's tokens and
    the prefill carries the image features; the tokens equal a no-cache greedy loop over the full forward."""
    pytest.importorskip("PIL")
    from moonlet.cli import main
    from moonlet.testing import _TINY_BPE_CACHE, tiny_tokenizer_dir
    from moonlet.tokenizer import K2_SPECIAL_TOKENS, Tokenizer

    tiny_tokenizer_dir(tmp_path / "base")  # trains (and caches) the tiny BPE
    ranks = _TINY_BPE_CACHE[512]
    names = {512 + slot: name for slot, name in K2_SPECIAL_TOKENS.items()}
    names.update({512 + 18: "<|media_begin|>", 512 + 19: "<|media_content|>", 512 + 20: "<|media_end|>",
                  512 + 21: "<|media_pad|>"})
    tok = Tokenizer(ranks, {name: i for i, name in names.items()})
    pad = tok.special_tokens["<|media_pad|>"]
    text = tiny_k2_config(vocab_size=768, bos_token_id=512, eos_token_id=513)
    outer = {"model_type": "kimi_k25", "media_placeholder_token_id": pad, "text_config": text.to_dict(),
             "vision_config": {**TINY_VISION, "patch_size": 14}}
    cfg = ModelConfig.from_dict(outer)
    model = VisionLanguageModel(cfg, random_model(cfg, seed=6)).init_vision_weights(7).eval()
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, dtype=torch.float32)
    tok.save_pretrained(ckpt)
    image = tmp_path / "img.png"
    image.write_bytes(_png(np.random.default_rng(2).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)))
    assert main(["generate", str(ckpt), "--prompt", "hello", "--image", str(image), "--max-tokens", "4",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out

    batch = preprocess_images([str(image)])  # 60 x 40 -> padded 84 x 56: grid 4 x 6, 6 tokens
    assert batch.num_tokens == [6]
    ids = tok.apply_chat_template([{"role": "user", "content": IMAGE_PLACEHOLDER + "hello"}], tokenize=True,
                                  add_generation_prompt=True)
    ids = expand_image_placeholders(ids, [6], pad)
    assert ids.count(pad) == 6
    out = []
    with torch.no_grad():
        feats = model.encode_images(batch.pixel_values, batch.grid_thws)
        for _ in range(4):
            seq = torch.tensor([ids + out])
            embeds = merge_image_features(model.language_model.model.embed_tokens(seq), seq, feats, pad)
            out.append(int(model.language_model(seq, inputs_embeds=embeds)[0, -1].argmax()))
            if out[-1] in (513,) or out[-1] in tok.stop_token_ids:
                break
    kept = [t for t in out if t != 513 and t not in tok.stop_token_ids]
    assert printed == tok.decode(kept) + "\n"
    with torch.no_grad():  # the image matters: the placeholders' own embeddings give other logits
        seq = torch.tensor([ids])
        blind = model.language_model(seq)[0, -1]
        seeing = model.language_model(seq, inputs_embeds=model.embed(seq, image_features=feats))[0, -1]
    assert not torch.allclose(blind, seeing)
