"""Structured outputs: decoding constrained to a JSON schema, any JSON object, a regex or a choice.

A request's ``SamplingParams.structured`` (a ``StructuredOutput``) is compiled by the grammar library
``xgrammar`` (an optional dependency: ``pip install 'moonlet[structured]'``) into a grammar over
the model's vocabulary. Each constrained sequence carries a ``StructuredState``: a grammar matcher
that has consumed the sequence's constrained output so far. Every step the sampler asks the
matcher for the bitmask of the tokens that may come next and sets the other logits to -inf, after
the penalties and before temperature, top-k/top-p/min-p and the draw, so the sample is taken from
the model's distribution restricted to the grammar (greedy: the most likely allowed token). The
chosen token is then fed to the matcher when it is appended (``Sequence.append_token``).

End of sequence: the matcher's stop tokens are the request's own (the model's EOS ids and the
tokenizer's stop tokens unless ``ignore_eos``, plus ``stop_token_ids``). They are allowed only
where the grammar may end, and once the grammar cannot go on they are the only tokens allowed, so
a finished value is followed by EOS and the request ends with finish_reason 'stop'. A request
with no stop token at all ends as soon as the grammar is complete. ``max_tokens`` still applies:
a request cut off mid-value finishes with 'length' and its text is an incomplete prefix of a valid
value.

Reasoning: when the prompt leaves a thinking section open (``moonlet.engine.thinking``; a K2.6
generation prompt ends in ``<think>``), the reasoning is free text and the constraint starts after
the closing marker ``</think>`` (vLLM's reasoning-aware structured output). A thinking budget's
forced closer starts it as well.

Speculative decoding: ``Sampler.verify`` asks ``StructuredState.fill_draft_rows`` for one mask per
verified position — the matcher walks through the drafts and is rolled back afterwards — so each
position's target token is drawn from its masked distribution and a draft the grammar forbids is
never accepted. Preemption does not touch the matcher: it lives on the Sequence, a recompute only
refills the cache, and the sample after it continues from the same state.

Grammars are compiled once per distinct constraint per engine (an LRU of ``GrammarCache.capacity``
entries), when the request is checked (``EngineCore.check_request``), so a bad schema is an error
of the request and the step loop never compiles. The per-step cost is the matcher's mask
computation on the host (tens of microseconds per constrained row for JSON) and one bitmask
application; unconstrained rows pay nothing. See docs/serving-engine.md.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections import OrderedDict
from typing import Sequence as Seq

import torch

from .params import StructuredOutput

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'moonlet[structured]'"


class StructuredOutputUnavailable(ValueError):
    """Structured output was requested but the grammar library is not installed."""

    def __init__(self) -> None:
        super().__init__(f"structured output (JSON schema / JSON mode / regex / choice) needs the optional "
                         f"'xgrammar' package, which is not installed; install it with: {INSTALL_HINT}")


def load_xgrammar():
    """The xgrammar module; StructuredOutputUnavailable (a ValueError) when it is not installed."""
    try:
        return importlib.import_module("xgrammar")
    except ImportError:
        raise StructuredOutputUnavailable() from None


def structured_available() -> bool:
    """Whether structured output can be used (xgrammar imports)."""
    try:
        load_xgrammar()
    except StructuredOutputUnavailable:
        return False
    return True


class GrammarCache:
    """The engine's grammar side: the vocabulary as xgrammar sees it, its compiler, and an LRU of
    compiled grammars keyed by ``StructuredOutput.key``. Thread-safe (requests are checked on the
    caller's thread and added on the engine's)."""

    capacity = 64

    def __init__(self, tokenizer, vocab_size: int):
        if tokenizer is None or not hasattr(tokenizer, "token_bytes"):
            raise ValueError("structured output needs the model's tokenizer (the grammar is built over its token "
                             "bytes); this engine has none")
        xgr = load_xgrammar()
        self.xgr = xgr
        self.vocab_size = vocab_size
        # the BPE tokens' bytes; the ids past them (K2's special slots, any padding of the model's
        # vocabulary) are special to xgrammar: never allowed, except as a matcher's stop tokens
        n = min(tokenizer.num_base_tokens, vocab_size)
        vocab = [tokenizer.token_bytes(i) for i in range(n)]
        # no stop tokens of its own: each matcher gets its request's (``new_state``)
        self.info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        # JSON never holds a raw control character (U+0000..U+001F) — in strings they must be escaped,
        # and outside them only \t \n \r are whitespace. xgrammar's rules for length-bounded strings
        # (maxLength / minLength) let them through, which json.loads then rejects, so JSON grammars are
        # also masked with these static masks: tokens holding such bytes never, or only \t \n \r
        # (when the request allows any whitespace between values)
        any_ctrl = [any(b < 0x20 for b in v) for v in vocab]
        bad_ctrl = [any(b < 0x20 and b not in b"\t\n\r" for b in v) for v in vocab]
        self.json_masks = {False: _pack_allowed(any_ctrl, vocab_size), True: _pack_allowed(bad_ctrl, vocab_size)}
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # grammars compiled (cache misses)

    def compile(self, spec: StructuredOutput):
        """The compiled grammar for ``spec`` (from the cache when seen recently). ValueError for a
        schema, regex or choice the library cannot compile."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            self.num_compiled += 1
        return compiled

    def _compile(self, spec: StructuredOutput):
        kind = spec.kind
        try:
            if kind == "json_schema":
                schema = spec.json_schema
                text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
                return self.compiler.compile_json_schema(text, strict_mode=spec.strict,
                                                         any_whitespace=spec.any_whitespace)
            if kind == "json_object":  # any object (OpenAI's JSON mode), not any JSON value
                return self.compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                         any_whitespace=spec.any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(spec.regex)
            # json.dumps writes each choice as a double-quoted literal with escapes EBNF reads
            rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(f"root ::= {rule}"))
        except (RuntimeError, ValueError, TypeError) as e:
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            # xgrammar prefixes its messages with a timestamp and source location: keep the message
            if "] " in detail and detail.startswith("["):
                detail = detail.split(": ", 1)[-1]
            raise ValueError(f"cannot compile the structured-output {kind.replace('_', ' ')}: {detail}") from None

    def new_state(self, spec: StructuredOutput, stop_ids: Seq[int], prompt_ids: Seq[int],
                  think_markers: tuple[tuple[int, ...], tuple[int, ...]] | None) -> "StructuredState":
        """A matcher for one request. ``think_markers`` (opener, closer): when the prompt leaves a
        thinking section open, the constraint starts after the closer."""
        from .thinking import prompt_leaves_thinking_open

        compiled = self.compile(spec)
        stops = sorted(int(t) for t in stop_ids)
        if stops:
            matcher = self.xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
        else:  # nothing may end the request: it ends when the grammar is complete
            matcher = self.xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        end: tuple[int, ...] | None = None
        if think_markers is not None and prompt_leaves_thinking_open(prompt_ids, *think_markers):
            end = think_markers[1]
        extra = self.json_masks[spec.any_whitespace] if spec.kind in ("json_schema", "json_object") else None
        return StructuredState(matcher, self.vocab_size, end, extra)


