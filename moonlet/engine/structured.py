"""Structured outputs: decoding constrained to a JSON schema, any JSON object, a regex, a choice or an
EBNF grammar.

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

Strict tool calls (``StructuredOutput.tools``): the grammar is an xgrammar structural tag over K2's
tool-call layout, ``<|tool_calls_section_begin|>`` then per call ``<|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>ARGS<|tool_call_end|>``, then ``<|tool_calls_section_end|>``. The markers
are single special tokens, matched by id (xgrammar's ``token`` format), so these grammars use a
second vocabulary view in which K2's named special tokens are tokens (in the first they are never
allowed); NAME is one of the declared names, IDX is digits, ARGS is compact JSON under that tool's
schema (the grammar ``xgrammar.Grammar.from_json_schema`` builds, embedded). Before the section the
reply is free at the token level (thinking, text; only the four in-section markers are excluded, and
the section opener starts the constraint), so a thinking section needs no waiting for ``</think>``.
While the matcher is inside a call's arguments the state also masks tokens holding raw control
bytes and every special token but the call's end (the JSON string rules would let their text in).

A response format beside tools (``StructuredOutput.content``): the structural tag is the format's
JSON grammar or the tool section, over the tool vocabulary view; the state masks special tokens
inside the JSON and waits for ``</think>`` as a plain format does. Every constrained row also
excludes UTF-8 surrogates, which the library's character classes admit (``GrammarCache.utf8``).

Grammars are compiled once per distinct constraint per engine (an LRU of ``GrammarCache.capacity``
entries; concurrent compiles of the same constraint wait for one), when the request is checked
(``EngineCore.check_request``; ``AsyncLLM.generate`` runs that check in a worker thread for a
constrained request, so a compile never blocks the event loop), so a bad schema is an error of the
request (``StructuredOutputError``, with the request field in ``param``) and the step loop never
compiles. The per-step cost is the matcher's mask
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


class StructuredOutputError(ValueError):
    """A constraint that cannot be used; ``param`` names the request field it came from (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StructuredOutputUnavailable(StructuredOutputError):
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
        # UTF-8 has no surrogates (U+D800..U+DFFF, bytes ED A0..BF xx), but the library's character
        # classes let them through, and a reply holding one does not decode. So every constrained row is
        # also masked: never a token holding ED A0..BF, and after a token ending in ED, none starting with
        # A0..BF (StructuredState.utf8)
        surrogate = [any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in zip(v, v[1:])) for v in vocab]
        self.no_surrogate = _pack_allowed(surrogate, vocab_size)
        self.utf8 = (frozenset(i for i, v in enumerate(vocab) if v and v[-1] == 0xED),
                     _pack_allowed([bool(v) and 0xA0 <= v[0] <= 0xBF for v in vocab], vocab_size))
        self.json_masks = {ws: _pack_allowed([c or u for c, u in zip(ctrl, surrogate)], vocab_size)
                           for ws, ctrl in ((False, any_ctrl), (True, bad_ctrl))}
        self.tokenizer = tokenizer
        self._tool_vocab: ToolVocab | None = None
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling: dict[tuple, threading.Event] = {}  # keys being compiled now
        self.num_compiled = 0  # grammars compiled (cache misses)

    def compile(self, spec: StructuredOutput):
        """The compiled grammar for ``spec`` (from the cache when seen recently; a compile of the same
        constraint under way on another thread is waited for). StructuredOutputError (a ValueError,
        with ``spec.param``) for a schema, regex or choice the library cannot compile."""
        key = spec.key
        while True:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
                running = self._compiling.get(key)
                if running is None:
                    done = self._compiling[key] = threading.Event()
                    break
            running.wait()  # then look again: a failed compile left nothing, and this one retries it
        try:
            compiled = self._compile(spec)
        except ValueError as e:
            raise StructuredOutputError(str(e), spec.param) from None
        finally:
            with self._lock:
                self._compiling.pop(key, None)
            done.set()
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            self.num_compiled += 1
        return compiled

    @property
    def tool_vocab(self) -> "ToolVocab":
        """The vocabulary view for tool-call grammars (made on first use)."""
        with self._lock:
            if self._tool_vocab is None:
                self._tool_vocab = ToolVocab(self)
            return self._tool_vocab

    def _compile(self, spec: StructuredOutput):
        kind = spec.kind
        if kind == "tools":
            return self.tool_vocab.compile(spec)
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
            if kind == "grammar":
                return self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(spec.grammar))
            if kind == "structural_tag":
                return self.compiler.compile_structural_tag(self._structural_tag(spec.structural_tag))
            # json.dumps writes each choice as a double-quoted literal with escapes EBNF reads
            rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(f"root ::= {rule}"))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"cannot compile the structured-output {kind.replace('_', ' ')}: {_detail(e)}") from None

    def _structural_tag(self, tag: dict):
        """An xgrammar StructuralTag from the request's dict: its own format, or vLLM's structures and
        triggers (each structure's ``schema`` a JSON Schema)."""
        xgr = self.xgr
        if "format" in tag:
            return xgr.StructuralTag.from_json(json.dumps(tag, ensure_ascii=False))
        items = []
        for i, st in enumerate(tag["structures"]):
            if not isinstance(st, dict) or not all(isinstance(st.get(k), str) for k in ("begin", "end")) \
                    or not isinstance(st.get("schema"), (dict, bool)):
                raise ValueError(f"structural_tag.structures[{i}] must be {{'begin': str, 'schema': {{...}}, "
                                 f"'end': str}}")
            items.append(xgr.StructuralTagItem(begin=st["begin"], schema=json.dumps(st["schema"]), end=st["end"]))
        triggers = tag.get("triggers")
        if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise ValueError("structural_tag.triggers must be a non-empty list of strings (each the start of a "
                             "structure's begin)")
        return xgr.StructuralTag.from_legacy_structural_tag(items, triggers)

    def new_state(self, spec: StructuredOutput, stop_ids: Seq[int], prompt_ids: Seq[int],
                  think_markers: tuple[tuple[int, ...], tuple[int, ...]] | None) -> "StructuredState":
        """A matcher for one request. ``think_markers`` (opener, closer): when the prompt leaves a
        thinking section open, the constraint starts after the closer."""
        from .thinking import prompt_leaves_thinking_open

        compiled = self.compile(spec)
        stops = sorted(int(t) for t in stop_ids)
        if spec.kind == "tools":  # the grammar covers the whole reply, thinking included
            tv = self.tool_vocab
            args = (tv.args_begin, tv.call_end, tv.args_mask)
            matcher = self.xgr.GrammarMatcher(compiled, override_stop_tokens=stops) if stops else \
                self.xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
            if spec.content is None:
                return StructuredState(matcher, self.vocab_size, extra_mask=self.no_surrogate, args=args,
                                       in_args=spec.tool_start == "arguments", utf8=self.utf8)
            # a format beside the tools: the content is JSON (no special token inside it but the stops)
            # or a tool section; free thinking first when the prompt leaves it open, as for plain JSON
            content_mask = _with_bits(self.json_masks[spec.content.any_whitespace], range(tv.num_base, self.vocab_size),
                                      False)
            content_mask = _with_bits(content_mask, stops, True)
            first_mask = _with_bits(content_mask, [tv.section_begin], True)
            end = None
            if think_markers is not None and prompt_leaves_thinking_open(prompt_ids, *think_markers):
                end = think_markers[1]
            return StructuredState(matcher, self.vocab_size, end, args=args,
                                   content=(tv.section_begin, first_mask, content_mask), utf8=self.utf8)
        if stops:
            matcher = self.xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
        else:  # nothing may end the request: it ends when the grammar is complete
            matcher = self.xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        end: tuple[int, ...] | None = None
        if think_markers is not None and prompt_leaves_thinking_open(prompt_ids, *think_markers):
            end = think_markers[1]
        extra = self.json_masks[spec.any_whitespace] if spec.kind in ("json_schema", "json_object") else \
            self.no_surrogate
        return StructuredState(matcher, self.vocab_size, end, extra, utf8=self.utf8)


