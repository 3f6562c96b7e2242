"""What the APIs share: rendering a prompt, fitting max_tokens into the context, building sampling
parameters, and running one engine request (errors surface before the response starts; outputs
arrive through a queue so a stream can send pings while it waits; an unfinished request is aborted
when the client goes).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse

from ..chat import ARGS_BEGIN, CALL_BEGIN, SECTION_BEGIN, StreamingOutputParser
from ..engine.errors import EngineDeadError, EngineOverloadedError, PromptTooLongError
from ..engine.params import SamplingParams, StructuredOutput
from .errors import APIError, invalid
from .tool_ids import k2_id

logger = logging.getLogger(__name__)

_END = object()
PING_INTERVAL = 5.0  # seconds of silence before a stream sends a keep-alive


class ClientDisconnected(Exception):
    """The client went away before the response started."""


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that always closes its body generator, so the generator's
    ``finally`` (which aborts the engine request) runs even when the send fails mid-stream."""

    media_type = "text/event-stream"

    def __init__(self, content, **kwargs):
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **(kwargs.pop("headers", None) or {})}
        super().__init__(content, headers=headers, **kwargs)

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def disconnect_checker(request, interval: float = 0.5):
    """An async callable telling whether the client has gone, asking the server at most every
    ``interval`` seconds (a non-streaming handler calls it between engine outputs)."""
    last = time.monotonic()

    async def gone() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < interval:
            return False
        last = now
        return await request.is_disconnected()

    return gone


def sse_frame(event: str | None, data) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


@dataclass
class Conversation:
    """A request turned into K2 chat input: OpenAI-style messages and tool declarations, template
    switches, and how the reply is steered."""

    messages: list[dict]
    tools: list[dict] | None
    template_kwargs: dict = field(default_factory=dict)
    prefill: str = ""  # a final assistant turn's text: the reply continues it (not returned)
    output_prefix: str = ""  # a forced tool-call opener: part of the reply
    forbid_tools: bool = False  # generation stops at a tool-section opener
    single_call: bool = False  # keep the first tool call and end the reply there
    thinking_budget: int | None = None  # cap on thinking tokens (SamplingParams.thinking_token_budget)
    images: list = field(default_factory=list)  # decoded images, in the order of their placeholders
    tool_constraint: StructuredOutput | None = None  # strict tools: the calls the reply may make
    strict_tools: frozenset = frozenset()  # the names of the tools marked strict


def apply_tool_choice(conv: Conversation, kind: str, forced_name: str | None, call_index: int,
                      single_call: bool, strict: Collection[str] = ()) -> None:
    """Steer the reply for a tool choice: ``auto`` (as is), ``none`` (no tools declared; stop at a
    tool-section opener; also what a request that declares no tools gets, so a reply never calls a
    tool the client did not offer), ``any`` (the reply opens K2's tool section, so it must be a call), ``tool``
    (the reply opens the named call up to its arguments; ``call_index`` numbers its K2 id).
    Forced calls switch thinking off (as Anthropic does for forced tool use).

    ``strict``: the names of the tools marked strict. When there are any, ``conv.tool_constraint``
    constrains the reply's tool calls (``tool_constraint``)."""
    if conv.prefill:
        conv.template_kwargs["thinking"] = False  # the prefill is answer text, not reasoning
    if kind == "none" or not conv.tools:  # no tool may be called: none is declared, or the choice says so
        conv.tools, conv.forbid_tools = None, True
        return
    if kind in ("any", "tool"):
        conv.template_kwargs["thinking"] = False
        conv.output_prefix = SECTION_BEGIN
        if kind == "tool":
            conv.output_prefix += CALL_BEGIN + k2_id(forced_name, call_index) + ARGS_BEGIN
    conv.single_call = single_call
    conv.strict_tools = frozenset(strict)
    if strict and conv.tools:
        conv.tool_constraint = tool_constraint(conv.tools, set(strict), kind, forced_name, single_call)


