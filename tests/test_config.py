import json
from pathlib import Path

import pytest

from moonlet.config import PRESETS, ModelConfig, preset

SPECS = Path(__file__).resolve().parents[1].parent / "shared" / "specs" / "configs"


def test_published_param_counts():
    k2 = preset("kimi-k2").param_counts()
    assert k2 == {"total": 1_026_408_232_448, "active": 32_861_500_928}
    ml = preset("moonlight-16b-a3b").param_counts()
    assert ml == {"total": 15_960_110_208, "active": 2_914_776_192}
    v3 = preset("deepseek-v3").param_counts()
    assert round(v3["total"] / 1e9, 2) == 671.03 and round(v3["active"] / 1e9, 2) == 37.55
    assert preset("deepseek-v2-lite").param_counts()["total"] == 15_706_484_224


def test_forecast_preset_is_big_and_long():
    cfg = preset("kimi-k3-forecast")
    assert cfg.param_counts()["total"] >= 2.5e12
    assert cfg.max_position_embeddings >= 1_000_000


def test_latent_cache_size_k2():
    cfg = preset("kimi-k2")
    assert cfg.latent_dim == 576
    assert cfg.kv_bytes_per_token(2)["latent"] == 70_272


def test_softmax_scale_yarn():
    assert preset("kimi-k2").softmax_scale == pytest.approx(0.1308608, abs=1e-7)
    assert preset("kimi-k2-0905").softmax_scale == pytest.approx(0.1446796, abs=1e-7)
    assert preset("moonlight-16b-a3b").softmax_scale == pytest.approx(192**-0.5)


@pytest.mark.parametrize("name", ["kimi-k2-instruct", "moonlight-16b-a3b-instruct"])
def test_reads_published_configs(name):
    path = SPECS / f"{name}.config.json"
    if not path.exists():
        pytest.skip("shared specs not present")
    cfg = ModelConfig.from_json_file(path)
    ref = preset("kimi-k2" if name.startswith("kimi") else "moonlight-16b-a3b")
    assert cfg.param_counts() == ref.param_counts()
    # round trip keeps every key of the original
    original = json.loads(path.read_text())
    back = cfg.to_dict()
    for key, value in original.items():
        assert back[key] == value, key


def test_rope_parameters_spelling_round_trip():
    cfg = preset("kimi-k2")
    t5 = cfg.to_dict("transformers5")
    assert "rope_scaling" not in t5 and t5["rope_parameters"]["rope_type"] == "yarn"
    assert t5["rope_parameters"]["rope_theta"] == 50000.0
    again = ModelConfig.from_dict(t5)
    assert again.rope_scaling["factor"] == 32.0 and again.rope_theta == 50000.0
    assert again.softmax_scale == cfg.softmax_scale


def test_kimi_k25_text_config():
    text = preset("kimi-k2.6").to_dict()
    outer = {"model_type": "kimi_k25", "vision_config": {"hidden_size": 1152}, "text_config": text}
    cfg = ModelConfig.from_dict(outer)
    assert cfg.model_type == "kimi_k2" and cfg.hidden_size == 7168
    assert cfg.to_dict()["vision_config"] == {"hidden_size": 1152}
    assert cfg.to_dict()["text_config"]["n_routed_experts"] == 384


def test_all_presets_build():
    for name in PRESETS:
        assert preset(name).param_counts()["total"] > 0


def test_bad_configs_are_clear():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_dict({"model_type": "deepseek_v3", "n_routed_experts": 10, "n_group": 3})
    with pytest.raises(KeyError, match="presets"):
        preset("kimi-k9")


def test_new_optional_keys_stay_out_of_configs_that_do_not_use_them():
    """moba_config, mla_use_nope and linear_attn_config appear in config.json only when set, so the
    published K2 / DeepSeek configs round-trip with their own keys."""
    from moonlet.config import preset

    for name in ("kimi-k2", "moonlight-16b-a3b", "deepseek-v3"):
        out = preset(name).to_dict()
        assert not {"moba_config", "mla_use_nope", "linear_attn_config"} & set(out), name
    moba = preset("moonlight-16b-a3b").replace(moba_config={"block_size": 512, "top_k": 3}).to_dict()
    assert moba["moba_config"] == {"block_size": 512, "top_k": 3, "full_attention_layers": []}
