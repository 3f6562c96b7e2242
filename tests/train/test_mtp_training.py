"""Training DeepSeek-V3's MTP layer (TrainConfig.mtp_loss_weight): the layer learns the token after
next on data where it is predictable, the checkpoint carries it, and the engine then drafts with it
(speculative='mtp') — output equal to the engine without speculation, most drafts accepted, where
the untrained layer's drafts are almost all rejected. Resuming gives the same losses as an
uninterrupted run."""

import numpy as np
import pytest

from moonlet.engine import LLM, SamplingParams
from moonlet.testing import tiny_k2_config
from moonlet.train.data import write_dataset
from moonlet.train.trainer import TrainConfig, Trainer

VOCAB = 320


SUCC = np.random.default_rng(1).permutation(64)  # each of 64 tokens has one successor


def walk(start: int, n: int) -> list[int]:
    out = [start]
    while len(out) < n:
        out.append(int(SUCC[out[-1]]))
    return out


@pytest.fixture(scope="module")
def cycles(tmp_path_factory):
    """Documents that walk a fixed successor map: the next token, and the one after it, are
    determined by the current one."""
    d = tmp_path_factory.mktemp("walks")
    rng = np.random.default_rng(2)
    write_dataset([(walk(int(rng.integers(0, 64)), 40), None) for _ in range(400)], d / "train", vocab_size=VOCAB)
    return d


def _config(data, out, **kw):
    base = dict(model=tiny_k2_config(num_nextn_predict_layers=1).to_dict(), train_data=str(data / "train"),
                out_dir=str(out), seq_len=32, batch_size=8, max_steps=40, lr=5e-3, warmup_steps=5, eval_every=0,
                save_every=0, log_every=100, threads=1, mtp_loss_weight=0.3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_trained_mtp_layer_drafts_what_the_model_then_accepts(cycles, tmp_path):
    trainer = Trainer(_config(cycles, tmp_path / "run"), quiet=True)
    layer = trainer.mtp.layers[0]
    assert layer.embed_tokens.weight is trainer.model.model.embed_tokens.weight  # shared, as in DeepSeek-V3
    assert layer.shared_head.head.weight is trainer.model.lm_head.weight
    untrained = trainer.save_checkpoint(tmp_path / "step0")
    metrics = trainer.train()
    assert metrics[-1]["mtp_loss"] < 0.1 * metrics[0]["mtp_loss"]
    trained = trainer.save_checkpoint(tmp_path / "step40")

    prompts = [walk(start, 6) for start in (3, 17, 40, 61)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(str(trained), dtype="float32", num_blocks=64).generate(prompts, params)
    rates = []
    for ckpt in (untrained, trained):
        if ckpt == untrained:
            plain_untrained = LLM(str(ckpt), dtype="float32", num_blocks=64).generate(prompts, params)
        llm = LLM(str(ckpt), dtype="float32", num_blocks=64, speculative="mtp", num_speculative_tokens=2)
        out = llm.generate(prompts, params)
        assert [o.token_ids for o in out] == [o.token_ids for o in (plain if ckpt == trained else plain_untrained)]
        stats = llm.stats()
        rates.append(stats["spec_accepted_tokens"] / max(stats["spec_draft_tokens"], 1))
    assert rates[0] < 0.2 and rates[1] > 0.6, rates
    print(f"MTP acceptance: untrained {rates[0]:.2f}, trained {rates[1]:.2f}")


def test_resume_with_an_mtp_layer_gives_the_same_losses(cycles, tmp_path):
    full = Trainer(_config(cycles, tmp_path / "full", max_steps=4, batch_size=4), quiet=True).train()
    first = Trainer(_config(cycles, tmp_path / "part", max_steps=4, batch_size=4), quiet=True)
    first.train(max_steps=2)
    ckpt = first.save_checkpoint(tmp_path / "part" / "ckpt")
    resumed = Trainer(_config(cycles, tmp_path / "part", max_steps=4, batch_size=4), resume=ckpt, quiet=True)
    rest = resumed.train()
    assert [r["loss"] for r in rest[-2:]] == pytest.approx([r["loss"] for r in full[-2:]], rel=1e-5)
    assert [r["mtp_loss"] for r in rest[-2:]] == pytest.approx([r["mtp_loss"] for r in full[-2:]], rel=1e-5)


def test_mtp_loss_needs_an_mtp_layer_in_the_config(cycles, tmp_path):
    with pytest.raises(ValueError, match="num_nextn_predict_layers to 1"):
        Trainer(_config(cycles, tmp_path, model=tiny_k2_config().to_dict()), quiet=True)
