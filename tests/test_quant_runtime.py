"""Quantized checkpoints kept quantized at run time (load_model(quantized="keep")).

The independent reference is the same checkpoint loaded with quantized="dequantize" (moonlet.quant
turns every stored weight into a dense one while loading, and the model runs plain nn.Linear): in
float32 both compute with the same weight values, so logits must agree to fp32 rounding. The kept
model's buffers are compared byte for byte with the safetensors files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.config import EngineConfig
from moonlet.kernels.moe import fuse_moe_experts
from moonlet.kernels.quant_moe import QuantStackedExperts
from moonlet.model.quantized import Fp8BlockLinear, Int4GroupLinear, QuantizedLinear, quantized_modules, weight_bytes
from moonlet.testing import random_model, tiny_k2_config
from moonlet.weights import INDEX_NAME, load_model, save_model

FP8_16 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
# name -> (quantization written, module class kept)
FORMATS = {"fp8_block16": (FP8_16, Fp8BlockLinear), "fp8_block128": ("fp8", Fp8BlockLinear),
           "int4": ("int4", Int4GroupLinear)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny K2 checkpoints (bf16 on disk, like the published ones) in each quantized format. Block 128 on
    the tiny shapes makes every FP8 block a partial edge block."""
    root = tmp_path_factory.mktemp("quant-runtime")
    model = random_model(tiny_k2_config(), seed=11)
    out = {}
    for name, (quantization, _) in FORMATS.items():
        out[name] = save_model(model, root / name, max_shard_bytes=60_000, dtype=torch.bfloat16,
                               quantization=quantization)
    return out


