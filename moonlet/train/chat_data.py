"""Chat conversations (JSONL) -> token shards for fine-tuning, with the loss on assistant tokens only.

Each input line is one conversation, in either of the two API shapes moonlet serves:

- OpenAI Chat Completions: ``{"messages": [...], "tools": [...]}`` with system / developer / user /
  assistant (``tool_calls``, ``reasoning_content``) / tool messages;
- Anthropic Messages: ``{"system": ..., "messages": [...], "tools": [...]}`` with text / tool_use /
  tool_result / thinking blocks (what ``moonlet agent export-chat`` writes).

The shape is detected per line (``format_of``); a line may name it with ``"format"``. Both are turned
into K2 chat messages by the server's own converters (``moonlet.server.openai.to_conversation`` and
``moonlet.server.anthropic_convert.history_to_messages``), so a conversation means in training exactly
what it means in a request: tool-call ids become K2's ``functions.NAME:N`` the same way, tool results
get the same headers, and the two shapes of one conversation give identical tokens.

Rendering uses the checkpoint's own chat template (``Tokenizer.apply_chat_template``). For assistant
turn i the model, when serving, sees ``prompt_i`` = the messages before it rendered with the
generation prompt, and produces ``completion_i``: its reasoning (where the template renders
reasoning), content, tool-call section and end-of-turn token. ``completion_i`` is what rendering the
turn adds after the generation prompt of the messages before it, rendered with
``preserve_thinking=True`` so that the K2.5/K2.6 template keeps the turn's reasoning (it otherwise
drops it from a final answer that is the last message). Where adding the turn changes how the earlier
messages render (kimi-k2-thinking drops the tool loop's reasoning once the final answer is there), the
turn is rendered after the non-assistant messages before it instead. The loss mask is 1 exactly on
the completion tokens.

K2's thinking templates drop the reasoning of earlier turns from the history (every assistant turn up
to the last one without tool calls renders ``<think></think>``). A turn whose ``prompt_i +
completion_i`` is not a prefix of a later turn's prompt therefore cannot share that turn's training
example: the conversation becomes several examples, each ending at an assistant turn, each turn trained
in exactly one of them (the latest example whose text starts with that turn as generated). Without
reasoning, or with a template that renders none (``kimi-k2``, moonlet-tiny's), a conversation is one
example. Reasoning a template never renders (``kimi-k2``; ``kimi-k2-thinking`` for final answers) is
counted as dropped.

Texts are encoded piecewise at the turn boundaries (each piece as the server encodes a prompt and
as generated tokens follow it); the K2 templates put every boundary next to a special token, so the
ids equal those of the whole text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .synth import encode_spans

FORMATS = ("auto", "openai", "anthropic")
OVERLONG = ("drop", "truncate")
MAX_ERRORS_KEPT = 20  # per-line error messages kept in a report (all are counted)

_ANTHROPIC_BLOCKS = {"tool_use", "tool_result", "thinking", "redacted_thinking", "document"}
_OPENAI_ROLES = {"system", "developer", "tool"}
_OPENAI_KEYS = {"tool_calls", "tool_call_id", "reasoning_content", "reasoning"}


class ChatDataError(ValueError):
    """A conversation that cannot be converted; the message says where (file:line) and what."""


# ---- shape detection and conversion -----------------------------------------------------------------
def format_of(record: Mapping) -> str:
    """``"openai"`` or ``"anthropic"`` for one conversation object. Anthropic signs: a top-level
    ``system``, tools with ``input_schema``, content blocks of type tool_use / tool_result / thinking /
    redacted_thinking / document, or an image block with a ``source``. OpenAI signs: system, developer
    or tool roles, ``tool_calls`` / ``tool_call_id`` / ``reasoning_content`` keys, tools with a
    ``function``. A line with neither (user and assistant text only) reads the same in both; it is
    taken as OpenAI. A line with both is an error; ``"format"`` in the line settles it explicitly."""
    explicit = record.get("format")
    if explicit is not None:
        if explicit not in ("openai", "anthropic"):
            raise ValueError(f"'format' must be 'openai' or 'anthropic'; got {explicit!r}")
        return explicit
    anthropic, openai = [], []
    if "system" in record:
        anthropic.append("a top-level 'system'")
    for tool in record.get("tools") or []:
        if isinstance(tool, Mapping):
            if "input_schema" in tool:
                anthropic.append("tools with 'input_schema'")
            if "function" in tool:
                openai.append("tools with 'function'")
    messages = record.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, Mapping):
            continue
        if m.get("role") in _OPENAI_ROLES:
            openai.append(f"messages[{i}] has role {m['role']!r}")
        keys = _OPENAI_KEYS & set(m)
        if keys:
            openai.append(f"messages[{i}] has {sorted(keys)[0]!r}")
        content = m.get("content")
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, Mapping) else None
            if kind in _ANTHROPIC_BLOCKS or (kind == "image" and "source" in block):
                anthropic.append(f"messages[{i}] has a {kind!r} block")
    if anthropic and openai:
        raise ValueError(f"mixes the Anthropic shape ({anthropic[0]}) and the OpenAI shape ({openai[0]}); "
                         f"write each conversation in one shape, or add \"format\": \"openai\"|\"anthropic\"")
    return "anthropic" if anthropic else "openai"


def to_chat_messages(record: Mapping, fmt: str = "auto") -> tuple[list[dict], list[dict] | None]:
    """One conversation object -> (K2 chat messages, tool declarations or None), via the server's
    converters. ValueError says what is wrong (with the field's path, e.g. ``messages.2.content.0``)."""
    from pydantic import ValidationError

    from ..server.errors import APIError

    if not isinstance(record, Mapping):
        raise ValueError(f"a conversation must be a JSON object with 'messages'; got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of messages")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    shape = format_of(record) if fmt == "auto" else fmt
    try:
        if shape == "anthropic":
            from ..server.anthropic_convert import convert_tools, history_to_messages

            tools = list(convert_tools(record.get("tools")).values()) or None
            return history_to_messages(record.get("system"), messages), tools
        from ..server.openai import ChatRequest, to_conversation

        conv = to_conversation(ChatRequest(model="training-data", messages=messages, tools=record.get("tools")))
        return conv.messages, conv.tools or None
    except APIError as e:
        raise ValueError(f"{shape} shape: {e.message}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"{shape} shape: {where}: {first.get('msg')}") from None


# ---- rendering and the loss mask --------------------------------------------------------------------
@dataclass
class EncodedChat:
    """A conversation as training examples: ``examples`` are (ids, mask) pairs, mask 1 on tokens the
    assistant produced. ``turns``: assistant turns trained; ``reasoning_dropped``: turns with reasoning
    the template does not render (trained without it)."""
    examples: list[tuple[list[int], list[int]]]
    turns: int
    reasoning_dropped: int


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                template_kwargs: Mapping | None = None) -> EncodedChat:
    """Render K2 chat ``messages`` with the tokenizer's chat template and mark the assistant's tokens
    (see the module docstring for how turns are located and when a conversation splits)."""
    kwargs = dict(template_kwargs or {})

    def render(msgs: list[dict], generation_prompt: bool, **extra) -> str:
        return tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=generation_prompt,
                                             tokenize=False, **{**kwargs, **extra})

    turns: list[tuple[str, str]] = []  # (prompt, completion) per assistant turn, in order
    dropped = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        completion = None
        # the turn after the messages before it; if adding it re-renders those (kimi-k2-thinking drops the
        # tool loop's reasoning once the final answer is there), after the non-assistant ones alone
        for context in (messages[:i], [m for m in messages[:i] if m.get("role") != "assistant"]):
            before = render(context, True, preserve_thinking=True)
            through = render(context + [message], False, preserve_thinking=True)
            if through.startswith(before):
                completion = through[len(before):]
                break
        if completion is None:
            raise ValueError(f"the chat template does not render assistant message {i} as a continuation of its "
                             f"generation prompt, so the tokens it produced cannot be told apart")
        reasoning = message.get("reasoning_content") or message.get("reasoning") or message.get("thinking")
        if isinstance(reasoning, str) and reasoning.strip() and reasoning not in completion:
            dropped += 1
        turns.append((render(messages[:i], True), completion))
    if not turns:
        raise ValueError("the conversation has no assistant message to train on")

    examples = []
    remaining = list(range(len(turns)))
    while remaining:
        prompt, completion = turns[remaining[-1]]
        text = prompt + completion
        covered = [k for k in remaining if text.startswith(turns[k][0] + turns[k][1])]
        spans = [(len(turns[k][0]), len(turns[k][0]) + len(turns[k][1])) for k in covered]
        examples.append(encode_spans(tokenizer, text, spans))
        remaining = [k for k in remaining if k not in covered]
    examples.reverse()
    return EncodedChat(examples, len(turns), dropped)