class StructuredState:
    """One request's constraint state: its grammar matcher, and whether the constraint is in force
    yet (it waits for ``</think>`` when the prompt opened a thinking section)."""

    __slots__ = ("matcher", "vocab_size", "think_end", "active", "failed", "extra_mask", "args", "in_args",
                 "content", "branch", "utf8")

    def __init__(self, matcher, vocab_size: int, think_end: tuple[int, ...] | None = None,
                 extra_mask: torch.Tensor | None = None, args: tuple[int, int, torch.Tensor] | None = None,
                 in_args: bool = False, content: tuple[int, torch.Tensor, torch.Tensor] | None = None,
                 utf8: tuple[frozenset, torch.Tensor] | None = None):
        self.matcher = matcher
        # (the tokens ending in byte ED, the row ANDed after one: no token starting with A0..BF)
        self.utf8 = utf8
        # tool calls: (argument-marker id, call-end id, the bitmask row ANDed while inside arguments)
        self.args = args
        self.in_args = in_args
        # a response format beside tools: (section-opener id, the row ANDed at the reply's first
        # constrained token, the row ANDed inside JSON content); ``branch``: None until that first
        # token, then "content" or "tools" (the opener)
        self.content = content
        self.branch: str | None = None
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
        token = int(token_ids[-1])
        if not self.matcher.accept_token(token):
            self.failed = True
            return False
        self.in_args = self._next_in_args(self.in_args, token)
        self.branch = self._next_branch(self.branch, token)
        return True

    def _next_branch(self, branch: str | None, token: int) -> str | None:
        """Which side of a format-or-tools reply the matcher is on after ``token``."""
        if self.content is None or branch is not None:
            return branch
        return "tools" if token == self.content[0] else "content"

    def _content_row(self, branch: str | None) -> torch.Tensor | None:
        if self.content is None or branch == "tools":
            return None
        return self.content[1] if branch is None else self.content[2]

    def _next_in_args(self, in_args: bool, token: int) -> bool:
        """Whether the matcher is inside a call's arguments after ``token``."""
        if self.args is None:
            return False
        if token == self.args[0]:
            return True
        return False if token == self.args[1] else in_args

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
        in_args = self.in_args
        branch = self.branch
        try:
            for j in range(len(drafts) + 1):
                if active:
                    if self.matcher.is_terminated():
                        break
                    self.matcher.fill_next_token_bitmask(bitmask, first_row + j)
                    if self.extra_mask is not None:
                        bitmask[first_row + j] &= self.extra_mask
                    if in_args:
                        bitmask[first_row + j] &= self.args[2]
                    row = self._content_row(branch)
                    if row is not None:
                        bitmask[first_row + j] &= row
                    last = int(drafts[j - 1]) if j else (int(token_ids[-1]) if len(token_ids) else -1)
                    if self.utf8 is not None and last in self.utf8[0]:
                        bitmask[first_row + j] &= self.utf8[1]
                    rows.append(first_row + j)
                if j == len(drafts):
                    break
                d = int(drafts[j])
                if active:
                    if not self.matcher.accept_token(d):
                        break
                    fed += 1
                    in_args = self._next_in_args(in_args, d)
                    branch = self._next_branch(branch, d)
                else:
                    tail.append(d)
                    if self._waits_over(tail):
                        active = True
        finally:
            if fed:
                self.matcher.rollback(fed)
        return rows