def tool_constraint(tools: list[dict], strict: set[str], kind: str, forced_name: str | None,
                    single_call: bool) -> StructuredOutput:
    """The constraint for a reply that may call ``tools`` (K2 declarations, ``{"type": "function",
    "function": {"name", "parameters"}}``), some of them strict: every call names a declared tool
    (only ``forced_name`` for a named choice) and its arguments are JSON — valid under the tool's
    schema for a strict tool, any object for the others. Where the output starts follows the prefill
    of ``apply_tool_choice``: free text (``auto``), inside the opened section (``any``), inside the
    named call's arguments (``tool``). ``single_call``: at most one call."""
    decls = [t["function"] for t in tools]
    if kind == "tool":
        decls = [d for d in decls if d["name"] == forced_name]
    spec_tools = [{"name": d["name"], "parameters": d.get("parameters") if d["name"] in strict else None}
                  for d in decls]
    start = {"any": "section", "tool": "arguments"}.get(kind, "text")
    try:
        return StructuredOutput(tools=spec_tools, tool_start=start, parallel_tool_calls=not single_call,
                                param="tools")
    except ValueError as e:
        raise invalid(f"cannot constrain the tool calls: {str(e).replace('StructuredOutput.', '')}",
                      param="tools") from None


def format_beside_tools(structured: StructuredOutput | None, conv: Conversation) -> StructuredOutput | None:
    """A response format (``structured``, already checked) in a request whose reply may also call
    tools (``tool_choice`` auto with tools declared): the reply is then either JSON under the format or
    a tool-call section whose calls are constrained as ``tool_constraint`` makes them (strict tools'
    arguments under their schemas, the others any object) — what OpenAI and Anthropic do when a request
    has both. Other constraints (a regex, a choice, a grammar) and requests with no tool to call keep
    ``structured`` as it is: the tool-call markers are then not allowed."""
    if structured is None or structured.kind not in ("json_schema", "json_object") or not conv.tools \
            or conv.forbid_tools or conv.output_prefix:
        return structured
    tools = tool_constraint(conv.tools, set(conv.strict_tools), "auto", None, conv.single_call)
    tools.content = structured
    tools.param = structured.param  # a schema the library refuses is the format's; a tool's names the tool
    return tools


@dataclass
class Prompt:
    """A rendered prompt. ``output_prefix`` is text placed after the generation prompt that belongs to
    the reply (a forced tool-call opener): the output parser reads it before the generated text."""

    token_ids: list[int]
    text: str
    thinking: bool  # the prompt leaves the model inside <think>
    output_prefix: str = ""
    multimodal: object = None  # a moonlet.engine.MultimodalPrompt when the request has images

    @property
    def engine_input(self):
        """What the engine gets: the MultimodalPrompt for an image request, else the token ids."""
        return self.multimodal if self.multimodal is not None else self.token_ids

    def parser(self) -> StreamingOutputParser:
        return StreamingOutputParser(thinking=self.thinking)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None, template_kwargs: dict,
                  prefill: str = "", output_prefix: str = "") -> Prompt:
    """Render OpenAI-style ``messages`` (+ ``tools``) with the checkpoint's chat template and encode it.

    ``prefill`` (a final assistant turn's text) continues the reply and is not returned to the
    client; ``output_prefix`` is appended after it and is part of the reply."""
    if not messages:
        raise invalid("messages must hold at least one message", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                             tokenize=False, **template_kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise invalid(f"cannot render these messages with the model's chat template: {e}", param="messages") from e
    except Exception as e:  # jinja's TemplateError (raise_exception in a template) and friends
        raise invalid(f"the chat template rejected these messages: {e}", param="messages") from e
    thinking = text.endswith("<think>")
    text += prefill
    if prefill and thinking and "</think>" in prefill:
        thinking = False
    full = text + output_prefix
    ids = tokenizer.encode(full, allow_special=True)
    return Prompt(token_ids=ids, text=full, thinking=thinking, output_prefix=output_prefix)


async def build_prompt(engine, tokenizer, conv: Conversation) -> Prompt:
    """Render ``conv`` (in a worker thread: a long conversation takes a while) and, when it has images,
    let the engine preprocess them and expand their placeholders: ``token_ids`` is then the prompt the
    model runs, image tokens included (what usage and count_tokens report)."""
    prompt = await asyncio.to_thread(render_prompt, tokenizer, conv.messages, conv.tools, conv.template_kwargs,
                                     conv.prefill, conv.output_prefix)
    if conv.images:
        try:
            mm = await asyncio.to_thread(engine.prepare_prompt, prompt.token_ids, conv.images)
        except ValueError as e:
            raise invalid(f"cannot place the images in the prompt: {e}", param="messages") from None
        prompt.token_ids, prompt.multimodal = mm.token_ids, mm
    return prompt


def supports_images(engine) -> bool:
    """Whether the engine takes images (an engine without the attribute does not)."""
    return bool(getattr(engine, "supports_images", False))


def fit_max_tokens(prompt_len: int, requested: int | None, max_model_len: int, api: str) -> tuple[int, bool]:
    """(max_tokens, clamped): the request's max_tokens cut to what the context leaves.

    A prompt that leaves no room for even one token is a 400 that states both numbers."""
    room = max_model_len - prompt_len
    if room < 1:
        if api == "openai":
            raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, your "
                          f"messages resulted in {prompt_len} tokens. Please reduce the length of the messages.",
                          param="messages", code="context_length_exceeded")
        raise invalid(f"prompt is too long: {prompt_len} tokens > {max_model_len - 1} maximum (the context "
                      f"window is {max_model_len} tokens and the reply needs at least one); shorten the "
                      f"conversation")
    if requested is None:
        return room, True
    if requested > room:
        return room, True
    return requested, False


