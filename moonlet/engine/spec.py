"""Speculative decoding: the settings, and n-gram (prompt-lookup) drafts. (Drafts from a smaller
model of the same tokenizer: ``draft.py``.)

Agent and coding outputs copy spans of their context: a file being edited, a tool result quoted
back, a list repeated with one change. When a sequence's last n tokens occurred before, the tokens
that followed them then are a cheap guess of what comes next. Each step, a running sequence that
decodes gets up to ``num_speculative_tokens`` such draft tokens; the step then computes its last
token and the drafts in one causal span over its paged cache (as a small prefill chunk does), the
sampler takes the target's token at every position and keeps the drafts up to the first one that
differs from it, plus the target's token there (or after the last draft). One forward yields 1 to
k + 1 tokens instead of one.

The output is exactly what the engine produces without speculation: at every position the target
token is drawn under the request's full processing (penalties over the tokens before it, drafts
included, temperature, top-k/top-p/min-p, a thinking budget's forced token), and a draft only
counts when it equals that token. For a draft d this accepts with probability p(d) and, on
rejection, emits a token distributed as p with d removed and renormalized — the standard
speculative-sampling rule for a deterministic draft. See ``Sampler.verify``.

The proposer (``NgramProposer``): for n from ``ngram_max`` down to ``ngram_min``, the most recent
earlier occurrence of the sequence's last n tokens in its own token ids (prompt and output), and
the up to k tokens that followed it (fewer when the sequence ends sooner). Each sequence keeps an
index {n-gram: end of its latest occurrence} that is extended by the tokens appended since the last
lookup, so a lookup costs O(ngram_max) dictionary operations however long the context is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence as Seq

if TYPE_CHECKING:
    from .sequence import Sequence

SPECULATIVE_METHODS = ("ngram", "draft", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How drafts are proposed, at most ``num_speculative_tokens`` per sequence and step: ``method``
    'ngram' from the longest matching suffix of ``ngram_max`` .. ``ngram_min`` tokens, 'draft' by the
    greedy continuation of the draft checkpoint at ``model`` (a directory), or 'mtp' by the
    checkpoint's multi-token-prediction layer (``mtp.py``; ``model``: where to load it from, default
    the target's directory)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 2
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"engine argument speculative={self.method!r} is not a known method; use "
                             f"{' or '.join(repr(m) for m in SPECULATIVE_METHODS)} (or None: off)")
        if self.method == "draft" and not self.model:
            raise ValueError("engine argument speculative='draft' needs speculative_model: the checkpoint directory "
                             "of a smaller model with the same tokenizer (CLI --speculative-model PATH)")
        if self.method == "ngram" and self.model:
            raise ValueError(f"engine argument speculative_model={self.model!r} is only used with "
                             f"speculative='draft' or 'mtp' (got speculative={self.method!r})")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"engine argument num_speculative_tokens={k!r} must be an integer >= 1")
        lo, hi = self.ngram_min, self.ngram_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"engine arguments ngram_min={lo!r}, ngram_max={hi!r} must be integers with "
                             f"1 <= ngram_min <= ngram_max")


def propose_ngram(token_ids: Seq[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Drafts for ``token_ids`` by direct search (the plain statement of the rule; the engine uses
    ``NgramIndex``): for n = ngram_max .. ngram_min, the latest i + n < len with
    token_ids[i:i+n] == the last n tokens gives token_ids[i+n : i+n+k]; [] when no n matches."""
    L = len(token_ids)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        suffix = list(token_ids[L - n:])
        for i in range(L - n - 1, -1, -1):
            if list(token_ids[i:i + n]) == suffix:
                return list(token_ids[i + n:i + n + k])
    return []


class NgramIndex:
    """One sequence's n-gram index: for each n in [ngram_min, ngram_max], {n-gram: exclusive end of
    its latest occurrence}, over every occurrence except the sequence's current suffix."""

    __slots__ = ("ngram_min", "ngram_max", "maps", "indexed")

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(ngram_min, ngram_max + 1)}
        self.indexed = 0  # the n-grams with exclusive end <= indexed are in the maps

    def _extend(self, token_ids: Seq[int]) -> None:
        # index the n-grams ending before the last token (the last token's own n-grams are the query)
        stop = len(token_ids) - 1
        for end in range(self.indexed + 1, stop + 1):
            for n, table in self.maps.items():
                if end >= n:
                    table[tuple(token_ids[end - n:end])] = end
        self.indexed = max(self.indexed, stop)

    def propose(self, token_ids: Seq[int], k: int) -> list[int]:
        """Up to ``k`` drafts for ``token_ids`` (which must only have grown since the last call)."""
        if k <= 0 or len(token_ids) < 2:
            return []
        self._extend(token_ids)
        L = len(token_ids)
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            end = self.maps[n].get(tuple(token_ids[L - n:]))
            if end is not None:
                return list(token_ids[end:end + k])
        return []


def max_drafts(config: SpeculativeConfig, seq: "Sequence", max_model_len: int) -> int:
    """How many drafts ``seq`` may verify this step: at most ``num_speculative_tokens``, and few enough
    that accepting them all cannot pass ``max_tokens`` or ``max_model_len`` (a verified step emits at
    most drafts + 1 tokens)."""
    remaining = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens)
    return max(0, min(config.num_speculative_tokens, remaining - 1))


class NgramProposer:
    """Drafts for the scheduler: ``propose(seq)`` is the n-gram continuation, cut to ``max_drafts``."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len

    def max_drafts(self, seq: "Sequence") -> int:
        return max_drafts(self.config, seq, self.max_model_len)

    def propose(self, seq: "Sequence") -> list[int]:
        k = self.max_drafts(seq)
        if k == 0:
            return []
        if seq.ngram_index is None:
            seq.ngram_index = NgramIndex(self.config.ngram_min, self.config.ngram_max)
        return seq.ngram_index.propose(seq.token_ids, k)