class ToolVocab:
    """The grammar side of strict tool calls: a vocabulary view in which K2's named special tokens are
    tokens (their names as text; the unnamed slots stay special), a compiler over it, the marker ids,
    and the mask for argument positions (no raw control bytes, no special token but the call's end)."""

    def __init__(self, cache: GrammarCache):
        from ..chat import ARGS_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

        tok, xgr, V = cache.tokenizer, cache.xgr, cache.vocab_size
        try:
            ids = [tok.token_id(m) for m in (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGS_BEGIN, CALL_END)]
        except (KeyError, AttributeError):
            raise ValueError("strict tool calls need K2's tool-call special tokens (<|tool_calls_section_begin|> "
                             "...), which this tokenizer does not have") from None
        self.section_begin, self.section_end, self.call_begin, self.args_begin, self.call_end = ids
        self.markers = ids
        n = min(tok.num_base_tokens, V)
        self.num_base = n  # ids from here on are special tokens
        vocab = [tok.token_bytes(i) for i in range(n)] + [b""] * (V - n)
        for name, i in tok.special_tokens.items():
            if n <= i < V:
                vocab[i] = name.encode("utf-8")
        self.xgr = xgr
        self.info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        forbidden = [any(b < 0x20 for b in v) or any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in zip(v, v[1:]))
                     for v in vocab[:n]] + [i != self.call_end for i in range(n, V)]
        self.args_mask = _pack_allowed(forbidden, V)

    def compile(self, spec: StructuredOutput):
        """The structural tag of ``spec`` (kind 'tools'), compiled. ValueError naming the tool whose
        schema the library cannot compile."""
        xgr = self.xgr

        def token(t: int) -> dict:
            return {"type": "token", "token": t}

        def arguments(i: int, tool: dict) -> dict:
            schema = tool.get("parameters")
            strict = spec.strict if schema is not None else False
            text = json.dumps(schema if schema is not None else {"type": "object"}, ensure_ascii=False)
            try:
                grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=strict)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"cannot compile the parameters schema of tool {tool['name']!r} "
                                 f"(tools[{i}]): {_detail(e)}") from None
            return {"type": "grammar", "grammar": str(grammar)}

        args = [arguments(i, t) for i, t in enumerate(spec.tools)]
        calls = [{"type": "sequence", "elements": [
            token(self.call_begin), {"type": "const_string", "value": f"functions.{t['name']}:"},
            {"type": "regex", "pattern": "[0-9]{1,6}"}, token(self.args_begin), a, token(self.call_end)]}
            for t, a in zip(spec.tools, args)]
        call = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
        rest = ([{"type": "star", "content": call}] if spec.parallel_tool_calls else []) + [token(self.section_end)]
        if spec.tool_start == "arguments":
            fmt = {"type": "sequence", "elements": [args[0], token(self.call_end)] + rest}
        elif spec.content is not None:  # JSON content under the format, or a tool section
            fmt = {"type": "or", "elements": [self._content(spec.content),
                                              {"type": "sequence", "elements": [token(self.section_begin), call] + rest}]}
        else:
            fmt = {"type": "sequence", "elements": [call] + rest}
            if spec.tool_start == "text":
                fmt = {"type": "sequence", "elements": [
                    {"type": "any_tokens", "exclude_tokens": list(self.markers)},
                    {"type": "optional", "content": {"type": "sequence",
                                                     "elements": [token(self.section_begin), fmt]}}]}
        try:
            return self.compiler.compile_structural_tag(xgr.StructuralTag.from_json({"type": "structural_tag",
                                                                                     "format": fmt}))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"cannot compile the tool-call grammar: {_detail(e)}") from None

    def _content(self, content: StructuredOutput) -> dict:
        """The structural-tag element of a response format beside tools: its JSON grammar."""
        schema = content.json_schema if content.kind == "json_schema" else {"type": "object"}
        text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
        try:
            grammar = self.xgr.Grammar.from_json_schema(text, any_whitespace=content.any_whitespace,
                                                        strict_mode=content.strict and content.kind == "json_schema")
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"cannot compile the structured-output {content.kind.replace('_', ' ')}: "
                             f"{_detail(e)}") from None
        return {"type": "grammar", "grammar": str(grammar)}


def _with_bits(row: torch.Tensor, ids, on: bool) -> torch.Tensor:
    """A copy of the int32 bitmask row ``row`` with the bits of ``ids`` set (``on``) or cleared."""
    row = row.clone()
    for i in ids:
        word, bit = divmod(int(i), 32)
        value = int(row[word]) & 0xFFFFFFFF
        value = value | (1 << bit) if on else value & ~(1 << bit)
        row[word] = value - (1 << 32) if value >= 1 << 31 else value
    return row


def _detail(e: BaseException) -> str:
    """An xgrammar error's message, without the timestamp and source location it is prefixed with."""
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if "] " in detail and detail.startswith("["):
        detail = detail.split(": ", 1)[-1]
    return detail


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
