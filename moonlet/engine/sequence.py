"""One request inside the engine (its tokens, cache blocks and text) and the RequestOutput it reports."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .params import SamplingParams
from .thinking import ThinkingBudget

if TYPE_CHECKING:
    import torch

    from .multimodal import RequestImages
    from .processors import LogitProcessors
    from .draft import DraftProgress
    from .spec import NgramIndex
    from .structured import StructuredState


@dataclass
class RequestOutput:
    """A request's state after an engine step.

    ``token_ids``/``text`` are everything generated so far; ``new_token_ids``/``new_text`` what this
    output adds to the previous one (what a stream sends). ``text`` never contains a stop string or
    the text of a stop token; while a stop string could still be completing, its possible beginning is
    held back from ``new_text`` until it is resolved. ``num_cached_tokens``: prompt tokens served from
    the prefix cache. ``finish_reason`` is 'stop' (stop token, EOS or stop string), 'length'
    (max_tokens or the context limit) or 'abort'; ``stop_reason`` is the matched stop string, or the
    token id when one of ``SamplingParams.stop_token_ids`` ended it (None for EOS and other reasons).
    ``logprobs`` (when requested) has one dict per generated token, {token id: log-probability}, the
    top-n in descending order plus the sampled token; ``new_logprobs`` is the part for new_token_ids.
    ``index``: which sample of the request this is (0..n-1 for ``SamplingParams.n``; 0 when n is 1);
    every other field is that sample's own (``num_cached_tokens``: what its own admission hit).
    ``prompt_logprobs`` (``SamplingParams.prompt_logprobs``, once the whole prompt is computed; the
    same for every sample): per prompt token, None for the first, then {token id: log-probability}
    holding the top k in descending order plus the prompt's own token; ``prompt_logprob_ranks`` the
    rank of the prompt's token there (1: the most likely; None for the first).
    """

    request_id: str
    prompt_token_ids: list[int]
    num_cached_tokens: int
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    new_logprobs: list[dict[int, float]] | None = None
    index: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids, cache state and decoding state of one request.

    ``token_ids`` is prompt + generated tokens; ``num_computed_tokens`` of them have their latent in
    the cache (the rest are computed by coming steps). ``block_table`` lists the cache blocks holding
    them in order. ``index``: the sample of its request (``SamplingParams.n``); the n sequences of
    one request share ``request_id``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 stop_ids: frozenset[int], detokenizer=None, index: int = 0):
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival_time = time.monotonic()
        # cache state
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.state_slot: int | None = None  # recurrent-state slot while running (models with KDA layers)
        self.snapshot_restore: int | None = None  # state snapshot row a prefix hit resumes from
        self.snapshot_pending: bytes | None = None  # name of the snapshot this step writes for it
        self.output_snapshot: bytes | None = None  # its latest snapshot past the prompt (replaced by the next)
        # decoding state
        self.stop_ids = stop_ids
        self.generator: torch.Generator | None = None  # made by the sampler, on its device, from params.seed
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.thinking: ThinkingBudget | None = None  # set by the engine when params.thinking_token_budget is set
        self.structured: StructuredState | None = None  # set by the engine when params.structured is set
        self.processors: LogitProcessors | None = None  # set by the engine for logit_bias, min_tokens, ...
        # params.prompt_logprobs: filled as the prompt is computed (the samples of a request share one)
        self.prompt_logprobs: PromptLogprobs | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = PromptLogprobs(params.prompt_logprobs, len(prompt_token_ids))
        self.ngram_index: NgramIndex | None = None  # speculative decoding: made by the proposer on first use
        self.draft_progress: DraftProgress | None = None  # draft-model speculation: what the draft pool holds
        self.mtp_drafts: tuple[int, list[int]] | None = None  # MTP speculation: (num_tokens then, drafts)
        # image requests: each image's prompt positions, digest and patches, and its features while a
        # step needs them (``VisionInputs.provide``)
        self.images: RequestImages | None = None
        # multi-LoRA serving: the adapter's content digest (part of every block hash) and, while running,
        # its resident slot (moonlet.engine.lora)
        self.lora_key: bytes | None = None
        self.lora_slot: int | None = None
        self.lora_wait_steps = 0  # scheduling steps it waited for its adapter to get a resident slot
        self.text = _TextState(detokenizer, params)
        self._reported_tokens = 0
        self._reported_chars = 0

    # ---- token bookkeeping -----------------------------------------------------------------------
    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether this sequence's prompt logprobs are still to be computed (it then takes no prefix
        hits: the positions a hit skips would have none)."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs.complete

    def append_token(self, token_id: int, max_model_len: int, logprobs: dict[int, float] | None = None) -> None:
        """Record a sampled token and decide whether the request is finished."""
        self.token_ids.append(token_id)
        if self.thinking is not None:
            self.thinking.observe(self.token_ids)
        if self.processors is not None and self.processors.error is not None:
            self.abort()  # a logits processor of the request failed (processors.LogitProcessors.error)
            return
        structured = self.structured
        if structured is not None and not structured.accept(self.token_ids):
            # the sampler's mask only lets allowed tokens through; should one slip by, the output
            # can no longer match the constraint, so the request ends here rather than produce it
            self.finish_reason, self.stop_reason = "abort", None
            self.text.finish()
            return
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        params = self.params
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            self.stop_reason = token_id if token_id in params.stop_token_ids else None
            self.text.finish()
            return
        matched = self.text.push(token_id, match=self.num_output_tokens >= params.min_tokens)
        if matched is not None:
            self.finish_reason, self.stop_reason = "stop", matched
            return
        if structured is not None and structured.terminated:  # complete, and no stop token may follow
            self.finish_reason = "stop"
            self.text.finish()
            return
        if self.num_output_tokens >= params.max_tokens or len(self.token_ids) >= max_model_len:
            self.finish_reason = "length"
            self.text.finish()

    def abort(self) -> None:
        self.finish_reason, self.stop_reason = "abort", None
        self.text.finish()

    # ---- outputs --------------------------------------------------------------------------------
    def make_output(self) -> RequestOutput:
        """The request's state, with the deltas since the previous make_output call."""
        out_ids = self.output_token_ids
        text = self.text.visible(final=self.finish_reason is not None)
        new_ids = out_ids[self._reported_tokens:]
        new_text = text[self._reported_chars:]
        new_lp = self.logprobs[self._reported_tokens:] if self.logprobs is not None else None
        self._reported_tokens, self._reported_chars = len(out_ids), len(text)
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            num_cached_tokens=max(self.num_cached_tokens, 0), token_ids=out_ids, new_token_ids=new_ids,
            text=text, new_text=new_text, finished=self.finish_reason is not None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None, new_logprobs=new_lp,
            index=self.index, **self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> dict:
        plp = self.prompt_logprobs
        if plp is None or not plp.complete:
            return {}
        return {"prompt_logprobs": plp.logprobs, "prompt_logprob_ranks": plp.ranks}


