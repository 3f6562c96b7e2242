"""Trainer: schedules, exact resume, hub checkpoints (moonlet and transformers), 2-process data parallel."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from moonlet.testing import tiny_k2_config
from moonlet.train.data import write_dataset
from moonlet.train.schedule import lr_multiplier
from moonlet.train.trainer import STATE_NAME, TrainConfig, Trainer


def test_wsd_and_cosine_schedules():
    total, warm = 100, 10
    wsd = [lr_multiplier(s, total, "wsd", warm, decay_fraction=0.3, min_ratio=0.1) for s in range(total)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == pytest.approx(1.0)  # linear warmup
    assert all(m == 1.0 for m in wsd[10:70])  # stable
    assert all(a >= b for a, b in zip(wsd[70:], wsd[71:]))  # decaying
    assert wsd[-1] == pytest.approx(0.1)
    cos = [lr_multiplier(s, total, "cosine", warm, min_ratio=0.0) for s in range(total)]
    mid = warm + (total - warm) // 2 - 1
    assert cos[mid] == pytest.approx(0.5, abs=0.02) and cos[-1] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(50, total, "linear")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(120):
        ids = rng.integers(0, 320, int(rng.integers(5, 40))).tolist()
        docs.append((ids, None if i % 3 else [int(j % 2) for j in range(len(ids))]))
    write_dataset(docs, d / "train", vocab_size=320)
    write_dataset(docs[:20], d / "eval", vocab_size=320)
    return d


def _config(data_dir, out, **kw):
    base = dict(model=tiny_k2_config().to_dict(), train_data=str(data_dir / "train"), eval_data=str(data_dir / "eval"),
                out_dir=str(out), seq_len=24, batch_size=4, grad_accum=2, max_steps=6, lr=3e-3, warmup_steps=2,
                eval_every=3, eval_batches=2, save_every=0, log_every=1, qk_clip_tau=0.14, threads=1,
                aux_loss_alpha=1e-3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_config_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.5, "betas": [0.8, 0.9]}))
    cfg = TrainConfig.from_file(tmp_path / "c.json")
    assert cfg.lr == 0.5 and cfg.betas == (0.8, 0.9)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data_dir, tmp_path):
    full = Trainer(_config(data_dir, tmp_path / "full"), quiet=True).train()
    assert all(math.isfinite(m["loss"]) for m in full)
    assert any(m.get("clipped_heads") for m in full), "tau=0.14 is below the tiny model's max logits (~0.15): QK-Clip must act"

    first = Trainer(_config(data_dir, tmp_path / "split"), quiet=True)
    first.train(max_steps=3)
    ckpt = first.save_checkpoint(tmp_path / "split" / "checkpoints" / "step-000003")
    assert (ckpt / STATE_NAME).is_file() and (ckpt / "config.json").is_file()
    resumed = Trainer(_config(data_dir, tmp_path / "split"), resume=tmp_path / "split", quiet=True)
    assert resumed.step == 3
    rest = resumed.train()
    assert [m["step"] for m in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        assert a["loss"] == b["loss"], (a, b)
        assert a.get("eval_loss") == b.get("eval_loss")
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert (tmp_path / "full" / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_checkpoint_loads_in_moonlet_and_transformers(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    trainer = Trainer(_config(data_dir, tmp_path / "run", max_steps=2), quiet=True)
    trainer.train()
    ckpt = trainer.save_checkpoint(tmp_path / "ckpt")
    from moonlet.weights import load_model

    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(ids)
        loaded = load_model(ckpt)(ids)
    torch.testing.assert_close(loaded, ours)
    hf_dir = tmp_path / "hf"
    shutil.copytree(ckpt, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"  # Moonshot's documented rename for other frameworks
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(data_dir, tmp_path):
    kw = dict(max_steps=4, eval_every=2, grad_accum=1, batch_size=4)
    single = Trainer(_config(data_dir, tmp_path / "one", **kw), quiet=True).train()
    cfg = _config(data_dir, tmp_path / "two", **kw)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "moonlet", "train", "--config", str(tmp_path / "cfg.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(single, two):
        assert a["targets"] == b["targets"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])
        if a.get("eval_loss") is not None:
            assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-4)


def test_init_from_starts_a_new_phase_from_checkpoint_weights(data_dir, tmp_path):
    first = Trainer(_config(data_dir, tmp_path / "a", max_steps=2, eval_every=0), quiet=True)
    first.train()
    first.save_checkpoint(tmp_path / "a" / "checkpoints" / "step-000002")
    second = Trainer(_config(data_dir, tmp_path / "b", init_from=str(tmp_path / "a"), seed=5), quiet=True)
    assert second.step == 0 and not second.optimizer.state
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_recipe_phases_chain():
    from moonlet.train.recipes import get_recipe

    tiny = get_recipe("tiny")
    (n1, pre), (n2, tasks), (n3, polish), (n4, digits) = tiny.phases("out")
    assert (n1, n2, n3, n4) == ("pretrain", "tasks", "polish", "digits")
    assert tasks.init_from == pre.out_dir and polish.init_from == tasks.out_dir and digits.init_from == polish.out_dir
    assert tasks.tokenizer_dir == pre.tokenizer_dir == polish.tokenizer_dir == digits.tokenizer_dir
    assert len({pre.train_data, tasks.train_data, polish.train_data, digits.train_data}) == 4
    cfg = pre.model_config()
    assert cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok == 2 and cfg.n_shared_experts == 1
    assert cfg.first_k_dense_replace == 1 and 10e6 <= cfg.param_counts()["total"] <= 30e6
    with pytest.raises(KeyError, match="unknown recipe"):
        get_recipe("huge")


def test_cli_shard_optimizer_flag_reaches_the_config(data_dir, tmp_path):
    from moonlet.cli import main

    cfg = _config(data_dir, tmp_path / "run", max_steps=0)
    assert cfg.shard_optimizer  # default: shard whenever there is more than one rank
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--no-shard-optimizer"]) == 0
    written = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert written["shard_optimizer"] is False
    # one process: nothing to shard, the checkpoint holds the whole optimizer state inline
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000000" / STATE_NAME, weights_only=False)
    assert state["optimizer_shards"] == 0 and state["optimizer"] is not None


def test_init_from_names_a_checkpoint_an_export_or_the_bundled_model(tmp_path, data_dir):
    from moonlet.assets import default_model_path
    from moonlet.train.trainer import resolve_init

    assert resolve_init("moonlet-tiny") == default_model_path()
    assert resolve_init(default_model_path()) == default_model_path()  # an export: config.json + safetensors
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_init(tmp_path / "nothing")
    # an empty model config means init_from's own config
    cfg = TrainConfig.from_dict({"init_from": "moonlet-tiny", "train_data": str(data_dir / "train")})
    assert cfg.model_config().hidden_size == 256 and cfg.model_config().vocab_size == 4352
