"""Logit processors: the per-request logit edits of ``SamplingParams.logit_bias``, ``min_tokens``,
``bad_words`` and ``allowed_token_ids``, applied to a step's rows together.

Each sequence that asks for one gets a ``LogitProcessors`` when the engine creates it (the bias and
the allowed ids as device tensors, the bad words as token sequences, made once); every step the
sampler collects the rows that need them and edits the logits with one scatter per kind:

- ``logit_bias``: the bias is added to its token's logit (OpenAI's semantics: -100 or 100 in effect
  bans or forces a token; greedy decoding sees the biased logits too);
- ``allowed_token_ids``: every other token's logit becomes -inf;
- ``bad_words``: a word's token sequence may not be generated: its last token is masked where the
  output (the tokens generated so far, and a verification row's drafts before it; not the prompt)
  ends with the word's other tokens, and a one-token word is masked always. Each word is tokenized
  as written and with one leading space, so it is banned at the start of the text and after a space;
- ``min_tokens``: the stop tokens (the EOS ids and ``stop_token_ids``, what ``Sequence.stop_ids``
  holds) are masked while fewer than ``min_tokens`` tokens were generated (``Sequence.append_token``
  also ignores stop strings until then).

- ``logits_processors`` (user callables, Python API): each ``fn(output, row) -> row`` in turn, after
  the edits above. A callable that raises, or returns something other than a tensor of the row's
  shape, is recorded on the sequence (``LogitProcessors.error``, logged) and its request ends with
  ``abort`` when the token is appended; the row keeps the edits made before it, and the batch goes on.

They run before the penalties, on the raw logits (vLLM's order); the logprobs a request gets are taken
before them, so they stay the model's own distribution.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

logger = logging.getLogger(__name__)


def bad_word_token_ids(tokenizer, words: Iterable[str]) -> list[tuple[int, ...]]:
    """The token sequences banned for ``words``: each word as written and with one leading space (the
    form it takes inside a text), distinct."""
    seqs: list[tuple[int, ...]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, allow_special=False))
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


class LogitProcessors:
    """One sequence's processors, prepared once. ``stop_ids``: the tokens ``min_tokens`` holds back;
    ``bad_words``: token sequences (``bad_word_token_ids``)."""

    def __init__(self, params, stop_ids: Iterable[int], bad_words: list[tuple[int, ...]], device):
        bias = params.logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        self.bias_values = torch.tensor([float(b) for b in bias.values()], dtype=torch.float32, device=device)
        self.min_tokens = params.min_tokens
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.bad_words = bad_words
        allowed = params.allowed_token_ids
        self.allowed = None if allowed is None else torch.tensor(sorted(set(allowed)), dtype=torch.long, device=device)
        self.custom = list(params.logits_processors or [])
        self.error: str | None = None  # why a user processor failed (the request then ends with 'abort')

    def banned(self, history: list[int]) -> list[int]:
        """The tokens this row may not take after the output ``history``: stop tokens before
        ``min_tokens``, bad words' last tokens where the output ends with the rest of the word."""
        out: list[int] = []
        for word in self.bad_words:
            k = len(word) - 1
            if k == 0 or (len(history) >= k and tuple(history[-k:]) == word[:-1]):
                out.append(word[-1])
        return out


def apply_processors(logits: torch.Tensor, rows: list[tuple[int, LogitProcessors, list[int]]]) -> torch.Tensor:
    """Edit ``logits`` [R, V] in place for ``rows``: (row, its sequence's processors, the output tokens
    before that row). Returns ``logits``."""
    dev = logits.device
    bias_rows, bias_ids, bias_values = [], [], []
    ban_rows: list[int] = []
    ban_ids: list[torch.Tensor] = []
    allow_rows, allow_cols, allow_ids = [], [], []
    for row, proc, history in rows:
        if proc.bias_ids.numel():
            bias_rows.append(torch.full_like(proc.bias_ids, row))
            bias_ids.append(proc.bias_ids)
            bias_values.append(proc.bias_values)
        if proc.allowed is not None:
            allow_cols.append(torch.full_like(proc.allowed, len(allow_rows)))
            allow_rows.append(row)
            allow_ids.append(proc.allowed)
        banned = proc.banned(history)
        if banned:
            ban_rows += [row] * len(banned)
            ban_ids.append(torch.tensor(banned, dtype=torch.long, device=dev))
        if len(history) < proc.min_tokens and proc.stop_ids.numel():
            ban_rows += [row] * proc.stop_ids.numel()
            ban_ids.append(proc.stop_ids)
    if bias_rows:
        logits.index_put_((torch.cat(bias_rows), torch.cat(bias_ids)), torch.cat(bias_values).to(logits.dtype),
                          accumulate=True)
    if allow_rows:
        keep = torch.zeros(len(allow_rows), logits.shape[1], dtype=torch.bool, device=dev)
        keep[torch.cat(allow_cols), torch.cat(allow_ids)] = True
        index = torch.tensor(allow_rows, device=dev)
        logits[index] = logits[index].masked_fill(~keep, float("-inf"))
    if ban_rows:
        logits[torch.tensor(ban_rows, device=dev), torch.cat(ban_ids)] = float("-inf")
    for row, proc, history in rows:
        if proc.custom and proc.error is None:
            _run_custom(logits, row, proc, history)
    return logits


def _run_custom(logits: torch.Tensor, row: int, proc: LogitProcessors, history: list[int]) -> None:
    """The user's processors on one row, in order; a failure is recorded on ``proc`` and stops them."""
    for fn in proc.custom:
        try:
            out = fn(list(history), logits[row])
            if not isinstance(out, torch.Tensor) or out.shape != logits[row].shape:
                raise TypeError(f"it returned {type(out).__name__}"
                                f"{' of shape ' + str(tuple(out.shape)) if isinstance(out, torch.Tensor) else ''}, "
                                f"not a tensor of shape {tuple(logits[row].shape)}")
            logits[row] = out
        except Exception as e:  # noqa: BLE001 - one request's callable must not stop the batch
            proc.error = f"logits processor {getattr(fn, '__name__', repr(fn))} failed: {type(e).__name__}: {e}"
            logger.error("%s; its request ends with finish_reason 'abort'", proc.error)
            return
