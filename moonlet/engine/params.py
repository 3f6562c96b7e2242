"""SamplingParams: how one request is decoded and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy (argmax after penalties). ``top_k=-1`` (or 0) keeps every token;
    ``top_p=1`` and ``min_p=0`` disable those filters. Penalties follow the OpenAI convention
    (presence/frequency subtract from the logits of tokens already generated) and the CTRL/HF one
    for ``repetition_penalty`` (over prompt and output: positive logits divided, negative multiplied).
    ``stop`` strings are matched on the detokenized text, across token boundaries; the returned text
    ends before the stop string. ``stop_token_ids`` end the request after that token (its text is
    not returned); the tokenizer's own stop tokens and the model's EOS ids are added unless
    ``ignore_eos``. ``seed`` gives the request its own random generator, so its samples do not depend
    on what else is batched with it. ``logprobs=n`` returns, per generated token, the log-probability
    of the sampled token and of the n most likely tokens under the model's raw distribution.
    ``thinking_token_budget=n`` (vLLM's name) caps the tokens generated inside ``<think> ... </think>``:
    after n thinking tokens the engine emits the closing marker in place of sampled tokens and the
    answer follows (see ``moonlet.engine.thinking``); the markers default to the tokenizer's
    ``<think>`` / ``</think>``, or ``thinking_start_token_ids`` / ``thinking_end_token_ids``.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = False
    thinking_token_budget: int | None = None
    thinking_start_token_ids: list[int] | None = None
    thinking_end_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        for name in ("thinking_start_token_ids", "thinking_end_token_ids"):
            ids = getattr(self, name)
            if ids is not None and not isinstance(ids, (str, bytes)):
                setattr(self, name, list(ids))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        def bad(name: str, value, rule: str):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "must be -1 or 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 means off)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "must be a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "token ids must be >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", self.logprobs, "must be None or an integer >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "must be None or an integer")
        budget = self.thinking_token_budget
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            bad("thinking_token_budget", budget, "must be None (no cap) or an integer >= 0")
        for name in ("thinking_start_token_ids", "thinking_end_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, list) or not ids
                                    or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids)):
                bad(name, ids, "must be None (the tokenizer's marker) or a non-empty list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
