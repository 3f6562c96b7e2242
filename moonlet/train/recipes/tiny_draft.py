"""Recipe "tiny-draft": a draft model for speculative decoding with moonlet-tiny.

A one-layer model of the K2 architecture (MLA attention with moonlet-tiny's dimensions, one dense
SwiGLU MLP, no experts) with moonlet-tiny's tokenizer, trained to agree with moonlet-tiny rather
than with the data: most of its training tokens are moonlet-tiny's own outputs (sequence-level
distillation), the rest is the data mix of moonlet-tiny's last training phase ("digits").

Data (``prepare``):

- the tokenizer is moonlet-tiny's, copied from the teacher checkpoint (the bundled one by default),
  so token ids agree by construction; the vocabulary and bos/eos ids are read from it;
- "distill": moonlet-tiny generates, batched in the serving engine, on the prompts it is served
  with: synthetic tool-use conversations of the tiny recipe's last phase (``synth.TASK_MIX``,
  quoted paths, half of the expressions with wide operands), played out round by round (its tool
  calls are parsed and the tools run, as in ``moonlet eval-tools``), greedy for half of them and
  sampled at temperature 1 for the other half; chat requests to repeat or explain a piece of
  standard-library code; and raw code to continue. Loss only on the tokens moonlet-tiny wrote;
- "mix": the tiny recipe's last-phase mix (conversations and stdlib code), built with its
  functions, so the draft also sees the text its teacher learned from;
- "eval": moonlet-tiny's greedy outputs on held-out tasks (the eval loss measures agreement).

The draft starts from moonlet-tiny's token embedding, layer 0, final norm and LM head
(``build_init``), then one MuonClip phase "draft" (WSD, 250 steps). ``finish`` exports bf16 weights with the tokenizer and measures
the acceptance rate of the export as a draft for the teacher in the serving engine
(``draft_acceptance``), which it writes into the run's summary.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..trainer import TrainConfig, copy_tokenizer
from . import tiny

SEQ_LEN = 384
NUM_LAYERS = 1
DISTILL_TASKS = 3000  # conversations played out by the teacher (each one to three rounds)
DISTILL_CODE_PROMPTS = 600  # chat requests about a piece of stdlib code
DISTILL_RAW_CODE = 400  # raw stdlib code to continue
DISTILL_CODE_CHARS = 1_500_000  # the stdlib code those prompts are cut from (the first part of tiny's corpus)
MIX_CONVERSATIONS = 4000
MIX_CODE_CHARS = 300_000
EVAL_TASKS = 300
MAX_ROUNDS = 3
MAX_TOKENS = 96  # per teacher turn
RAW_CONTINUATION = 64
DISTILL_SEED = 31
STEPS = 250
THREADS = 1  # torch threads: the recipe is sized for a shared 2-core machine, where 2 threads oversubscribe


def model_config(vocab_size: int = tiny.BASE_VOCAB + tiny.NUM_SPECIAL, num_layers: int = NUM_LAYERS) -> dict:
    """moonlet-tiny's config cut to ``num_layers`` dense layers (``first_k_dense_replace`` = all of
    them): the same attention dimensions, hidden size and dense MLP width as its layer 0."""
    cfg = tiny.model_config(vocab_size)
    cfg.update(num_hidden_layers=num_layers, first_k_dense_replace=num_layers)
    return cfg


def train_config(out_dir: str | os.PathLike = "runs/tiny-draft", **overrides) -> TrainConfig:
    """The single phase, "draft": distilled + last-phase data, WSD (decay over the last 40%)."""
    out = Path(out_dir)
    cfg = dict(
        model=model_config(), train_data=str(out / "data" / "train"), eval_data=str(out / "data" / "eval"),
        out_dir=str(out / "draft"), tokenizer_dir=str(out / "tokenizer"), seq_len=SEQ_LEN, batch_size=16,
        grad_accum=1, max_steps=STEPS, optimizer="muonclip", lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0,
        schedule="wsd", warmup_steps=30, decay_fraction=0.4, min_lr_ratio=0.1, grad_clip=1.0,
        bias_update_speed=1e-3, aux_loss_alpha=0.0, eval_every=100, eval_batches=8, save_every=100,
        keep_checkpoints=2, log_every=10, seed=0, threads=THREADS, init_from=str(out / "init"),
    )
    cfg.update(overrides)
    return TrainConfig.from_dict(cfg)


def phases(out_dir: str | os.PathLike = "runs/tiny-draft", **overrides) -> list[tuple[str, TrainConfig]]:
    return [("draft", train_config(out_dir, **overrides))]


def teacher_path() -> Path:
    """The checkpoint the draft learns to agree with: $MOONLET_DRAFT_TEACHER, else the bundled moonlet-tiny."""
    env = os.environ.get("MOONLET_DRAFT_TEACHER")
    if env:
        return Path(env)
    from ...assets import default_model_path

    return default_model_path()


# ---- prompts ------------------------------------------------------------------------------------
def code_snippets(n: int, seed: int, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """``n`` pieces of stdlib source (tiny's corpus order): runs of whole top-level blocks (split at
    blank lines followed by unindented text) of ``min_chars`` to ``max_chars`` characters."""
    rng = random.Random(seed)
    pieces: list[str] = []
    for text in tiny.code_texts(DISTILL_CODE_CHARS):
        blocks, cur = [], []
        for line in text.splitlines(keepends=True):
            if cur and line[:1] not in (" ", "\t", "\n", "#", ")", "]", "}") and cur[-1].strip() == "":
                blocks.append("".join(cur))
                cur = []
            cur.append(line)
        blocks.append("".join(cur))
        acc = ""
        for b in blocks:
            acc += b
            if len(acc) >= min_chars:
                if len(acc) <= max_chars:
                    pieces.append(acc.strip("\n") + "\n")
                acc = ""
    rng.shuffle(pieces)
    return [pieces[i % len(pieces)] for i in range(n)] if pieces else []


CODE_REQUESTS = ["Repeat this code exactly, nothing else:\n\n{code}", "What does this code do?\n\n{code}",
                 "Here is some Python:\n\n{code}\n\nCopy it back to me.", "{code}",
                 "Fix the bugs in this function:\n\n{code}", "Explain:\n```python\n{code}```"]


def code_chat_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Chat requests (``CODE_REQUESTS``) about pieces of stdlib code, rendered with the chat template."""
    rng = random.Random(seed)
    out = []
    for code in code_snippets(n, seed):
        msgs = [{"role": "user", "content": rng.choice(CODE_REQUESTS).format(code=code)}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    return out


def raw_code_prompts(tokenizer, n: int, seed: int, max_tokens: int = 160) -> list[list[int]]:
    """Raw stdlib code (no chat template) of at most ``max_tokens`` tokens, to be continued."""
    return [tokenizer.encode(code, allow_special=False)[:max_tokens] for code in code_snippets(n, seed + 1)]


# ---- the teacher's outputs ------------------------------------------------------------------------
def _params(n: int, temperature: float, seed: int, max_tokens: int):
    from ...engine import SamplingParams

    return [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(n)]


def teacher_conversations(llm, tasks, temperature: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Play each task's conversation out with the teacher (``llm``, an engine), round by round and
    batched: its turn is generated, a tool call in it is parsed and the task's tool run, up to
    ``MAX_ROUNDS`` turns. Returns documents (token ids, loss mask): the rendered conversation with
    mask 1 exactly on the tokens the teacher generated. A round whose rendering does not start with
    the previous prompt and the teacher's tokens (the template re-renders a malformed turn
    differently) closes the document there and starts a new one."""
    from ...chat import parse_output
    from ..synth import prompt_messages, run_tool, tool_call_id

    tok = llm.tokenizer
    messages = [prompt_messages(t) for t in tasks]
    docs: list[tuple[list[int], list[int]]] = []
    open_docs: dict[int, tuple[list[int], list[int]]] = {}
    live = list(range(len(tasks)))
    for r in range(MAX_ROUNDS):
        if not live:
            break
        prompts = [tok.apply_chat_template(messages[i], tools=tasks[i].tools, add_generation_prompt=True,
                                           tokenize=True) for i in live]
        outs = llm.generate(prompts, _params(len(live), temperature, seed + 1000 * r, MAX_TOKENS))
        still = []
        for i, prompt, out in zip(live, prompts, outs):
            ids, mask = open_docs.pop(i, ([], []))
            if ids and prompt[:len(ids)] == ids:
                ids, mask = ids + prompt[len(ids):], mask + [0] * (len(prompt) - len(ids))
            else:
                if ids:
                    docs.append((ids, mask))
                ids, mask = list(prompt), [0] * len(prompt)
            ids, mask = ids + list(out.token_ids), mask + [1] * len(out.token_ids)
            parsed = parse_output(out.text)
            call = parsed.tool_calls[0] if parsed.tool_calls and out.finish_reason == "stop" else None
            try:
                args = json.loads(call.arguments) if call else None
            except json.JSONDecodeError:
                args = None
            if call is None or not isinstance(args, dict) or r + 1 == MAX_ROUNDS:
                docs.append((ids, mask))
                continue
            cid = tool_call_id(call.name, r)
            messages[i].append({"role": "assistant", "content": parsed.content, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
            messages[i].append({"role": "tool", "tool_call_id": cid, "name": call.name,
                                "content": run_tool(tasks[i], call.name, args)})
            open_docs[i] = (ids, mask)
            still.append(i)
        live = still
    docs.extend(open_docs.values())
    return docs


def teacher_continuations(llm, prompts: list[list[int]], temperature: float, seed: int,
                          max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """The teacher's continuation of each prompt: documents with mask 1 on the generated tokens."""
    outs = llm.generate(prompts, _params(len(prompts), temperature, seed, max_tokens))
    return [(list(p) + list(o.token_ids), [0] * len(p) + [1] * len(o.token_ids)) for p, o in zip(prompts, outs)]


def teacher_engine(path, threads: int | None = None):
    """The teacher in the serving engine, float32 (the reference precision), room for a wide batch."""
    import torch

    from ...engine import LLM

    if threads:
        torch.set_num_threads(threads)
    return LLM(str(path), dtype="float32", max_num_seqs=64, max_num_batched_tokens=4096)


def build_datasets(cfg: TrainConfig, log=print) -> None:
    """Write the "train" (distilled + last-phase mix) and "eval" (teacher outputs on held-out tasks)
    token shards under the config's data directory, unless they are there."""
    import time

    from ...tokenizer import Tokenizer
    from ..data import write_dataset
    from ..synth import TASK_MIX, conversation, encode_conversation, generate_tasks

    root = Path(cfg.train_data).parent
    if (root / "train" / "meta.json").is_file() and (root / "eval" / "meta.json").is_file():
        return
    tok = Tokenizer.from_pretrained(cfg.tokenizer_dir)
    teacher = teacher_path()
    llm = teacher_engine(teacher, cfg.threads)
    start = time.perf_counter()

    def wide_tasks(n, seed, heldout=False):
        return generate_tasks(n, seed=seed, heldout=heldout, mix=None if heldout else TASK_MIX, quote_paths=True,
                              wide_operands=tiny.DIGITS_WIDE_OPERANDS)

    if not (root / "eval" / "meta.json").is_file():
        docs = teacher_conversations(llm, wide_tasks(EVAL_TASKS, DISTILL_SEED + 50, heldout=True), 0.0, 0)
        write_dataset(docs, root / "eval", tok.vocab_size, info={"teacher": teacher.name, "heldout_tasks": EVAL_TASKS})
    half = DISTILL_TASKS // 2
    tasks = wide_tasks(DISTILL_TASKS, DISTILL_SEED)
    distilled = teacher_conversations(llm, tasks[:half], 0.0, 0)
    log(f"teacher: {half} greedy conversations ({time.perf_counter() - start:.0f}s)")
    distilled += teacher_conversations(llm, tasks[half:], 1.0, DISTILL_SEED)
    log(f"teacher: {DISTILL_TASKS - half} sampled conversations ({time.perf_counter() - start:.0f}s)")
    distilled += teacher_continuations(llm, code_chat_prompts(tok, DISTILL_CODE_PROMPTS, DISTILL_SEED), 0.0, 0,
                                       MAX_TOKENS)
    distilled += teacher_continuations(llm, raw_code_prompts(tok, DISTILL_RAW_CODE, DISTILL_SEED), 0.0, 0,
                                       RAW_CONTINUATION)
    taught = sum(sum(m) for _, m in distilled)
    log(f"teacher: code prompts done; {len(distilled)} documents, {taught} generated tokens "
        f"({time.perf_counter() - start:.0f}s)")
    eot = tok.token_id("[EOS]")
    mix = [encode_conversation(tok, conversation(t), t.tools)
           for t in wide_tasks(MIX_CONVERSATIONS, tiny.DATA_SEED + 4)]
    mix += [(tok.encode(text, allow_special=False) + [eot], None) for text in tiny.code_texts(MIX_CODE_CHARS)]
    rng = random.Random(DISTILL_SEED)
    docs = distilled + mix
    rng.shuffle(docs)
    info = {"teacher": teacher.name, "distill_tasks": DISTILL_TASKS, "distill_code_prompts": DISTILL_CODE_PROMPTS,
            "distill_raw_code": DISTILL_RAW_CODE, "teacher_tokens": taught, "mix_conversations": MIX_CONVERSATIONS,
            "mix_code_chars": MIX_CODE_CHARS}
    write_dataset(docs, root / "train", tok.vocab_size, info=info)
    log(f"data written under {root} ({time.perf_counter() - start:.0f}s)")


def teacher_layer(draft_layer: int, draft_layers: int, teacher_layers: int) -> int:
    """The teacher layer a draft layer starts from: layer 0 from layer 0 (both dense), the others
    from the teacher's last layers (their attention and norms; their MLPs are MoE, the draft's dense)."""
    return 0 if draft_layer == 0 else teacher_layers - draft_layers + draft_layer


def build_init(cfg: TrainConfig, log=print) -> None:
    """A checkpoint at ``cfg.init_from`` holding the draft's starting weights: the teacher's where
    the shapes agree (token embedding, final norm, LM head, layer 0 whole, later layers' attention,
    see ``teacher_layer``), the trainer's initialization elsewhere. Starting from the teacher's own
    embedding, first layer and head, the draft agrees with it far sooner than from scratch."""
    import torch

    from ...weights import load_model
    from ..trainer import Trainer, resolve_checkpoint

    init = Path(cfg.init_from)
    try:
        resolve_checkpoint(init)
        return
    except FileNotFoundError:
        pass
    trainer = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "init_from": None, "out_dir": str(init)}))
    teacher = load_model(str(teacher_path()), dtype=torch.float32)
    src, mine = teacher.state_dict(), trainer.model.state_dict()
    n_draft, n_teacher = trainer.model_config.num_hidden_layers, teacher.config.num_hidden_layers
    copied = {}
    for name, value in mine.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(teacher_layer(int(parts[2]), n_draft, n_teacher))
        other = src.get(".".join(parts))
        if other is not None and other.shape == value.shape:
            copied[name] = other
    trainer.model.load_state_dict(copied, strict=False)
    trainer.save_checkpoint(init / "checkpoints" / "step-000000")
    log(f"init: {len(copied)} of {len(mine)} tensors from the teacher, written to {init}")