# ---- files --------------------------------------------------------------------------------------------
def read_jsonl(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, int, object]]:
    """(where, line number, parsed object or a ChatDataError) for every non-blank line of the files."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no conversation file {path}")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield str(path), n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield str(path), n, ChatDataError(f"{path}:{n}: not valid JSON ({e})")


@dataclass
class ChatDataReport:
    """What ``build_chat_dataset`` did. Token counts are over the examples written (both splits)."""
    conversations: int = 0          # converted
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0         # mask 1
    assistant_turns: int = 0
    split_conversations: int = 0    # conversations that became more than one example
    reasoning_dropped: int = 0      # assistant turns whose reasoning the template does not render
    skipped: int = 0                # bad lines skipped (skip_bad)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT of them
    overlong: int = 0               # examples over max_tokens
    truncated: int = 0              # of those, cut to max_tokens
    dropped: int = 0                # of those, dropped (or left with no trained token by the cut)
    eval_conversations: int = 0
    eval_examples: int = 0
    train_dir: str | None = None
    eval_dir: str | None = None

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"conversations: {self.conversations} ({self.assistant_turns} assistant turns) -> "
                 f"{self.examples} examples"
                 + (f" ({self.split_conversations} conversations split where the template drops earlier reasoning)"
                    if self.split_conversations else ""),
                 f"tokens: {self.tokens}, trained (assistant) tokens: {self.trained_tokens} "
                 f"({self.trained_tokens / max(self.tokens, 1):.1%})",
                 f"skipped lines: {self.skipped}"]
        if self.overlong:
            lines.append(f"over max_tokens: {self.overlong} examples ({self.truncated} truncated, {self.dropped} dropped)")
        if self.reasoning_dropped:
            lines.append(f"reasoning not rendered by the chat template (trained without it): "
                         f"{self.reasoning_dropped} assistant turns")
        lines.append(f"train: {self.train_dir} ({self.examples - self.eval_examples} examples)")
        if self.eval_dir:
            lines.append(f"eval: {self.eval_dir} ({self.eval_conversations} conversations, {self.eval_examples} "
                         f"examples)")
        return "\n".join(lines)


def build_chat_dataset(inputs: Iterable[str | os.PathLike], tokenizer, out_dir: str | os.PathLike, *,
                       eval_fraction: float = 0.0, seed: int = 0, max_tokens: int | None = None,
                       overlong: str = "drop", skip_bad: bool = False, fmt: str = "auto",
                       template_kwargs: Mapping | None = None) -> ChatDataReport:
    """Convert JSONL conversation files into ``out_dir/train`` (and ``out_dir/eval`` with
    ``eval_fraction`` > 0: that share of the conversations, at least one, chosen with ``seed``; a
    conversation's examples stay together). ``max_tokens``: an example longer than this is dropped
    or, with ``overlong="truncate"``, cut to its first ``max_tokens`` tokens (dropped if no trained
    token is left). A bad line raises ChatDataError naming file, line and problem, unless
    ``skip_bad``: then it is counted and skipped."""
    from .data import write_dataset

    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}; got {overlong!r}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2; got {max_tokens}")
    inputs = [str(p) for p in inputs]
    report = ChatDataReport()
    conversations: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for where, n, record in read_jsonl(inputs):
        try:
            if isinstance(record, ChatDataError):
                raise record
            try:
                messages, tools = to_chat_messages(record, fmt)
                encoded = encode_chat(tokenizer, messages, tools, template_kwargs)
            except Exception as e:  # noqa: BLE001 - converters and jinja raise many kinds; all name a line's fault
                raise ChatDataError(f"{where}:{n}: {e}") from e
        except ChatDataError as e:
            if not skip_bad:
                raise
            report.skipped += 1
            if len(report.errors) < MAX_ERRORS_KEPT:
                report.errors.append(str(e))
            continue
        examples = []
        for ids, mask in encoded.examples:
            if max_tokens is not None and len(ids) > max_tokens:
                report.overlong += 1
                if overlong == "drop" or not any(mask[:max_tokens]):
                    report.dropped += 1
                    continue
                ids, mask = ids[:max_tokens], mask[:max_tokens]
                report.truncated += 1
            examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
        report.reasoning_dropped += encoded.reasoning_dropped
        report.assistant_turns += encoded.turns
        report.split_conversations += len(encoded.examples) > 1
        if examples:
            conversations.append(examples)
    report.conversations = len(conversations)
    if not conversations:
        raise ChatDataError(f"no conversation could be converted ({report.skipped} bad lines skipped"
                            f"{', ' + str(report.dropped) + ' examples over max_tokens dropped' if report.dropped else ''})"
                            + (f"; first error: {report.errors[0]}" if report.errors else ""))
    eval_ids: set[int] = set()
    if eval_fraction > 0:
        if len(conversations) < 2:
            raise ChatDataError("an eval split needs at least 2 conversations; got 1 (use --eval-fraction 0)")
        n_eval = min(len(conversations) - 1, max(1, round(eval_fraction * len(conversations))))
        eval_ids = set(random.Random(seed).sample(range(len(conversations)), n_eval))
    out = Path(out_dir)
    info = {"source": inputs,
            "tokenizer": getattr(tokenizer, "name_or_path", None), "max_tokens": max_tokens, "overlong": overlong,
            "template_kwargs": dict(template_kwargs or {}), "eval_fraction": eval_fraction, "seed": seed}
    splits = {"train": [c for i, c in enumerate(conversations) if i not in eval_ids],
              "eval": [c for i, c in enumerate(conversations) if i in eval_ids]}
    for name, convs in splits.items():
        if not convs:
            continue
        docs = [ex for conv in convs for ex in conv]
        write_dataset(((ids.tolist(), mask.tolist()) for ids, mask in docs), out / name, tokenizer.vocab_size,
                      info={**info, "split": name, "conversations": len(convs), "kind": "chat"})
        report.examples += len(docs)
        report.tokens += sum(len(ids) for ids, _ in docs)
        report.trained_tokens += int(sum(int(m.sum()) for _, m in docs))
        if name == "eval":
            report.eval_conversations, report.eval_examples = len(convs), len(docs)
    report.train_dir = str(out / "train")
    report.eval_dir = str(out / "eval") if eval_ids else None
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report