def make_sampling(**fields) -> SamplingParams:
    """``SamplingParams(**fields)``; a value it rejects is a 400 with its message."""
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        field_name = re.match(r"SamplingParams\.(\w+)=", str(e))
        raise invalid(str(e).replace("SamplingParams.", ""), param=field_name.group(1) if field_name else None) from e


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def json_schema_format(fmt: dict, param: str, name_required: bool = True) -> StructuredOutput:
    """A ``StructuredOutput`` for a json_schema format object holding ``schema`` (required), ``name``
    (OpenAI's rule: 1-64 letters, digits, ``_`` or ``-``) and ``strict``; a 400 naming the field at
    ``param`` for a bad one. ``strict`` true (or absent where ``name_required`` is False: Anthropic's
    formats are always strict) allows only the properties the schema names. The API formats decode
    compact JSON (no whitespace beyond ``", "`` and ``": "``): a model cannot then spend its tokens
    on blank space, a known failure of whitespace-tolerant JSON grammars."""
    name = fmt.get("name")
    if name is not None or name_required:
        if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
            raise invalid(f"{param}.name must be 1-64 characters of letters, digits, '_' or '-'; got {name!r}",
                          param=f"{param}.name")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise invalid(f"{param}.schema must be a JSON Schema object; got "
                      f"{'nothing' if schema is None else type(schema).__name__}", param=f"{param}.schema")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{param}.strict must be true or false", param=f"{param}.strict")
    return StructuredOutput(json_schema=schema, strict=bool(strict) if name_required else strict is not False,
                            any_whitespace=False)


def openai_response_format(value, param: str = "response_format") -> StructuredOutput | None:
    """Chat / completions ``response_format``: ``{"type": "text"}`` (None), ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` or vLLM's
    ``{"type": "structural_tag", ...}`` (``StructuredOutput.structural_tag``)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True, any_whitespace=False)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise invalid(f"{param}.json_schema must be an object {{'name', 'schema', 'strict'}}",
                          param=f"{param}.json_schema")
        return json_schema_format(inner, f"{param}.json_schema")
    if kind == "structural_tag":  # vLLM's: the format itself is the tag (structures + triggers, or format)
        return _structural_tag(value, param)
    raise invalid(f"{param}.type must be 'text', 'json_object', 'json_schema' or 'structural_tag'; got {kind!r}",
                  param=f"{param}.type")


def _structural_tag(value, param: str) -> StructuredOutput:
    try:
        return StructuredOutput(structural_tag=value)
    except (ValueError, TypeError) as e:
        raise invalid(f"{param}: {e}".replace("StructuredOutput.structural_tag", "the structural tag"),
                      param=param) from None


def vllm_structured_outputs(value, param: str = "structured_outputs") -> StructuredOutput | None:
    """vLLM's ``structured_outputs`` extra: exactly one of ``json`` (a schema), ``json_object``,
    ``regex``, ``choice``, ``grammar`` (EBNF / GBNF with a ``root`` rule), ``structural_tag`` (its JSON
    text or object); ``disable_any_whitespace`` as in vLLM."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object with one of json, json_object, regex, choice, grammar", param=param)
    unknown = sorted(set(value) - {"json", "json_object", "regex", "choice", "grammar", "structural_tag",
                                   "disable_any_whitespace"})
    if unknown:
        raise invalid(f"{param}.{unknown[0]} is not supported; use json, json_object, regex, choice, grammar or "
                      f"structural_tag", param=f"{param}.{unknown[0]}")
    if value.get("structural_tag") is not None:
        others = [k for k in ("json", "regex", "choice", "grammar") if value.get(k) is not None]
        if others or value.get("json_object"):
            raise invalid(f"{param}: give exactly one of json, json_object, regex, choice, grammar, structural_tag",
                          param=param)
        return _structural_tag(value["structural_tag"], f"{param}.structural_tag")
    schema = value.get("json")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise invalid(f"{param}.json is not valid JSON: {e}", param=f"{param}.json") from None
    try:
        return StructuredOutput(json_schema=schema, json_object=bool(value.get("json_object")),
                                regex=value.get("regex"), choice=value.get("choice"), grammar=value.get("grammar"),
                                any_whitespace=not value.get("disable_any_whitespace", False))
    except (ValueError, TypeError) as e:
        raise invalid(f"{param}: {e}".replace("StructuredOutput.", ""), param=param) from None


