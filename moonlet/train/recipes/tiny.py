"""The moonlet-tiny recipe: the bundled demonstration model of the K2 architecture.

Model: MLA (q-LoRA 128, kv-LoRA 64, 4 heads of 32 nope + 16 rope dims, v 32), 4 layers, the first
dense, the others MoE with 8 routed experts (top-2, sigmoid noaux_tc router) + 1 shared expert;
hidden 256; a 4096-token byte-level BPE + K2's 256 special slots. About 11M parameters (6M active).
Data: Python source from this interpreter's standard library (about 17% of tokens) and synthetic
K2-format conversations (plain answers and calculator / read_file tool use, loss on assistant turns).
Four phases, all MuonClip, each starting from the previous one's weights: "pretrain" (lr 2e-3,
700 steps, constant lr after warmup) on the mix above; "tasks" (400 steps, constant) on a
conversation-heavy mix with dense copying practice and a little code; "polish" (400 steps, WSD with
the decay over the last 40%) on the same mix with file paths quoted in the requests; "digits"
(150 steps at lr 1e-3, WSD) on that mix where half of the arithmetic uses operands of up to four
digits, which the earlier phases never show (``1234 * 5678``). About 1,650 steps of 16 x 384 tokens
(10.1M tokens), a bit over an hour on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

from ..trainer import TrainConfig, copy_tokenizer

BASE_VOCAB = 4096
NUM_SPECIAL = 256
SEQ_LEN = 384
TRAIN_CONVERSATIONS = 30000
EVAL_CONVERSATIONS = 400
CODE_CHARS = 4_000_000
EVAL_CODE_CHARS = 150_000
BPE_CODE_CHARS = 1_500_000
BPE_CONVERSATIONS = 3000
DATA_SEED = 7
EVAL_DATA_SEED = 99  # held-out tasks for the eval loss (the tool-use evaluation uses its own seed)


def model_config(vocab_size: int = BASE_VOCAB + NUM_SPECIAL) -> dict:
    base = vocab_size - NUM_SPECIAL
    return dict(
        model_type="kimi_k2", vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0, kv_lora_rank=64, q_lora_rank=128,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1, max_position_embeddings=1024,
        rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=base, eos_token_id=[base + 2, base + 1],  # <|im_end|> ends a turn; [EOS] ends text
        torch_dtype="float32",
    )


PRETRAIN_STEPS = 700
TASK_STEPS = 400
TASK_CONVERSATIONS = 24000
TASK_CODE_CHARS = 400_000
POLISH_STEPS = 400
POLISH_CONVERSATIONS = 16000
DIGITS_STEPS = 150
DIGITS_CONVERSATIONS = 10000
DIGITS_CODE_CHARS = 300_000
DIGITS_WIDE_OPERANDS = 0.5


def train_config(out_dir: str | os.PathLike = "runs/tiny", **overrides) -> TrainConfig:
    """Phase 1, "pretrain": stdlib code + conversations, constant lr after warmup (the stable part of WSD)."""
    out = Path(out_dir)
    cfg = dict(
        model=model_config(), train_data=str(out / "data" / "train"), eval_data=str(out / "data" / "eval"),
        out_dir=str(out / "pretrain"), tokenizer_dir=str(out / "tokenizer"), seq_len=SEQ_LEN, batch_size=16,
        grad_accum=1, max_steps=PRETRAIN_STEPS, optimizer="muonclip", lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0,
        schedule="constant", warmup_steps=30, grad_clip=1.0, bias_update_speed=1e-3, aux_loss_alpha=0.0,
        eval_every=100, eval_batches=8, save_every=100, keep_checkpoints=2, log_every=10, seed=0,
    )
    cfg.update(overrides)
    return TrainConfig.from_dict(cfg)


def task_config(out_dir: str | os.PathLike = "runs/tiny", **overrides) -> TrainConfig:
    """Phase 2, "tasks": from phase 1's weights, a conversation-heavy mix with dense copying practice
    (``synth.TASK_MIX``) and a little code, constant lr."""
    out = Path(out_dir)
    base = train_config(out_dir).to_dict()
    base.update(train_data=str(out / "data" / "tasks"), out_dir=str(out / "tasks"), init_from=str(out / "pretrain"),
                max_steps=TASK_STEPS, warmup_steps=20, seed=1)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def polish_config(out_dir: str | os.PathLike = "runs/tiny", **overrides) -> TrainConfig:
    """Phase 3, "polish": the same task mix with file paths quoted in the requests (so they tokenize as
    in the tool-call JSON); warmup, stable, then decay to 10% of the lr over the last 40%."""
    out = Path(out_dir)
    base = task_config(out_dir).to_dict()
    base.update(train_data=str(out / "data" / "polish"), out_dir=str(out / "polish"), init_from=str(out / "tasks"),
                max_steps=POLISH_STEPS, schedule="wsd", warmup_steps=20, decay_fraction=0.4, min_lr_ratio=0.1,
                seed=2)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def digits_config(out_dir: str | os.PathLike = "runs/tiny", **overrides) -> TrainConfig:
    """Phase 4, "digits": polish's mix (quoted paths) with half of the expressions over operands of
    up to four digits, at half polish's lr; warmup, stable, decay over the last 40%."""
    out = Path(out_dir)
    base = polish_config(out_dir).to_dict()
    base.update(train_data=str(out / "data" / "digits"), out_dir=str(out / "digits"), init_from=str(out / "polish"),
                max_steps=DIGITS_STEPS, lr=1e-3, seed=5)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def phases(out_dir: str | os.PathLike = "runs/tiny", **overrides) -> list[tuple[str, TrainConfig]]:
    """The recipe's training phases in order; ``overrides`` apply to every phase."""
    return [("pretrain", train_config(out_dir, **overrides)), ("tasks", task_config(out_dir, **overrides)),
            ("polish", polish_config(out_dir, **overrides)), ("digits", digits_config(out_dir, **overrides))]