class _TextState:
    """Incremental detokenization (``moonlet.tokenizer.IncrementalDetokenizer`` or anything with its
    push/flush) with stop strings matched across token boundaries."""

    def __init__(self, detokenizer, params: SamplingParams):
        self.detok = detokenizer
        self.stops = params.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.done = False

    def push(self, token_id: int, match: bool = True) -> str | None:
        """Add a token's text; return the stop string that now ends the text, if any (the text is cut
        before it). ``match=False`` (before ``min_tokens``): stop strings are not looked for."""
        if self.detok is None:
            return None
        before = len(self.text)
        self.text += self.detok.push(token_id)
        if not match or not self.stops or len(self.text) == before:
            return None
        # only a match that uses the new text is new; it can start up to max_stop-1 chars earlier
        start = max(0, before - self.max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        self.done = True
        return best[1]

    def finish(self) -> None:
        if not self.done and self.detok is not None:
            self.text += self.detok.flush()
        self.done = True

    def visible(self, final: bool) -> str:
        """Text safe to show: while running, hold back a tail that could be the start of a stop string."""
        if final or self.done or not self.stops:
            return self.text
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold] if hold else self.text


class PromptLogprobs:
    """A request's prompt log-probabilities (``SamplingParams.prompt_logprobs=k``), filled as its
    prompt chunks are computed: ``logprobs[j]`` / ``ranks[j]`` for prompt token j (None for j = 0).
    The samples of an ``n > 1`` request share one: whichever computes a position first records it."""

    def __init__(self, k: int, num_prompt_tokens: int):
        self.k = k
        self.total = num_prompt_tokens
        self.logprobs: list[dict[int, float] | None] = [None]
        self.ranks: list[int | None] = [None]

    @property
    def complete(self) -> bool:
        return len(self.logprobs) >= self.total

    def add(self, first: int, targets: list[int], token_lps: list[float], ranks: list[int],
            top_values: list[list[float]], top_ids: list[list[int]]) -> None:
        """Record prompt tokens ``first``, ``first + 1`` ... (``targets``): each one's log-probability,
        rank and the top-k values and ids of its position. Positions already recorded are skipped
        (a recompute after preemption, or another sample in the same step)."""
        assert first <= len(self.logprobs), "prompt logprobs must be recorded in order"
        for j in range(len(self.logprobs) - first, len(targets)):
            token = targets[j]
            d = dict(zip(top_ids[j], top_values[j]))
            if token not in d:
                d[token] = token_lps[j]
            self.logprobs.append(d)
            self.ranks.append(ranks[j])
