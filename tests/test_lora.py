"""LoRA adapters (moonlet.model.lora) against PEFT itself, LoRA fine-tuning, serving with an adapter, errors.

PEFT over transformers' DeepseekV3ForCausalLM (built from the same moonlet checkpoint) is the
independent reference: an adapter PEFT saves merges in moonlet to PEFT's own logits, and one moonlet
saves loads in PEFT to moonlet's logits, float32 throughout.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.model.lora import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoraSettings, add_lora,
                                lora_modules, merge_adapter, merge_lora, save_adapter)
from moonlet.testing import greedy_reference, random_model, tiny_k2_config
from moonlet.weights import load_model, save_model

CFG = dict(model_type="deepseek_v3", initializer_range=0.1)
# what PEFT over transformers 5 adapts as moonlet does: with gate/up/down_proj among its targets PEFT
# remaps them to transformers 5's fused routed-expert parameters (target_parameters) and leaves the dense
# and shared-expert MLPs alone, a different set of modules (moonlet refuses such adapters, tested below)
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _relative_error(reference: torch.Tensor, ours: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "base"
    save_model(random_model(tiny_k2_config(**CFG), seed=41), path)
    return path


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _hf_model(ckpt):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


IDS = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(43))


def test_peft_adapter_merges_to_peft_logits(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    hf = _hf_model(ckpt)
    with torch.no_grad():
        base_logits = hf(IDS).logits
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=list(ATTENTION),
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(hf, config).eval()
    _randomize_lora(wrapped, seed=44)
    with torch.no_grad():
        want = wrapped(input_ids=IDS).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    assert _relative_error(base_logits, want) > 1e-2  # the adapter really changes the model

    ours = load_model(ckpt, dtype=torch.float32, lora=tmp_path / "adapter")
    with torch.no_grad():
        got = ours(IDS)
    assert _relative_error(want, got) <= 1e-5
    # PEFT's own merge gives the same model
    with torch.no_grad():
        merged = wrapped.merge_and_unload()(input_ids=IDS).logits
    assert _relative_error(merged, got) <= 1e-5
    assert sorted(json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())["target_modules"]) == \
        sorted(ATTENTION)


def test_peft_fused_expert_adapter_is_refused(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"])
    peft.get_peft_model(_hf_model(ckpt), config).save_pretrained(tmp_path / "fused")
    with pytest.raises(ValueError, match="target_parameters"):
        load_model(ckpt, dtype=torch.float32, lora=tmp_path / "fused")


def test_default_targets_merge_is_w_plus_scaled_ba(ckpt, tmp_path):
    """All default targets (MLA projections, dense MLP, shared experts): each merged weight is the plain
    W + alpha/r B A of the file's factors, and the merged model computes what the unmerged adapter does."""
    from safetensors.torch import load_file

    model = load_model(ckpt, dtype=torch.float32)
    names = add_lora(model, LoraSettings(r=3, alpha=6.0))
    assert any(".mlp.shared_experts." in n for n in names) and any(".layers.0.mlp." in n for n in names)
    assert not any(".mlp.experts." in n for n in names)
    _randomize_lora(model, seed=47)
    with torch.no_grad():
        unmerged = model(IDS)
    save_adapter(model, tmp_path / "adapter")
    base = load_model(ckpt, dtype=torch.float32).state_dict()
    merged = load_model(ckpt, dtype=torch.float32, lora=tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME))
    assert len(tensors) == 2 * len(names)
    for name in names:
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(merged.get_submodule(name).weight, base[f"{name}.weight"] + 2.0 * b @ a)
    with torch.no_grad():
        assert _relative_error(unmerged, merged(IDS)) <= 1e-5


def test_moonlet_adapter_loads_in_peft(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    ours = load_model(ckpt, dtype=torch.float32)
    add_lora(ours, LoraSettings(r=3, alpha=5.0, targets=ATTENTION))
    _randomize_lora(ours, seed=45)
    with torch.no_grad():
        got = ours(IDS)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ckpt))

    wrapped = peft.PeftModel.from_pretrained(_hf_model(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = wrapped(input_ids=IDS).logits
    assert _relative_error(want, got) <= 1e-5
    # the same tensor names PEFT writes for the same modules
    wrapped.save_pretrained(tmp_path / "resaved")
    from safetensors.torch import load_file

    mine = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME))
    theirs = load_file(str(tmp_path / "resaved" / ADAPTER_WEIGHTS_NAME))
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # merging moonlet's own wrappers gives the unmerged function, with plain linears back
    merge_lora(ours)
    assert not lora_modules(ours)
    with torch.no_grad():
        assert _relative_error(got, ours(IDS)) <= 1e-5