class StructuredState:
    """One request's constraint state: its grammar matcher, and whether the constraint is in force
    yet (it waits for ``</think>`` when the prompt opened a thinking section)."""

    __slots__ = ("matcher", "vocab_size", "think_end", "active", "failed", "extra_mask")

    def __init__(self, matcher, vocab_size: int, think_end: tuple[int, ...] | None = None,
                 extra_mask: torch.Tensor | None = None):
        self.matcher = matcher
        self.extra_mask = extra_mask  # a static bitmask row ANDed with the grammar's (JSON: no raw control bytes)
        self.vocab_size = vocab_size
        self.think_end = think_end  # the closer the constraint waits for (None: in force from the start)
        self.active = think_end is None
        self.failed = False  # a token the grammar refused was appended (never expected; see accept)

    @property
    def terminated(self) -> bool:
        """The grammar is finished (its stop token accepted, or complete when it has none)."""
        return self.active and self.matcher.is_terminated()

    def _waits_over(self, token_ids: Seq[int]) -> bool:
        end = self.think_end
        n = len(end)
        return len(token_ids) >= n and tuple(token_ids[-n:]) == end

    def accept(self, token_ids: Seq[int]) -> bool:
        """Feed ``token_ids[-1]`` (just appended to the sequence ``token_ids``). False when the grammar
        refuses it, which the sampler's mask rules out; the engine then ends the request."""
        if not self.active:
            if self._waits_over(token_ids):
                self.active = True
            return True
        if self.matcher.is_terminated():
            return True
        if not self.matcher.accept_token(int(token_ids[-1])):
            self.failed = True
            return False
        return True

    def fill_rows(self, bitmask: torch.Tensor, first_row: int, token_ids: Seq[int], drafts: Seq[int] = ()) -> list[int]:
        """Fill ``bitmask[first_row + j]`` with the tokens allowed at verified position j (0: the next
        token; j > 0: after the first j drafts). Returns the rows that must be masked. The matcher
        follows the drafts while the grammar allows them and is rolled back to where it was: a
        position after a forbidden draft cannot be reached (its target differs from that draft), so
        it is left unmasked."""
        rows: list[int] = []
        active = self.active
        tail = list(token_ids[-len(self.think_end):]) if self.think_end is not None and not active else []
        fed = 0
        try:
            for j in range(len(drafts) + 1):
                if active:
                    if self.matcher.is_terminated():
                        break
                    self.matcher.fill_next_token_bitmask(bitmask, first_row + j)
                    if self.extra_mask is not None:
                        bitmask[first_row + j] &= self.extra_mask
                    rows.append(first_row + j)
                if j == len(drafts):
                    break
                d = int(drafts[j])
                if active:
                    if not self.matcher.accept_token(d):
                        break
                    fed += 1
                else:
                    tail.append(d)
                    if self._waits_over(tail):
                        active = True
        finally:
            if fed:
                self.matcher.rollback(fed)
        return rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits the bitmask forbids to -inf, in place, in ``rows`` (xgrammar's kernel: a CUDA
    or Triton one for GPU logits, a C++ loop for CPU ones)."""
    global _xgr_kernels
    if _xgr_kernels is None:  # imported once: a step never depends on the import system again
        _xgr_kernels = load_xgrammar()
    _xgr_kernels.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


_xgr_kernels = None  # the xgrammar module, once a step has masked logits


def _pack_allowed(forbidden: Seq[bool], vocab_size: int) -> torch.Tensor:
    """An int32 bitmask row (xgrammar's layout: bit i % 32 of word i // 32) allowing every token but
    the ``forbidden`` ones (ids past ``forbidden`` stay allowed)."""
    allowed = torch.ones(((vocab_size + 31) // 32) * 32, dtype=torch.int64)
    if forbidden:
        allowed[:len(forbidden)] = ~torch.tensor(forbidden, dtype=torch.bool)
    words = (allowed.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask for ``rows`` logit rows: int32, 32 tokens per word, all allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
