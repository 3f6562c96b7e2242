"""Thinking budgets: cap how many tokens a request spends inside ``<think> ... </think>``.

A request with ``SamplingParams.thinking_token_budget = N`` gets a ``ThinkingBudget`` on its
Sequence. It watches the generated tokens: the section is open when the prompt leaves it open
(its last thinking opener comes after its last closer, e.g. a K2.6 generation prompt ending in
``<think>``) or when the model writes the opener itself; it closes when the closing marker has been
generated. Every token generated while the section is open counts against the budget (over all
sections of the reply; the markers themselves do not count). Once N tokens are spent and the
section is still open, the sampler replaces the next sampled tokens by the closing marker, one per
step (a multi-token marker the model already began is completed, not restarted); then decoding
goes on normally with the answer. A section opened again after the budget is spent is closed at
once.

Forced tokens are ordinary output tokens: they are appended, detokenized, streamed and counted
toward max_tokens like sampled ones, and their logprobs (when asked for) are the model's. The
forcing is a host-side replacement after sampling, so the model forward, CUDA-graph decode and
batching do not change, and requests without a budget pay nothing beyond the sampler's per-row
``params`` checks.

Markers are token-id sequences: by default the tokenizer's encoding of ``<think>`` and ``</think>``
(one special token each in K2's vocabulary), or ``thinking_start_token_ids`` /
``thinking_end_token_ids`` from the request. Matching is on token ids, so a marker the model spells
with a different tokenization of the same text is not seen (K2's markers are single tokens).
"""

from __future__ import annotations

from typing import Sequence as Seq

from .params import SamplingParams

THINK_START, THINK_END = "<think>", "</think>"


def thinking_markers(params: SamplingParams, tokenizer=None, vocab_size: int | None = None
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(opener ids, closer ids) for a request with a thinking budget: the request's own, else the
    tokenizer's encoding of ``<think>`` / ``</think>``. Raises ValueError when there is neither, or
    an id is outside the vocabulary."""
    markers = []
    for given, text, field in ((params.thinking_start_token_ids, THINK_START, "thinking_start_token_ids"),
                               (params.thinking_end_token_ids, THINK_END, "thinking_end_token_ids")):
        if given:
            ids = tuple(given)
        elif tokenizer is not None:
            ids = tuple(tokenizer.encode(text, allow_special=True))
        else:
            raise ValueError(f"thinking_token_budget needs the thinking markers: this engine has no tokenizer, "
                             f"so give {field} (the token ids of {text!r})")
        if not ids:
            raise ValueError(f"the tokenizer encodes {text!r} to no tokens; give {field}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{field}={list(ids)} holds an id outside the model's vocabulary [0, {vocab_size})")
        markers.append(ids)
    return markers[0], markers[1]


def _last_index(ids: Seq[int], marker: tuple[int, ...]) -> int:
    """Start of the last occurrence of ``marker`` in ``ids`` (-1 if none)."""
    n = len(marker)
    if n == 1:
        try:
            return len(ids) - 1 - ids[::-1].index(marker[0])
        except ValueError:
            return -1
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == marker[0] and tuple(ids[i:i + n]) == marker:
            return i
    return -1


def prompt_leaves_thinking_open(prompt_ids: Seq[int], start: tuple[int, ...], end: tuple[int, ...]) -> bool:
    """Whether the prompt's last thinking opener comes after its last closer."""
    last_start = _last_index(prompt_ids, start)
    return last_start >= 0 and last_start > _last_index(prompt_ids, end)


def _ends_with(ids: list[int], marker: tuple[int, ...]) -> bool:
    n = len(marker)
    return len(ids) >= n and ids[-1] == marker[-1] and (n == 1 or tuple(ids[-n:]) == marker)


class ThinkingBudget:
    """One request's thinking state. ``observe`` after each appended token; ``forced_token`` before
    sampling says which token must come next (None: sample freely)."""

    __slots__ = ("budget", "start", "end", "inside", "used")

    def __init__(self, budget: int, start: tuple[int, ...], end: tuple[int, ...], inside: bool):
        self.budget, self.start, self.end = budget, start, end
        self.inside = inside  # a thinking section is open
        self.used = 0  # thinking tokens generated (all sections), at most ``budget``

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_ids: Seq[int], tokenizer=None) -> "ThinkingBudget | None":
        """The state for a request (None when it has no budget)."""
        if params.thinking_token_budget is None:
            return None
        start, end = thinking_markers(params, tokenizer)
        return cls(params.thinking_token_budget, start, end, prompt_leaves_thinking_open(prompt_ids, start, end))

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    def forced_token(self, token_ids: list[int]) -> int | None:
        """The token the next step must produce (``token_ids``: the sequence so far), or None."""
        if not self.inside or self.used < self.budget:
            return None
        end = self.end
        # continue a closing marker already under way (forced, or begun by the model)
        for k in range(len(end) - 1, 0, -1):
            if tuple(token_ids[-k:]) == end[:k]:
                return end[k]
        return end[0]

    def observe(self, token_ids: list[int]) -> None:
        """Update after ``token_ids[-1]`` was appended. Tokens past the budget (the forced closer) are
        not counted."""
        if self.inside:
            if _ends_with(token_ids, self.end):
                self.inside = False
            elif self.used < self.budget:
                self.used += 1
        elif _ends_with(token_ids, self.start):
            self.inside = True