# ---- data ----------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """This interpreter's standard-library .py files (tests, site-packages and IDLE left out),
    in a fixed order that does not depend on the file system's listing order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())


def code_texts(max_chars: int, skip_chars: int = 0) -> list[str]:
    """Whole stdlib files in the fixed order, skipping the first ``skip_chars`` worth, up to ``max_chars``."""
    texts, used, skipped = [], 0, 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > 200_000:
            continue
        if skipped < skip_chars:
            skipped += len(text)
            continue
        if used + len(text) > max_chars:
            break
        texts.append(text)
        used += len(text)
    return texts


def build_tokenizer(directory: Path, log=print) -> Path:
    """Train the byte-level BPE (moonlet.train.bpe) on code + rendered conversations and save a full
    tokenizer directory (tiktoken.model, tokenizer_config.json, chat_template.jinja)."""
    from ...tokenizer import Tokenizer, load_tiktoken_model
    from .. import bpe
    from ..synth import conversation, generate_tasks

    if (directory / "tiktoken.model").is_file() and (directory / "tokenizer_config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    texts = code_texts(BPE_CODE_CHARS)
    # render conversations with a byte-level stand-in tokenizer: only the text matters here
    byte_tok = Tokenizer({bytes([i]): i for i in range(256)})
    tasks = generate_tasks(BPE_CONVERSATIONS, seed=DATA_SEED + 1)
    texts += [byte_tok.apply_chat_template(conversation(t), tools=t.tools, add_generation_prompt=False,
                                           chat_template="kimi-k2") for t in tasks]
    log(f"training BPE ({BASE_VOCAB} base tokens) on {sum(map(len, texts)) / 1e6:.1f}M characters")
    model_file = directory / "tiktoken.model"
    bpe.train_bpe(texts, BASE_VOCAB, model_file)
    tok = Tokenizer(load_tiktoken_model(model_file), model_max_length=model_config()["max_position_embeddings"],
                    name_or_path="moonlet-tiny")
    tok.save_pretrained(directory, chat_template="kimi-k2")
    return directory


def build_datasets(cfg: TrainConfig, log=print) -> None:
    from ...tokenizer import Tokenizer
    from ..data import write_dataset
    from ..synth import TASK_MIX, TRAIN_MIX, conversation, encode_conversation, generate_tasks

    tok = Tokenizer.from_pretrained(cfg.tokenizer_dir)
    vocab = tok.vocab_size
    eot = tok.token_id("[EOS]")

    def code_docs(texts):
        for text in texts:
            yield tok.encode(text, allow_special=False) + [eot], None

    def chat_docs(tasks):
        for task in tasks:
            yield encode_conversation(tok, conversation(task), task.tools)

    def mixed(code, chats):
        # interleave so shards mix both kinds (the loader shuffles anyway)
        code, chats = list(code), list(chats)
        step = max(1, len(chats) // max(len(code), 1))
        ci = 0
        for i, doc in enumerate(chats):
            yield doc
            if i % step == 0 and ci < len(code):
                yield code[ci]
                ci += 1
        yield from code[ci:]

    root = Path(cfg.train_data).parent
    for split, n_conv, seed, heldout, chars, skip, mix, quote, wide in (
            ("train", TRAIN_CONVERSATIONS, DATA_SEED, False, CODE_CHARS, 0, TRAIN_MIX, False, 0.0),
            ("eval", EVAL_CONVERSATIONS, EVAL_DATA_SEED, True, EVAL_CODE_CHARS, CODE_CHARS, None, False, 0.0),
            ("tasks", TASK_CONVERSATIONS, DATA_SEED + 2, False, TASK_CODE_CHARS, 0, TASK_MIX, False, 0.0),
            ("polish", POLISH_CONVERSATIONS, DATA_SEED + 3, False, TASK_CODE_CHARS, 0, TASK_MIX, True, 0.0),
            ("digits", DIGITS_CONVERSATIONS, DATA_SEED + 4, False, DIGITS_CODE_CHARS, 0, TASK_MIX, True,
             DIGITS_WIDE_OPERANDS)):
        target = root / split
        if (target / "meta.json").is_file():
            continue
        log(f"building {split} data: {n_conv} conversations + {chars / 1e6:.2f}M characters of stdlib code")
        tasks = generate_tasks(n_conv, seed=seed, heldout=heldout, mix=mix, quote_paths=quote, wide_operands=wide)
        info = {"conversations": n_conv, "code_chars": chars, "seed": seed, "heldout": heldout, "mix": mix,
                "quote_paths": quote, "wide_operands": wide}
        write_dataset(mixed(code_docs(code_texts(chars, skip)), chat_docs(tasks)), target, vocab, info=info)


def prepare(cfg: TrainConfig, log=print) -> None:
    """Build the tokenizer and the train/eval token shards if they are not there yet."""
    build_tokenizer(Path(cfg.tokenizer_dir), log)
    match_tokenizer(cfg)
    build_datasets(cfg, log)


def match_tokenizer(cfg: TrainConfig) -> None:
    """Size the model's vocabulary and bos/eos ids to the trained tokenizer (BPE may stop short of
    BASE_VOCAB merges on a small corpus)."""
    from ...tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(cfg.tokenizer_dir)
    cfg.model.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                     eos_token_id=[tok.token_id("<|im_end|>"), tok.eos_token_id])


def finish(cfg: TrainConfig, trainer, export_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Write the trained model in bf16 with its tokenizer and agent profile (the shipped form) to
    ``export_dir`` (default: OUT/final) and a training summary next to it."""
    from ...weights import save_model

    import torch

    dest = Path(export_dir) if export_dir else Path(cfg.out_dir) / "final"
    save_model(trainer.model, dest, dtype=torch.bfloat16)
    copy_tokenizer(cfg.tokenizer_dir, dest)
    # the tools and system prompt it was trained with, which `moonlet agent` offers when serving it
    from ..synth import agent_profile

    (dest / "agent_profile.json").write_text(json.dumps(agent_profile(), indent=2) + "\n")
    summary = {
        "steps": trainer.step, "tokens": trainer.step * cfg.seq_len * cfg.batch_size * cfg.grad_accum,
        "final_loss": trainer.metrics[-1]["loss"] if trainer.metrics else None,
        "final_eval_loss": next((m["eval_loss"] for m in reversed(trainer.metrics) if m.get("eval_loss")), None),
        "qk_clip_head_fraction": trainer.clipped_heads / max(trainer.head_steps, 1),
        "params": trainer.model_config.param_counts(),
    }
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"exported {dest} ({summary})")
    return dest
