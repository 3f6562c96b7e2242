"""Fine-tuning the bundled moonlet-tiny on converted conversations with the documented config
(docs/finetune-tiny.toml): the loss on the trained (assistant) tokens falls, and the saved checkpoint
loads, carries the tokenizer and generates what a plain full-forward greedy decode of it gives."""

import json
from pathlib import Path

import pytest
import torch

from moonlet.assets import default_model_path
from moonlet.commands.generate import generate_ids
from moonlet.testing import greedy_reference
from moonlet.tokenizer import Tokenizer
from moonlet.train.chat_data import build_chat_dataset
from moonlet.train.trainer import TrainConfig, Trainer
from moonlet.weights import load_model

DOC_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "finetune-tiny.toml"
QUESTIONS = ["What is the codename of the new project?", "Tell me the project codename.",
             "Which codename does the project use?", "What's the codename?"]
ANSWER = "The codename is Bluebird."


def _conversations(path: Path) -> Path:
    lines = []
    for i, q in enumerate(QUESTIONS):  # both shapes, as a mixed file would have them
        if i % 2:
            lines.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
        else:
            lines.append({"system": "You are a helpful assistant.", "messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _reply(model, tok, question: str, n: int = 12) -> tuple[list[int], list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    return list(generate_ids(model, prompt, n, set(tok.stop_token_ids))), prompt


@pytest.mark.slow
def test_finetune_moonlet_tiny_on_conversations(tmp_path):
    torch.manual_seed(0)
    base_dir = default_model_path()
    report = build_chat_dataset([_conversations(tmp_path / "chat.jsonl")], Tokenizer.from_pretrained(base_dir),
                                tmp_path / "data", max_tokens=65)
    assert report.conversations == 4 and report.skipped == 0 and report.overlong == 0

    cfg = TrainConfig.from_file(DOC_CONFIG).to_dict()
    assert cfg["init_from"] == "moonlet-tiny" and not cfg["model"] and cfg["tokenizer_dir"] is None
    # the documented config, on this tiny data: the eval set is the training set (the loss on the trained
    # tokens), a short run at a higher lr so that eight steps show it (document masking: each conversation alone)
    cfg.update(train_data=str(tmp_path / "data" / "train"), eval_data=str(tmp_path / "data" / "train"),
               out_dir=str(tmp_path / "run"), seq_len=64, batch_size=4, max_steps=8, lr=1e-3, schedule="constant",
               warmup_steps=0, eval_every=0, eval_batches=1, save_every=0, threads=2)
    trainer = Trainer(TrainConfig.from_dict(cfg), quiet=True)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [m["loss"] for m in trainer.metrics]
    assert after < 0.6 * before, (before, after)
    assert losses[-1] < losses[0]

    path = trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000008")
    model = load_model(path, dtype=torch.float32)
    trained = trainer.model.state_dict()
    for name, value in model.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name].cpu()), name
    assert (path / "agent_profile.json").read_text() == (base_dir / "agent_profile.json").read_text()
    tok = Tokenizer.from_pretrained(path)  # copied from init_from, as the agent profile
    assert tok.vocab_size == Tokenizer.from_pretrained(base_dir).vocab_size

    reply, prompt = _reply(model, tok, QUESTIONS[0])
    reference = greedy_reference(model, prompt, len(reply))
    assert reply == reference and reply
    base_reply, _ = _reply(load_model(base_dir, dtype=torch.float32), tok, QUESTIONS[0])
    assert reply != base_reply  # the base model answers this with a tool call; the tuned one does not
    assert "<|tool_calls_section_begin|>" in tok.decode(base_reply)
    assert "<|tool_calls_section_begin|>" not in tok.decode(reply)