def test_fresh_adapter_is_the_identity_and_inits_like_peft(ckpt):
    ours = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        before = ours(IDS)
    add_lora(ours, LoraSettings(r=4, alpha=8.0, targets=("o_proj",)))
    with torch.no_grad():
        assert torch.equal(ours(IDS), before)  # B = 0
    m = ours.model.layers[1].self_attn.o_proj
    bound = 1 / m.in_features ** 0.5  # kaiming_uniform_(a=sqrt(5)) as PEFT initializes A
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.8 * bound
    assert not m.lora_B.weight.any()


def test_clear_errors(ckpt, tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_model(ckpt, dtype=torch.float32, lora=tmp_path / "missing")
    model = load_model(ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"targets \['q_projj'\] match no linear layer"):
        add_lora(model, LoraSettings(targets=("q_projj", "o_proj")))
    with pytest.raises(ValueError, match="not a linear layer"):
        add_lora(model, LoraSettings(targets=("kv_a_layernorm",)))
    with pytest.raises(ValueError, match="unknown lora keys"):
        LoraSettings.from_dict({"rank": 4})

    # an adapter for a wider model: shapes do not match, and nothing is merged
    wide = tmp_path / "wide"
    big = random_model(tiny_k2_config(**CFG, hidden_size=96), seed=1)
    add_lora(big, LoraSettings(r=2, targets=("o_proj",)))
    save_adapter(big, wide)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"o_proj has lora_A \[2, 96\], lora_B \[96, 2\].*must be \[2, 96\] and \[64, 2\]"):
        merge_adapter(model, wide)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # an adapter naming a module this model does not have (more layers)
    deep = tmp_path / "deep"
    tall = random_model(tiny_k2_config(**CFG, num_hidden_layers=5), seed=1)
    add_lora(tall, LoraSettings(r=2, targets=("o_proj",)))
    save_adapter(tall, deep)
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.o_proj is not a module of this model"):
        load_model(ckpt, dtype=torch.float32, lora=deep)

    # DoRA and other PEFT features moonlet does not merge
    dora = tmp_path / "dora"
    shutil.copytree(wide, dora)
    cfg = json.loads((dora / ADAPTER_CONFIG_NAME).read_text())
    (dora / ADAPTER_CONFIG_NAME).write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        merge_adapter(model, dora)

    # weights kept quantized cannot take a merge
    fp8 = tmp_path / "fp8"
    save_model(load_model(ckpt, dtype=torch.float32), fp8, quantization="fp8")
    small = tmp_path / "small"
    lm = load_model(ckpt, dtype=torch.float32)
    add_lora(lm, LoraSettings(r=2, targets=("o_proj",)))
    save_adapter(lm, small)
    with pytest.raises(ValueError, match="kept quantized.*quantized='dequantize'"):
        load_model(fp8, dtype=torch.float32, quantized="keep", lora=small)
    assert load_model(fp8, dtype=torch.float32, lora=small) is not None  # dequantized: fine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from moonlet.train.data import write_dataset

    d = tmp_path_factory.mktemp("lora-data")
    rng = np.random.default_rng(0)
    phrase = rng.integers(2, 320, 12).tolist()  # one phrase repeated: quick to learn
    write_dataset([(phrase * 3, None) for _ in range(40)], d / "train", vocab_size=320)
    return d


