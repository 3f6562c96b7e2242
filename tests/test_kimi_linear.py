"""Kimi Linear: its config.json, the 3:1 KDA / NoPE-MLA hybrid, and its checkpoint layout."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moonlet.config import ModelConfig, preset
from moonlet.model import Transformer
from moonlet.model.attention import MLAttention
from moonlet.model.kda import KimiDeltaAttention
from moonlet.model.latent_cache import DenseLatentCache
from moonlet.testing import tiny_kimi_linear_config
from moonlet.weights import Checkpoint, load_model, save_model

FULL_ATTN = [4, 8, 12, 16, 20, 24, 27]

# moonshotai/Kimi-Linear-48B-A3B-Instruct's config.json, key for key.
PUBLISHED = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig",
                 "AutoModel": "modeling_kimi.KimiLinearModel",
                 "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"},
    "bos_token_id": 163584, "eos_token_id": 163586, "first_k_dense_replace": 1, "head_dim": 72,
    "hidden_act": "silu", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "kv_lora_rank": 512,
    "linear_attn_config": {"full_attn_layers": FULL_ATTN, "head_dim": 128,
                           "kda_layers": [i for i in range(1, 28) if i not in FULL_ATTN],
                           "num_heads": 32, "short_conv_kernel_size": 4},
    "mla_use_nope": True, "model_max_length": 1048576, "model_type": "kimi_linear", "moe_intermediate_size": 1024,
    "moe_layer_freq": 1, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 32, "num_expert_group": 1, "num_experts": 256, "num_experts_per_token": 8,
    "num_hidden_layers": 27, "num_key_value_heads": 32, "num_nextn_predict_layers": 0, "num_shared_experts": 1,
    "pad_token_id": 163839, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.56.0",
    "use_cache": True, "use_grouped_topk": True, "v_head_dim": 128, "vocab_size": 163840,
}


def tiny_config(**overrides) -> ModelConfig:
    """Kimi-Linear-shaped: KDA, KDA, KDA, NoPE MLA; a dense first layer, then sigmoid-routed experts."""
    return tiny_kimi_linear_config(**overrides)


def tiny_model(seed=0) -> Transformer:
    model = Transformer(tiny_config()).init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
    return model.eval()


# ---- config -----------------------------------------------------------------------------------------

def test_published_config_round_trips_and_maps_its_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (256, 8, 1)
    assert (cfg.scoring_func, cfg.norm_topk_prob, cfg.n_group, cfg.topk_method) == ("sigmoid", True, 1, "noaux_tc")
    assert cfg.max_position_embeddings == 1048576 and cfg.mla_use_nope and cfg.q_lora_rank is None
    assert cfg.to_dict() == PUBLISHED
    cfg.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == PUBLISHED
    t5 = ModelConfig.from_dict(cfg.to_dict("transformers5"))  # rope_parameters instead of rope_scaling
    assert t5.rope_theta == 10000.0 and t5.rope_scaling is None and t5.param_counts() == cfg.param_counts()


def test_layer_pattern_is_one_based_in_the_file():
    cfg = ModelConfig.from_dict(PUBLISHED)
    mla = [i for i in range(27) if not cfg.is_kda_layer(i)]
    assert mla == [3, 7, 11, 15, 19, 23, 26]  # the published 1-based 4, 8, ..., 27
    assert len(cfg.kda_layer_ids) == 20
    with pytest.raises(ValueError, match="1-based"):
        ModelConfig.from_dict({**PUBLISHED, "linear_attn_config": {**PUBLISHED["linear_attn_config"],
                                                                   "kda_layers": [0, 1, 2]}})
    with pytest.raises(ValueError, match="both"):
        ModelConfig.from_dict({**PUBLISHED, "linear_attn_config": {**PUBLISHED["linear_attn_config"],
                                                                   "kda_layers": [1, 4]}})


def test_preset_is_the_published_model():
    cfg = preset("kimi-linear-48b-a3b")
    published = ModelConfig.from_dict(PUBLISHED)
    assert cfg.param_counts() == published.param_counts()
    counts = cfg.param_counts()
    assert 48e9 < counts["total"] < 50e9 and 3e9 < counts["active"] < 3.6e9  # "48B total, 3B active"
    assert {k: v for k, v in cfg.to_dict().items() if k in PUBLISHED} == {
        k: v for k, v in PUBLISHED.items() if k not in ("auto_map", "transformers_version")}
    # only the 7 MLA layers keep a per-token cache
    assert cfg.kv_bytes_per_token(2)["latent"] == 576 * 7 * 2


def test_param_counts_match_a_live_model():
    # the published shapes over 4 layers (KDA, KDA, KDA, MLA), built without memory
    lin = dict(PUBLISHED["linear_attn_config"], kda_layers=[1, 2, 3], full_attn_layers=[4])
    cfg = ModelConfig.from_dict({**PUBLISHED, "num_hidden_layers": 4, "linear_attn_config": lin})
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == cfg.param_counts()["total"]
    tiny = tiny_config()
    assert tiny_model().num_parameters() == tiny.param_counts()["total"]


# ---- model ------------------------------------------------------------------------------------------

def test_hybrid_layers_are_kda_and_nope_mla():
    model = tiny_model()
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert kinds == [KimiDeltaAttention] * 3 + [MLAttention]
    assert not model.model.layers[3].self_attn.use_rope
    assert model.model.layers[0].self_attn.A_log.dtype == torch.float32


def test_tiny_hybrid_forward_backward_and_causality():
    model = tiny_model().train()
    ids = torch.randint(0, 64, (2, 80))
    logits = model(ids)
    assert logits.shape == (2, 80, 64) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # experts no token picked get no gradient; everything else must
    assert all(".experts." in n for n in missing), missing
    assert model.model.layers[0].self_attn.A_log.grad.abs().sum() > 0
    with torch.no_grad():
        prefix = model(ids[:, :50])
    assert torch.allclose(prefix, logits[:, :50].detach(), atol=1e-4)


def test_left_padding_matches_unpadded():
    model = tiny_model(seed=3)
    ids = torch.randint(0, 64, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 12])
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, 4:]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_cached_path_names_the_kda_layer():
    model = tiny_model()
    cache = DenseLatentCache(model.config, batch_size=1, max_len=8)
    with pytest.raises(NotImplementedError, match="layer 0 is a Kimi Delta Attention"):
        model(torch.zeros(1, 3, dtype=torch.long), kv=cache)
    with pytest.raises(NotImplementedError, match="layer 1"):
        model.model.layers[1](torch.zeros(1, 3, 32), None, None, kv=cache)


# ---- checkpoint -------------------------------------------------------------------------------------

def test_save_and_load_use_the_checkpoint_names(tmp_path):
    model = tiny_model(seed=5)
    save_model(model, tmp_path, dtype=torch.float32)
    with Checkpoint(tmp_path) as ckpt:
        names = set(ckpt.files)
    assert {"model.layers.0.self_attn.A_log", "model.layers.0.self_attn.q_conv1d.weight",
            "model.layers.2.self_attn.o_norm.weight", "model.layers.3.self_attn.kv_b_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.gate.e_score_correction_bias",
            "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight",
            "model.layers.1.block_sparse_moe.shared_experts.up_proj.weight"} <= names
    assert not any(".mlp.experts." in n or ".mlp.gate." in n for n in names)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_experts"] == 4 and "n_routed_experts" not in saved and saved["model_type"] == "kimi_linear"
    loaded = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model(ids), atol=1e-6)


def test_loads_a_checkpoint_written_with_hub_names(tmp_path):
    # Written by hand, the way the published checkpoint names tensors (independent of save_model).
    model = tiny_model(seed=7)
    hub = {}
    for name, tensor in model.state_dict().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer not in (None, "0") and ".mlp." in name:
            name = name.replace(".mlp.", ".block_sparse_moe.")
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                if ".experts." in name:
                    name = name.replace(f".{ours}.", f".{theirs}.")
        hub[name] = tensor.to(torch.bfloat16).contiguous()
    hub["model.layers.0.self_attn.A_log"] = model.model.layers[0].self_attn.A_log.detach().clone()  # float32
    save_file(hub, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "torch_dtype": "bfloat16"}))
    loaded = load_model(tmp_path)
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[0].self_attn.A_log.dtype == torch.float32
    assert torch.equal(loaded.model.layers[2].mlp.experts[1].up_proj.weight,
                       hub["model.layers.2.block_sparse_moe.experts.1.w3.weight"])
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        ref = model(ids)
        out = loaded.cast(torch.float32)(ids)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 weights
