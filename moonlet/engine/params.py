"""SamplingParams: how one request is decoded and when it stops."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

TOOL_STARTS = ("text", "section", "arguments")
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class StructuredOutput:
    """A constraint on what a request may generate (structured outputs / guided decoding).

    Exactly one of: ``json_schema`` (a JSON Schema, as a dict or its JSON text: the output is one
    JSON value valid under it), ``json_object=True`` (any JSON object, OpenAI's JSON mode), ``regex``
    (the output matches the regular expression in full), ``choice`` (the output is one of these
    strings), ``grammar`` (an EBNF / GBNF context-free grammar whose ``root`` rule the output
    matches in full, as llama.cpp and vLLM take it) or ``tools`` (strict tool calls, below). ``strict`` (json_schema and tools): objects may
    hold only the properties the schema names and arrays only the items it describes (the default,
    as OpenAI's ``strict: true``); False follows the schema's own ``additionalProperties`` /
    ``items``. ``any_whitespace=False`` (json_schema and json_object; tool arguments are always
    compact) allows no whitespace beyond the single spaces of ``", "`` and ``": "`` — vLLM's
    ``disable_any_whitespace``, for small models that otherwise spend their tokens on blank space.

    ``structural_tag`` (vLLM's and xgrammar's): a structural tag, as a dict or its JSON text — either
    ``{"type": "structural_tag", "format": {...}}`` (xgrammar's format elements: const strings, JSON
    schemas, regexes, grammars, sequences, ors, triggered tags...) or vLLM's earlier form
    ``{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}``
    (free text in which each trigger opens one of the structures whose ``begin`` it starts, whose body
    is JSON under ``schema``). Over the text vocabulary: ``token`` elements naming special tokens are
    not supported.

    ``tools``: the output is a K2 reply whose tool calls are valid — each call names one of these
    tools (``{"name": str, "parameters": JSON Schema or None}``; None: any JSON object) and its
    arguments are compact JSON valid under that tool's schema (``strict`` as above). Where the output
    begins, ``tool_start``: ``"text"`` (free text — thinking, content — then optionally one tool-call
    section), ``"section"`` (the prompt ends with the section opener: one or more calls, then the
    section's end) or ``"arguments"`` (the prompt ends inside ``tools[0]``'s call, after its
    argument marker: its arguments, the call's end, any further calls, the section's end — what a
    server's forced call prefills). ``parallel_tool_calls=False``: at most one call.

``content`` (only with ``tools`` and ``tool_start="text"``): a response format and tools in one request
— a ``json_schema`` or ``json_object`` constraint. The reply's content is then either one JSON value
under it or a tool-call section (no text before the section); a thinking section the prompt leaves
open stays free, as for a plain JSON constraint.

    ``param`` (not part of the constraint's identity): the request field the constraint came from,
    carried by a compile error (``StructuredOutputError.param``) so a server can name it.

    The engine compiles the constraint into a grammar (``moonlet.engine.structured``, which needs the
    optional ``xgrammar`` package: ``pip install 'moonlet[structured]'``) and masks, at every step,
    the tokens the grammar does not allow; end-of-sequence is allowed only where the grammar can end.
    """

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    tools: list[dict] | None = None
    structural_tag: dict | str | None = None
    strict: bool = True
    any_whitespace: bool = True
    tool_start: str = "text"
    parallel_tool_calls: bool = True
    content: "StructuredOutput | None" = None
    param: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        if isinstance(self.tools, tuple):
            self.tools = list(self.tools)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming what is wrong (the schema's contents are checked when it compiles)."""
        given = [name for name, on in (("json_schema", self.json_schema is not None), ("json_object", self.json_object),
                                       ("regex", self.regex is not None), ("choice", self.choice is not None),
                                       ("grammar", self.grammar is not None), ("tools", self.tools is not None),
                                       ("structural_tag", self.structural_tag is not None))
                 if on]
        if len(given) != 1:
            raise ValueError(f"StructuredOutput needs exactly one of json_schema, json_object, regex, choice, grammar, "
                             f"tools, structural_tag; got {', '.join(given) or 'none'}")
        if self.structural_tag is not None:
            self._validate_structural_tag()
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"StructuredOutput.json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"StructuredOutput.json_schema must be a JSON Schema object; got "
                                 f"{type(schema).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"StructuredOutput.regex={self.regex!r} must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"StructuredOutput.grammar={self.grammar!r} must be a non-empty EBNF text with a root rule")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError(f"StructuredOutput.choice={self.choice!r} must be a non-empty list of non-empty strings")
        if self.tools is not None:
            self._validate_tools()
        elif self.content is not None:
            raise ValueError("StructuredOutput.content is the response format beside tools; it needs tools")
        for name in ("json_object", "strict", "any_whitespace", "parallel_tool_calls"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StructuredOutput.{name}={getattr(self, name)!r} must be a bool")

    def _validate_structural_tag(self) -> None:
        tag = self.structural_tag
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except ValueError as e:
                raise ValueError(f"StructuredOutput.structural_tag is not valid JSON: {e}") from None
        if not isinstance(tag, dict) or tag.get("type") != "structural_tag" or \
                not (isinstance(tag.get("format"), dict) or isinstance(tag.get("structures"), list)):
            raise ValueError("StructuredOutput.structural_tag must be {'type': 'structural_tag', 'format': {...}} or "
                             "{'type': 'structural_tag', 'structures': [{'begin', 'schema', 'end'}], 'triggers': "
                             "[...]}")
        self.structural_tag = tag

    def _validate_tools(self) -> None:
        if not isinstance(self.tools, list) or not self.tools:
            raise ValueError(f"StructuredOutput.tools={self.tools!r} must be a non-empty list of "
                             f"{{'name', 'parameters'}} tools")
        names = set()
        for i, tool in enumerate(self.tools):
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str) or not name or any(c.isspace() for c in name) or ":" in name:
                raise ValueError(f"StructuredOutput.tools[{i}].name={name!r} must be a non-empty string without "
                                 f"whitespace or ':' (K2 writes calls as functions.NAME:INDEX)")
            if name in names:
                raise ValueError(f"StructuredOutput.tools[{i}].name={name!r} is used twice; tool names must be unique")
            names.add(name)
            schema = tool.get("parameters")
            if schema is not None and not isinstance(schema, (dict, bool)):
                raise ValueError(f"StructuredOutput.tools[{i}].parameters must be a JSON Schema object or None; "
                                 f"got {type(schema).__name__}")
        if self.tool_start not in TOOL_STARTS:
            raise ValueError(f"StructuredOutput.tool_start={self.tool_start!r} must be one of {', '.join(TOOL_STARTS)}")
        if self.content is not None:
            if not isinstance(self.content, StructuredOutput) or self.content.kind not in ("json_schema", "json_object"):
                raise ValueError("StructuredOutput.content must be a json_schema or json_object StructuredOutput (the "
                                 "response format beside the tools)")
            if self.tool_start != "text":
                raise ValueError(f"StructuredOutput.content needs tool_start='text' (a reply that may answer with the "
                                 f"format instead of calling a tool); got tool_start={self.tool_start!r}")

    @property
    def kind(self) -> str:
        """'json_schema', 'json_object', 'regex', 'choice', 'grammar', 'tools' or 'structural_tag'."""
        if self.json_schema is not None:
            return "json_schema"
        if self.json_object:
            return "json_object"
        if self.tools is not None:
            return "tools"
        if self.structural_tag is not None:
            return "structural_tag"
        if self.grammar is not None:
            return "grammar"
        return "regex" if self.regex is not None else "choice"

    @property
    def key(self) -> tuple:
        """A hashable identity of the constraint (what the compiled-grammar cache is keyed by)."""
        kind = self.kind
        if kind == "json_schema":
            schema = self.json_schema
            text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
            return (kind, text, self.strict, self.any_whitespace)
        if kind == "json_object":
            return (kind, self.any_whitespace)
        if kind == "tools":
            return (kind, json.dumps(self.tools, ensure_ascii=False, sort_keys=True), self.tool_start,
                    self.parallel_tool_calls, self.strict, None if self.content is None else self.content.key)
        if kind == "grammar":
            return (kind, self.grammar)
        if kind == "structural_tag":
            return (kind, json.dumps(self.structural_tag, ensure_ascii=False, sort_keys=True))
        return (kind, self.regex) if kind == "regex" else (kind, tuple(self.choice))


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
    ``prompt_logprobs=k`` (vLLM's name): per prompt token after the first, the raw log-probability of
    that token given the ones before it and of the k most likely tokens there (``RequestOutput.
    prompt_logprobs``); such a request computes its whole prompt (no prefix-cache hits until its prompt
    logprobs are complete), though its blocks are cached for others. ``max_tokens=0`` computes the
    prompt only (its logprobs, or to warm the prefix cache) and generates nothing.

    Logit processors (OpenAI's and vLLM's names; ``moonlet.engine.processors``), applied per row on
    the raw logits before the penalties: ``logit_bias`` {token id: bias in [-100, 100]} added to the logits (greedy too);
    ``min_tokens=n``: the stop tokens (EOS, ``stop_token_ids``) are masked and stop strings ignored
    until n tokens were generated; ``bad_words``: strings whose token sequences may not be generated
    (the last token of a word is masked where the output ends with the rest of it); and
    ``allowed_token_ids``: only these may be sampled. ``logits_processors`` (Python API only): callables
    ``fn(output_token_ids: list[int], logits: Tensor[vocab]) -> Tensor[vocab]``, run in order after those
    edits on each row of the request (the float32 row, which they may edit in place); one that raises
    or returns anything but a tensor of the row's shape ends the request with finish_reason "abort"
    (logged), the others go on. ``logprobs`` stay the raw model distribution.
    ``priority`` (vLLM's convention, lower is earlier): with ``EngineConfig.scheduling_policy=
    "priority"`` the order of admission and the reverse order of preemption; the FCFS engine takes
    only 0.
    ``thinking_token_budget=n`` (vLLM's name) caps the tokens generated inside ``<think> ... </think>``:
    after n thinking tokens the engine emits the closing marker in place of sampled tokens and the
    answer follows (see ``moonlet.engine.thinking``); the markers default to the tokenizer's
    ``<think>`` / ``</think>``, or ``thinking_start_token_ids`` / ``thinking_end_token_ids``.
    ``lora``: the name of a LoRA adapter registered with the engine (``add_lora``, multi-LoRA serving,
    ``moonlet.engine.lora``) that this request runs under; None: the base model.
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
    structured: StructuredOutput | None = None
    n: int = 1
    lora: str | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    priority: int = 0
    logits_processors: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured, dict):
            self.structured = StructuredOutput(**self.structured)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        for name in ("thinking_start_token_ids", "thinking_end_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is not None and not isinstance(ids, (str, bytes)):
                setattr(self, name, list(ids))
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        if isinstance(self.logit_bias, dict):  # JSON keys are strings: {"42": 5} means token 42
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.logit_bias={self.logit_bias!r} is invalid: keys must be token "
                                 f"ids (integers)") from None
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        def bad(name: str, value, rule: str):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {rule}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad("max_tokens", self.max_tokens, "must be an integer >= 0 (0: compute the prompt, generate nothing)")
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
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            bad("n", self.n, "must be an integer >= 1 (the number of samples)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1)):
            bad("seed", self.seed, f"must be None or an integer in [{SEED_MIN}, {SEED_MAX}]"
                + (f" minus n - 1 = {self.n - 1} (sample i uses seed + i)" if self.n > 1 else ""))
        budget = self.thinking_token_budget
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            bad("thinking_token_budget", budget, "must be None (no cap) or an integer >= 0")
        for name in ("thinking_start_token_ids", "thinking_end_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, list) or not ids
                                    or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids)):
                bad(name, ids, "must be None (the tokenizer's marker) or a non-empty list of token ids >= 0")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            bad("lora", self.lora, "must be None (the base model) or the name of a registered LoRA adapter")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            bad("structured", self.structured, "must be None or a StructuredOutput")
        self._validate_processors(bad)

    def _validate_processors(self, bad) -> None:
        """prompt_logprobs, the logit processors and priority (token ids against the vocabulary are
        checked by the engine, ``EngineCore.check_request``)."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            bad("prompt_logprobs", self.prompt_logprobs, "must be None or an integer >= 0 (top tokens per position)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", self.logit_bias, "must be None or a dict {token id: bias}")
            for token, bias in self.logit_bias.items():
                if token < 0:
                    bad("logit_bias", self.logit_bias, f"token id {token} must be >= 0")
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                    bad("logit_bias", self.logit_bias, f"the bias of token {token} ({bias!r}) must be a number in "
                        f"[-100, 100]")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            bad("bad_words", self.bad_words, "must be a list of non-blank strings")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids or any(not is_int(t) or t < 0 for t in self.allowed_token_ids)):
            bad("allowed_token_ids", self.allowed_token_ids, "must be None or a non-empty list of token ids >= 0")
        if self.structured is not None and self.min_tokens:
            bad("min_tokens", self.min_tokens, "cannot be combined with structured outputs (the grammar decides "
                "where the output may end); drop one of them")
        if self.structured is not None and self.allowed_token_ids is not None:
            bad("allowed_token_ids", self.allowed_token_ids, "cannot be combined with structured outputs (the "
                "grammar decides which tokens may come); drop one of them")
        if self.logits_processors is not None and (not isinstance(self.logits_processors, (list, tuple))
                                                   or any(not callable(f) for f in self.logits_processors)):
            bad("logits_processors", self.logits_processors, "must be None or a list of callables "
                "fn(output_token_ids, logits) -> logits")
        if not is_int(self.priority):
            bad("priority", self.priority, "must be an integer (lower values are scheduled first)")

    def sample_params(self, index: int) -> "SamplingParams":
        """The parameters of sample ``index`` of an ``n > 1`` request: these, with seed + index when a
        seed is set (the same object when it is not, or for sample 0)."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=self.seed + index)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_processors(self) -> bool:
        """Whether the row needs ``moonlet.engine.processors`` (logit bias, min_tokens, bad words,
        allowed tokens)."""
        return bool(self.logit_bias) or self.min_tokens > 0 or bool(self.bad_words) or \
            self.allowed_token_ids is not None or bool(self.logits_processors)

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