def check_structured(spec: StructuredOutput | None, param: str) -> None:
    """Tag ``spec`` with the request field it came from and check that the grammar library is there
    (a 400 naming ``param`` and the extra to install when not). The grammar is compiled by the engine
    when the request is submitted — ``AsyncLLM.generate`` does it in a worker thread, never on the
    event loop — and a schema it cannot compile comes back from ``EngineRun.start`` as a 400 naming
    ``spec.param`` (``map_engine_error``)."""
    if spec is None:
        return
    spec.param = param
    from ..engine.structured import load_xgrammar

    try:
        load_xgrammar()
    except ValueError as e:
        raise invalid(str(e), param=param) from None


def map_engine_error(e: BaseException, api: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        return fit_error(e.prompt_len, e.max_model_len, api)
    if isinstance(e, EngineOverloadedError):
        return APIError("overloaded", f"Overloaded: {e}", retry_after=1)
    if isinstance(e, EngineDeadError):
        return APIError("overloaded", f"the engine is not running ({e}); the server is shutting down or failed")
    if isinstance(e, ValueError):  # a StructuredOutputError names its request field
        return invalid(str(e), param=getattr(e, "param", None))
    logger.error("engine request failed", exc_info=(type(e), e, e.__traceback__))
    return APIError("api_error", f"internal error while generating: {type(e).__name__}: {e}")


def fit_error(prompt_len: int, max_model_len: int, api: str) -> APIError:
    try:
        fit_max_tokens(prompt_len, 1, max_model_len, api)
    except APIError as e:
        return e
    return invalid(f"the prompt ({prompt_len} tokens) does not fit the context of {max_model_len} tokens")


@dataclass
class RunStats:
    """A run's usage and how it ended. With ``n > 1`` samples: ``output_tokens`` is their sum,
    ``cached_tokens``, ``finish_reason`` and ``stop_reason`` are sample 0's, ``finish_reasons`` has
    each finished sample's (by index)."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)
    output_tokens_by_index: dict[int, int] = field(default_factory=dict)


class EngineRun:
    """One engine request. ``start()`` returns the first output (raising APIError for a prompt that
    cannot fit, a full queue, ...); then ``next(timeout)`` returns outputs, None when ``timeout``
    passes without one, and raises StopAsyncIteration after the last. ``close()`` aborts the request
    if it is still going and records metrics; call it in a ``finally``. With ``params.n > 1`` the
    outputs of the n samples come interleaved (``RequestOutput.index``) and the run is finished when
    all of them are; ``close()`` aborts every sample."""

    def __init__(self, engine, prompt_ids, params, request_id: str, api: str, metrics=None):
        # prompt_ids: token ids, or a MultimodalPrompt (``Prompt.engine_input``) for an image request
        self.engine, self.prompt_ids, self.params, self.request_id = engine, prompt_ids, params, request_id
        self.api, self.metrics = api, metrics
        self.stats = RunStats(prompt_tokens=len(getattr(prompt_ids, "token_ids", prompt_ids)))
        self.n = getattr(params, "n", 1)
        self._running = set(range(self.n))  # samples not finished yet
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.finished = False
        self._closed = False

    async def _produce(self) -> None:
        try:
            stream = self.engine.generate(self.prompt_ids, self.params, self.request_id)
            if inspect.isawaitable(stream):
                stream = await stream
            async for out in stream:
                self._queue.put_nowait(out)
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which maps it to an API error
            self._queue.put_nowait(e)

    async def start(self, disconnected=None):
        """Submit and wait for the first output. ``disconnected`` (an async callable) is polled
        meanwhile so a client that leaves during a long prefill frees its request."""
        self._task = asyncio.get_running_loop().create_task(self._produce())
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    await self.close()
                    raise ClientDisconnected(self.request_id)
        return self._take(item)

    async def next(self, timeout: float | None = None):
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout=timeout)
        except asyncio.TimeoutError:
            return None
        return self._take(item)

    async def outputs(self, done=None, timeout: float = PING_INTERVAL):
        """The outputs after the first, while the run is unfinished and ``done()`` (the reply needs no
        more) is false: each output; None after ``timeout`` seconds without one (time for a
        keep-alive); an engine failure as its APIError, last."""
        while not self.finished and not (done is not None and done()):
            try:
                out = await self.next(timeout=timeout)
            except StopAsyncIteration:
                return
            except APIError as e:
                yield e
                return
            yield out

    async def collect(self, request, on_output, done=None) -> bool:
        """For a non-streamed reply: hand the outputs after the first to ``on_output`` (see
        ``outputs``; it may be a coroutine function), checking for a disconnect between them. False
        when the client has gone (the handler answers 499; its ``finally`` closes the run); an engine
        failure is raised."""
        gone = disconnect_checker(request)
        async for out in self.outputs(done, timeout=1.0):
            if isinstance(out, APIError):
                raise out
            if await gone():
                return False
            if out is not None:
                result = on_output(out)
                if inspect.isawaitable(result):
                    await result
        return True

    def _take(self, item):
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise map_engine_error(item, self.api)
        now, s = time.monotonic(), self.stats
        n = len(item.new_token_ids)
        if n and self.metrics is not None:
            if s.first_token is None:
                self.metrics.observe_first_token(now - s.arrival)
                if n > 1:
                    self.metrics.observe_tokens(0.0, n - 1)
            else:
                self.metrics.observe_tokens(now - s.last_token, n)
        if n:
            s.first_token = s.first_token or now
            s.last_token = now
        index = getattr(item, "index", 0)
        if index == 0:
            s.cached_tokens = item.num_cached_tokens or 0
        s.output_tokens_by_index[index] = len(item.token_ids)
        s.output_tokens = sum(s.output_tokens_by_index.values())
        if item.finished:
            s.finish_reasons[index] = item.finish_reason
            if index == 0:
                s.finish_reason, s.stop_reason = item.finish_reason, item.stop_reason
            self._running.discard(index)
            self.finished = not self._running
        return item

    async def stop_sample(self, index: int) -> None:
        """Stop sample ``index`` of an ``n > 1`` run whose reply needs no more of it (a single tool call
        made), so the engine stops computing it; the others go on. No-op when it is finished or the
        engine cannot stop one sample."""
        if self.n > 1 and index in self._running and hasattr(self.engine, "abort_sample"):
            await self.engine.abort_sample(self.request_id, index)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.stats.finish_reason = "abort"
            # Shielded: this runs while the response task is being cancelled (client gone).
            with anyio.CancelScope(shield=True):
                if self._task is not None:
                    self._task.cancel()
                    try:
                        await self._task
                    except BaseException:
                        pass
                try:
                    await self.engine.abort(self.request_id)
                except Exception:
                    logger.exception("aborting request %s failed", self.request_id)
        if self.metrics is not None:
            s = self.stats
            self.metrics.observe_finished(self.api, s.finish_reason, s.prompt_tokens, s.cached_tokens,
                                          s.output_tokens, time.monotonic() - s.arrival)


async def start_run(run: EngineRun, request):
    """``run.start`` for a handler: the first output, or None when the client left while it waited
    (the handler answers 499). On a failure the run is closed and the error raised."""
    try:
        return await run.start(request.is_disconnected)
    except ClientDisconnected:
        return None
    except BaseException:
        await run.close()
        raise


def tool_section_stop_ids(tokenizer) -> list[int]:
    """The id of K2's tool-section opener, to stop generation at when no tools may be called."""
    try:
        return [tokenizer.token_id(SECTION_BEGIN)]
    except (KeyError, ValueError):
        return []