def prepare(cfg: TrainConfig, log=print) -> None:
    """Copy the teacher's tokenizer, size the model to it, build the token shards if missing, and
    the starting checkpoint (``build_init``)."""
    tok_dir = Path(cfg.tokenizer_dir)
    if not (tok_dir / "tiktoken.model").is_file():
        tok_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(teacher_path(), tok_dir)
    match_tokenizer(cfg)
    build_datasets(cfg, log)
    build_init(cfg, log)


match_tokenizer = tiny.match_tokenizer


# ---- measuring and exporting ----------------------------------------------------------------------
def acceptance_prompts(tokenizer, n: int = 24, seed: int = 4242) -> list[list[int]]:
    """Held-out tool-use requests (first rounds, and conversations cut after a tool result) and code
    requests: prompts on which the draft's acceptance is measured."""
    from ..synth import conversation, generate_tasks, prompt_messages

    tasks = generate_tasks(n, seed=seed, heldout=True, quote_paths=True)
    out = []
    for i, t in enumerate(tasks):
        if i % 2 and t.calls:
            msgs = conversation(t)[:len(prompt_messages(t)) + 2]  # ... the first call and its result
        else:
            msgs = prompt_messages(t)
        out.append(tokenizer.apply_chat_template(msgs, tools=t.tools, add_generation_prompt=True, tokenize=True))
    return out + code_chat_prompts(tokenizer, n // 3, seed)


def draft_acceptance(target, draft, prompts: list[list[int]], k: int = 4, max_tokens: int = 64,
                     threads: int | None = None) -> dict:
    """Greedy generation of ``prompts`` by ``target`` with ``draft`` proposing ``k`` tokens (float32):
    acceptance rate (accepted / drafted), mean tokens per verifying step, and whether the output
    equals the target's without speculation."""
    import torch

    from ...engine import LLM, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    plain = LLM(str(target), dtype="float32").generate(prompts, params)
    llm = LLM(str(target), dtype="float32", speculative="draft", speculative_model=str(draft), num_speculative_tokens=k)
    outs = llm.generate(prompts, params)
    s = llm.stats()
    drafted, accepted, ver = s["spec_draft_tokens"], s["spec_accepted_tokens"], s["spec_verifications"]
    return {"k": k, "prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / max(drafted, 1), "tokens_per_verify": (accepted + ver) / max(ver, 1),
            "same_output": [o.token_ids for o in outs] == [o.token_ids for o in plain]}


def finish(cfg: TrainConfig, trainer, export_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Write the trained draft in bf16 with the tokenizer to ``export_dir`` (default OUT/final), and a
    summary (steps, losses, parameters, measured acceptance as moonlet-tiny's draft) next to the run."""
    import torch

    from ...tokenizer import Tokenizer
    from ...weights import save_model

    dest = Path(export_dir) if export_dir else Path(cfg.out_dir) / "final"
    save_model(trainer.model, dest, dtype=torch.bfloat16)
    copy_tokenizer(cfg.tokenizer_dir, dest)
    tok = Tokenizer.from_pretrained(dest)
    summary = {
        "steps": trainer.step, "tokens": trainer.step * cfg.seq_len * cfg.batch_size * cfg.grad_accum,
        "final_loss": trainer.metrics[-1]["loss"] if trainer.metrics else None,
        "final_eval_loss": next((m["eval_loss"] for m in reversed(trainer.metrics) if m.get("eval_loss")), None),
        "params": trainer.model_config.param_counts(),
        "acceptance": draft_acceptance(teacher_path(), dest, acceptance_prompts(tok)),
    }
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"exported {dest} ({summary})")
    return dest