def _lora_config(data_dir, ckpt, out, **kw):
    from moonlet.train.trainer import TrainConfig

    base = dict(init_from=str(ckpt), train_data=str(data_dir / "train"), out_dir=str(out), seq_len=24, batch_size=4,
                max_steps=8, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, log_every=1, threads=1,
                weight_decay=0.0, lora={"r": 4, "alpha": 8})
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_lora_finetune_trains_only_the_adapter_and_resumes(ckpt, data_dir, tmp_path):
    from moonlet.train.trainer import STATE_NAME, Trainer

    base = load_model(ckpt, dtype=torch.float32).state_dict()
    trainer = Trainer(_lora_config(data_dir, ckpt, tmp_path / "run"), quiet=True)
    trainer.train(max_steps=4)
    saved = trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004")
    losses = [m["loss"] for m in trainer.train()][4:]  # steps 5..8 (train returns every record)
    assert losses[-1] < 0.7 * trainer.metrics[0]["loss"], [m["loss"] for m in trainer.metrics]
    # the base model is bit-identical, router correction biases included
    state = {k: v for k, v in trainer.model.state_dict().items() if ".lora_" not in k}
    assert sorted(state) == sorted(base)
    assert all(torch.equal(state[k], base[k]) for k in base)
    # the checkpoint holds the adapter (only LoRA tensors) and the trainer state, not the model
    from safetensors.torch import load_file

    tensors = load_file(str(saved / ADAPTER_WEIGHTS_NAME))
    assert tensors and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert sorted(p.name for p in saved.glob("*.safetensors")) == [ADAPTER_WEIGHTS_NAME]
    assert (saved / STATE_NAME).is_file() and not (saved / "config.json").exists()

    # resume from step 4 gives the uninterrupted run's later losses exactly
    resumed = Trainer(_lora_config(data_dir, ckpt, tmp_path / "run"), resume=saved, quiet=True)
    assert resumed.step == 4
    assert [m["loss"] for m in resumed.train()] == losses

    # an adapter checkpoint is not a model to start a full run from
    with pytest.raises(ValueError, match="is a LoRA adapter checkpoint, not a model"):
        Trainer(_lora_config(data_dir, ckpt, tmp_path / "full", init_from=str(saved), lora=None,
                             model=tiny_k2_config(**CFG).to_dict()), quiet=True)

    # exports: the adapter, and a merged checkpoint that loads as any model and equals adapter-merging
    trainer.export_lora(tmp_path / "adapter")
    trainer.export_lora(tmp_path / "merged", merged=True)
    via_adapter = load_model(ckpt, dtype=torch.float32, lora=tmp_path / "adapter")
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert _relative_error(merged(IDS), via_adapter(IDS)) <= 1e-6
        assert _relative_error(trainer.model.eval()(IDS), merged(IDS)) <= 1e-5


def test_engine_with_lora_matches_the_merged_models_greedy_loop(ckpt, tmp_path):
    model = load_model(ckpt, dtype=torch.float32)
    add_lora(model, LoraSettings(r=4, alpha=16.0))
    _randomize_lora(model, seed=46)
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model)  # merged independently of load_model(lora=...)
    prompts = [[5, 17, 42, 99, 3], [250, 7, 8, 9, 10, 11, 12, 13]]
    expected = [greedy_reference(model, p, 12) for p in prompts]
    base = load_model(ckpt, dtype=torch.float32)
    assert [greedy_reference(base, p, 12) for p in prompts] != expected  # the adapter changes the output

    llm = LLM(str(ckpt), lora=str(tmp_path / "adapter"), device="cpu", dtype="float32", num_blocks=32, block_size=8)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in out] == expected
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(str(ckpt), lora=str(tmp_path / "adapter"), tensor_parallel_size=2)


def test_cli_flag_reaches_the_engine_config():
    import argparse

    from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    assert engine_args_from_cli(parser.parse_args(["--lora", "my-adapter"]))["lora"] == "my-adapter"
    assert "lora" not in engine_args_from_cli(parser.parse_args([]))


def test_lora_merge_command_writes_the_merged_checkpoint(ckpt, tmp_path):
    """`moonlet lora merge`: the written checkpoint loads to the weights load_model(lora=) merges."""
    from moonlet.cli import main

    model = load_model(ckpt, dtype=torch.float32)
    add_lora(model, LoraSettings(r=2, alpha=4.0))
    _randomize_lora(model, seed=5)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--base", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    want = load_model(ckpt, dtype=torch.float32, lora=tmp_path / "adapter").state_dict()
    got = load_model(out, dtype=torch.float32).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert main(["lora", "merge", "--base", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 1