def file_tensors(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / INDEX_NAME).read_text())
    out = {}
    for name, file_name in index["weight_map"].items():
        with safe_open(str(directory / file_name), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (float8 has no torch.equal on every build: compare the raw bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def ids_batch(seed=0):
    return torch.randint(2, 320, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kept_modules_replace_exactly_the_stored_quantized_linears(checkpoints, fmt):
    kept = load_model(checkpoints[fmt], quantized="keep")
    files = file_tensors(checkpoints[fmt])
    cls = FORMATS[fmt][1]
    names = dict(quantized_modules(kept))
    assert names and all(type(m) is cls for m in names.values())
    marker = ".weight_scale_inv" if cls is Fp8BlockLinear else ".weight_packed"
    stored = {n[: -len(marker)] for n in files if n.endswith(marker)}
    assert set(names) == stored
    if cls is Int4GroupLinear:  # K2.5 layout: only routed experts, the shared expert and attention stay bf16
        assert all(".mlp.experts." in n for n in names)
        assert isinstance(kept.model.layers[1].mlp.shared_experts.gate_proj, torch.nn.Linear)
    else:  # K2 layout: every linear but lm_head (and the router, not an nn.Linear)
        assert "model.layers.0.self_attn.kv_b_proj" in names and "model.layers.1.mlp.shared_experts.up_proj" in names
    assert isinstance(kept.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_buffers_are_the_files_bytes_and_state_dict_keeps_hub_names(checkpoints, fmt):
    kept = load_model(checkpoints[fmt], quantized="keep")
    files = file_tensors(checkpoints[fmt])
    for when in ("loaded", "fused"):
        state = kept.state_dict()
        assert set(state) == set(files)
        bad = [n for n in files if not same_bytes(state[n], files[n])]
        assert not bad, f"{when}: {bad[:5]}"
        fuse_moe_experts(kept)  # the stacks hold the same bytes; the buffers become views of them
    assert isinstance(kept.model.layers[1].mlp.stacked, QuantStackedExperts)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_logits_equal_the_dequantized_load_in_float32(checkpoints, fmt):
    reference = load_model(checkpoints[fmt], dtype=torch.float32)
    kept = load_model(checkpoints[fmt], dtype=torch.float32, quantized="keep")
    assert not quantized_modules(reference) and quantized_modules(kept)
    ids = ids_batch()
    with torch.no_grad():
        want = reference(ids)
        got = kept(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        fuse_moe_experts(kept)  # the grouped quantized MoE (reference path on CPU)
        assert isinstance(kept.model.layers[2].mlp.stacked, QuantStackedExperts)
        torch.testing.assert_close(kept(ids), want, rtol=1e-5, atol=1e-5)
    assert kept.num_parameters() == reference.num_parameters()


@pytest.mark.parametrize("fmt", ["fp8_block16", "int4"])
def test_bf16_run_close_to_the_dequantized_load(checkpoints, fmt):
    reference = load_model(checkpoints[fmt])  # bf16 as stored
    kept = load_model(checkpoints[fmt], quantized="keep")
    assert kept.dtype == torch.bfloat16
    ids = ids_batch(1)
    with torch.no_grad():
        want, got = reference(ids).float(), kept(ids).float()
    assert (got - want).norm() / want.norm() < 1e-2


def test_shared_expert_joins_the_stack_only_in_the_experts_format(checkpoints):
    fp8 = load_model(checkpoints["fp8_block16"], quantized="keep")
    int4 = load_model(checkpoints["int4"], quantized="keep")
    fuse_moe_experts(fp8)
    fuse_moe_experts(int4)
    cfg = fp8.config
    assert fp8.model.layers[1].mlp.stacked.shared_slot  # K2 FP8: shared expert FP8 too, group E
    assert fp8.model.layers[1].mlp.stacked.num_groups == cfg.n_routed_experts + 1
    assert not int4.model.layers[1].mlp.stacked.shared_slot  # K2.5: bf16 shared expert stays a dense MLP
    assert int4.model.layers[1].mlp.stacked.num_groups == cfg.n_routed_experts


@pytest.mark.parametrize("fmt", ["fp8_block16", "int4"])
def test_memory_is_the_files_not_bf16(checkpoints, fmt):
    directory = checkpoints[fmt]
    file_bytes = json.loads((directory / INDEX_NAME).read_text())["metadata"]["total_size"]
    kept = load_model(directory, quantized="keep")
    dense = load_model(directory)  # bf16
    state_bytes = sum(t.numel() * t.element_size() for t in kept.state_dict().values())
    assert state_bytes == file_bytes
    rotary = kept.model.rotary_emb.inv_freq
    assert weight_bytes(kept) == file_bytes + rotary.numel() * rotary.element_size()
    fuse_moe_experts(kept)
    assert weight_bytes(kept) == file_bytes + rotary.numel() * rotary.element_size()  # stacking copies nothing
    quantized_share = sum(m.logical_numel() for _, m in quantized_modules(kept))
    # every quantized weight saves at least half its bf16 bytes (FP8: 1 byte + scales; INT4: 0.5 + scales)
    assert weight_bytes(dense) - weight_bytes(kept) >= 0.4 * 2 * quantized_share


def test_cast_and_save_keep_the_stored_tensors(checkpoints, tmp_path):
    directory = checkpoints["int4"]
    kept = load_model(directory, dtype=torch.float32, quantized="keep")
    files = file_tensors(directory)
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale"
    kept.cast(torch.float16)
    assert same_bytes(kept.state_dict()[name], files[name])  # bf16 scales stay bf16
    assert kept.dtype == torch.float16
    kept = load_model(directory, dtype=torch.float32, quantized="keep").cast(torch.bfloat16)  # exact: bf16 on disk
    save_model(kept, tmp_path / "again")
    again = file_tensors(tmp_path / "again")
    assert set(again) == set(files) and all(same_bytes(again[n], files[n]) for n in files)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    reloaded = load_model(tmp_path / "again", dtype=torch.float32, quantized="keep")
    ids = ids_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), load_model(directory, dtype=torch.float32)(ids),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="written as stored"):
        save_model(kept, tmp_path / "requant", quantization="fp8")


def test_plain_checkpoint_loads_the_same_with_keep(tmp_path):
    model = random_model(tiny_k2_config(), seed=2)
    save_model(model, tmp_path)
    kept = load_model(tmp_path, quantized="keep")
    assert not quantized_modules(kept)
    with pytest.raises(ValueError, match="quantized='bf16'"):
        load_model(tmp_path, quantized="bf16")


def test_absorbed_attention_uses_a_dequantized_kv_b_proj(checkpoints):
    kept = load_model(checkpoints["fp8_block16"], dtype=torch.float32, quantized="keep")
    reference = load_model(checkpoints["fp8_block16"], dtype=torch.float32)
    attn, ref_attn = kept.model.layers[0].self_attn, reference.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, QuantizedLinear)
    for a, b in zip(attn.absorbed_weights(), ref_attn.absorbed_weights()):
        assert torch.equal(a, b)
    first = attn.absorbed_weights()[0]
    assert attn.absorbed_weights()[0].data_ptr() == first.data_ptr()  # cached, not dequantized per call


@pytest.mark.parametrize("fmt", ["fp8_block16", "int4"])
def test_engine_greedy_keep_equals_dequantize(checkpoints, fmt):
    prompts = [torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for mode in ("keep", "dequantize"):
        llm = LLM(str(checkpoints[fmt]), quantization=mode, device="cpu", dtype="float32", num_blocks=64)
        assert bool(quantized_modules(llm.engine.model)) == (mode == "keep")
        outs[mode] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["keep"] == outs["dequantize"]
    assert all(len(t) == 8 for t in outs["keep"])


def test_engine_quantization_setting_is_checked():
    with pytest.raises(ValueError, match="quantization='int8'"):
        EngineConfig(quantization="int8").validate()


def test_cli_flag_reaches_the_engine_arguments():
    import argparse

    from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--quantization", "keep"]))["quantization"] == "keep"
    assert "quantization" not in engine_args_from_cli(parser.parse_args([]))
