"""The OpenAI API: ``POST /v1/chat/completions`` (text completions are in ``openai_completions``).

Chat messages map onto K2's format directly (it is OpenAI-shaped); tool-call ids are K2's own
``functions.NAME:IDX`` (other ids get K2 ids in conversation order). ``tool_choice`` and
``parallel_tool_calls`` steer as in the Anthropic API (see ``generation.apply_tool_choice``).
Thinking: ``chat_template_kwargs`` reach the template (``{"thinking": false}``);
``reasoning_effort`` "none" switches thinking off, any other value on. Reasoning comes back as
``reasoning_content``. vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos,
continue_final_message, thinking_token_budget) are accepted; ``thinking_token_budget`` (also on
``/v1/completions``) caps the reasoning tokens: after that many, ``</think>`` is forced and the
answer follows.

Structured outputs: ``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}`` (also on ``/v1/completions``), or vLLM's
``structured_outputs`` (``json`` / ``json_object`` / ``regex`` / ``choice``), constrain the reply
(see ``moonlet.engine.structured``); with thinking on, the reasoning stays free and the content is
constrained. A reply cut by max_tokens ends with finish_reason "length" and holds incomplete JSON.
Tools with ``function.strict: true``: every tool call the reply makes names a declared function and
its arguments are valid JSON under that function's ``parameters`` (the other tools' arguments: any
JSON object); text and reasoning stay free (see ``generation.tool_constraint``).

vLLM's extras for scoring and steering (also on ``/v1/completions``): ``prompt_logprobs`` (the
response's ``prompt_logprobs``: None, then per prompt token {token id: {logprob, rank,
decoded_token}}; not when streaming), ``min_tokens``, ``bad_words``, ``allowed_token_ids`` and
``priority`` (an engine started with ``--scheduling-policy priority``; others refuse a nonzero one);
OpenAI's ``logit_bias`` ({token id: -100..100}). See ``moonlet.engine.processors``.

``n`` (1..``MAX_N``, also on ``/v1/completions``): one engine request with n samples
(``SamplingParams.n``; the prompt is computed once, choice i uses seed + i); each choice has its own
message, tool calls, reasoning, logprobs and finish_reason; a stream interleaves the choices' chunks,
each carrying its index, and ends each choice with its own finish chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine.params import SamplingParams, StructuredOutput
from .documents import file_input
from .errors import APIError, invalid, openai_stream_error
from .generation import (Conversation, EngineRun, SSEResponse, apply_tool_choice, build_prompt, check_structured,
                         fit_max_tokens, format_beside_tools, make_sampling, openai_response_format, sse_frame, start_run, supports_images,
                         tool_section_stop_ids, vllm_structured_outputs)
from .images import Images, join_content
from .reply import ReplyBuilder
from .state import request_id_of, state_of
from .tool_ids import ToolIdMap, normalize_k2_id, openai_decode

logger = logging.getLogger(__name__)
router = APIRouter()


MAX_N = 128  # the most choices (``n``) one request may ask for


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None  # choices per request (parallel sampling), 1..MAX_N
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = Field(None, ge=1)
    thinking_token_budget: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's extra
    logit_bias: dict[str, float] | None = None  # {token id (as a string): bias in [-100, 100]}
    # vLLM's extras: logit processors, prompt logprobs, the request's priority (lower is earlier)
    min_tokens: int | None = Field(None, ge=0)
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    priority: int | None = None


def structured_of(body: SamplingFields):
    """(the request's StructuredOutput or None, the field that asked for it)."""
    fmt = openai_response_format(body.response_format)
    extra = vllm_structured_outputs(body.structured_outputs)
    if fmt is not None and extra is not None:
        raise invalid("give response_format or structured_outputs, not both", param="structured_outputs")
    if extra is not None:
        return extra, "structured_outputs"
    if fmt is not None and fmt.kind == "json_schema":
        return fmt, "response_format.json_schema.schema"
    return fmt, "response_format"


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False


def sampling_params(body: SamplingFields, max_tokens: int, stop_ids: list[int], logprobs: int | None,
                    engine=None, tools: StructuredOutput | None = None,
                    prompt_logprobs: int | None = None, conv: Conversation | None = None) -> SamplingParams:
    """The request's SamplingParams. A structured-output constraint is tagged with its field and
    compiled when the engine gets the request (off the event loop; a schema it cannot use is a 400
    naming the field). ``tools``: the strict-tool constraint (``Conversation.tool_constraint``),
    used when the request asks for no response format; ``conv``: with a JSON format and tools the
    reply may call, the format and the tools combine (``format_beside_tools``). ``engine`` is unused (kept for callers). ``prompt_logprobs``:
    the top tokens per prompt position the reply needs (default the body's ``prompt_logprobs``)."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise invalid(f"n={n} is out of range: it is the number of choices to generate, an integer from 1 to "
                      f"{MAX_N}", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    structured, param = structured_of(body)
    if structured is None and tools is not None:
        structured, param = tools, "tools"
    check_structured(structured, param)
    if conv is not None and param != "tools":  # a format beside callable tools: JSON or tool calls
        structured = format_beside_tools(structured, conv)
    return make_sampling(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 1.0, top_k=body.top_k if body.top_k and body.top_k > 0 else -1,
        min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
        stop=stop, stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, seed=body.seed, logprobs=logprobs,
        skip_special_tokens=False, thinking_token_budget=body.thinking_token_budget, structured=structured, n=n,
        prompt_logprobs=body.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        logit_bias=body.logit_bias, min_tokens=body.min_tokens or 0, bad_words=body.bad_words,
        allowed_token_ids=body.allowed_token_ids, priority=body.priority or 0)


def top_items(d: dict[int, float], k: int, token: int) -> list[tuple[int, float]]:
    """The first ``k`` entries of an engine logprobs dict (its top tokens, in descending order) and
    ``token``'s, if it is not among them."""
    items = list(d.items())[:k]
    if all(t != token for t, _ in items) and token in d:
        items.append((token, d[token]))
    return items


def vllm_prompt_logprobs(tokenizer, prompt_ids: list[int], out, k: int) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` of a response: None for the first prompt token, then per token
    {token id: {"logprob", "rank", "decoded_token"}} for its top ``k`` and the token itself (rank: 1
    is the most likely)."""
    result: list[dict | None] = []
    for j, (token, d) in enumerate(zip(prompt_ids, out.prompt_logprobs or ())):
        if d is None:
            result.append(None)
            continue
        entry = {}
        for rank, (t, lp) in enumerate(top_items(d, k, token), start=1):
            rank = out.prompt_logprob_ranks[j] if t == token else rank
            entry[str(t)] = {"logprob": max(float(lp), -9999.0), "rank": rank, "decoded_token": tokenizer.decode([t])}
        result.append(entry)
    return result


def _text_content(content, where: str, images: Images | None = None, files=None) -> str | None:
    """A message's content as text. ``images`` (user messages only): ``image_url`` parts become the image
    placeholder at their place and their images are collected there; elsewhere an image is a 400.
    ``file`` parts (user messages only) are PDFs read by ``documents.file_input`` (``files``: the server's
    FileStore, for ``file_id``)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        w = f"{where}.content.{j}"
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(("text", part["text"]))
        elif kind == "image_url" and images is not None:
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            parts.append(("image", images.add_url(url, f"{w}.image_url.url" if isinstance(image_url, dict)
                                                   else f"{w}.image_url", part=w)))
        elif kind == "image_url" and images is None:
            raise invalid(f"{w} is an image_url part; only user messages may hold images", param=w)
        elif kind == "file" and images is not None:
            spec = part.get("file")
            if not isinstance(spec, dict):
                raise invalid(f"{w}.file must be an object ({{'file_data': 'data:application/pdf;base64,...', "
                              f"'filename'}} or {{'file_id'}})", param=f"{w}.file")
            parts.append(("text", file_input(spec, f"{w}.file", w, images, files)))
        elif kind == "file":
            raise invalid(f"{w} is a file part; only user messages may hold files", param=w)
        elif kind in ("input_audio", "image"):
            raise invalid(f"{w} is an {kind} part, but this server reads text (and, on models with vision, "
                          f"image_url parts); send text", param=w)
        else:
            raise invalid(f"{w} must be a text part ({{'type': 'text', 'text': ...}})", param=w)
    return join_content(parts, "\n")


def _convert_tools(tools) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise invalid(f"tools.{i} must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}",
                          param=f"tools.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"tools.{i}.function.name must be a non-empty string", param=f"tools.{i}.function.name")
        decl = {"name": name}
        if isinstance(fn.get("description"), str):
            decl["description"] = fn["description"]
        decl["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        out[name] = {"type": "function", "function": decl}
    return out


def to_conversation(body: ChatRequest, vision: bool = False, files=None) -> Conversation:
    """The K2 chat input of a chat request; ``vision``: the model takes images (else an image is a 400);
    ``files``: the server's FileStore, which ``file`` parts with a ``file_id`` read from."""
    tools = _convert_tools(body.tools)
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    forced = None
    if isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if forced not in tools:
            raise invalid(f"tool_choice names function {forced!r}, which is not among the tools "
                          f"({', '.join(tools) or 'none'})", param="tool_choice")
        kind = "tool"
    elif choice in ("auto", "none", "required"):
        kind = {"required": "any"}.get(choice, choice)
        if kind == "any" and not tools:
            raise invalid("tool_choice 'required' needs at least one tool", param="tool_choice")
    else:
        raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", param="tool_choice")

    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None and "thinking" not in kwargs:
        kwargs["thinking"] = body.reasoning_effort != "none"

    ids, messages = ToolIdMap(decode=openai_decode), []
    images = Images(vision)
    for i, m in enumerate(body.messages):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer", "user"):
            messages.append({"role": "user" if role == "user" else "system",
                             "content": _text_content(m.get("content"), where,
                                                      images if role == "user" else None, files) or ""})
        elif role == "assistant":
            out = {"role": "assistant", "content": _text_content(m.get("content"), where) or ""}
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(reasoning, str):
                out["reasoning_content"] = reasoning
            tool_calls = m.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise invalid(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            calls = []
            for j, call in enumerate(tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                args = fn.get("arguments", "{}") if isinstance(fn, dict) else None
                if isinstance(args, dict):
                    args = json.dumps(args, ensure_ascii=False)
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, str):
                    raise invalid(f"{where}.tool_calls.{j} must be {{'id', 'type': 'function', 'function': "
                                  f"{{'name': str, 'arguments': JSON string}}}}", param=f"{where}.tool_calls.{j}")
                call_id = call.get("id")
                calls.append({"id": ids.add_call(call_id if isinstance(call_id, str) else "", fn["name"]),
                              "type": "function", "function": {"name": fn["name"], "arguments": args or "{}"}})
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.tool_call_id must be the id of an earlier tool call",
                              param=f"{where}.tool_call_id")
            k2 = ids.result_id(call_id)
            out = {"role": "tool", "tool_call_id": k2, "content": _text_content(m.get("content"), where) or ""}
            name = m.get("name") if isinstance(m.get("name"), str) else ids.name_of(k2)
            if name:
                out["name"] = name
            messages.append(out)
        else:
            raise invalid(f"{where}.role must be system, developer, user, assistant or tool; got {role!r}",
                          param=f"{where}.role")
    prefill = ""
    if body.continue_final_message:
        if not messages or messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
            raise invalid("continue_final_message needs a final assistant message without tool calls",
                          param="continue_final_message")
        prefill = messages.pop()["content"]
    conv = Conversation(messages=messages, tools=list(tools.values()), template_kwargs=kwargs, prefill=prefill,
                        images=images.images)
    strict = [t["function"]["name"] for t in body.tools or []
              if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("strict") is True]
    apply_tool_choice(conv, kind, forced, ids.count, body.parallel_tool_calls is False, strict)
    return conv


def openai_usage(run: EngineRun) -> dict:
    s = run.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.output_tokens,
            "total_tokens": s.prompt_tokens + s.output_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def finish_reason(run: EngineRun, tool_calls: int = 0, index: int = 0) -> str:
    """OpenAI's finish_reason for choice ``index`` of a finished run that made ``tool_calls`` calls."""
    if tool_calls:
        return "tool_calls"
    return "length" if run.stats.finish_reasons.get(index) == "length" else "stop"


class _Logprobs:
    """OpenAI logprob entries from the engine's per-token {token id: logprob} dicts."""

    def __init__(self, tokenizer, top_n: int):
        self.tokenizer, self.top_n = tokenizer, top_n

    def _entry(self, token_id: int, lp: float) -> dict:
        data = self.tokenizer.decode_bytes([token_id]) if hasattr(self.tokenizer, "decode_bytes") else b""
        return {"token": self.tokenizer.decode([token_id]), "logprob": max(float(lp), -9999.0),
                "bytes": list(data)}

    def chat(self, token_ids, dicts) -> list[dict]:
        out = []
        for t, d in zip(token_ids, dicts or []):
            entry = self._entry(t, d.get(t, float("-inf")))
            entry["top_logprobs"] = [self._entry(k, v) for k, v in list(d.items())[:self.top_n]]
            out.append(entry)
        return out


class _ChatReply(ReplyBuilder):
    """Parser events -> chat deltas and the final message. Tool calls stream as they are written
    (the name first, then argument deltas)."""

    def __init__(self, single_call: bool):
        super().__init__(single_call)
        self.content, self.reasoning, self.tool_calls = "", None, []
        self._pending: dict[int, dict] = {}

    def on_text(self, text: str) -> list[dict]:
        if not text:
            return []
        self.content += text
        return [{"content": text}]

    def on_reasoning(self, text: str) -> list[dict]:
        if not text:
            return []
        self.reasoning = (self.reasoning or "") + text
        return [{"reasoning_content": text}]

    def on_call_start(self, index: int, raw_id: str, name: str) -> list[dict]:
        position = len(self.tool_calls)
        call = {"id": normalize_k2_id(raw_id, name, position), "type": "function",
                "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        self._pending[index] = call
        return [{"tool_calls": [{"index": position, "id": call["id"], "type": "function",
                                 "function": {"name": name, "arguments": ""}}]}]

    def on_call_args(self, index: int, text: str) -> list[dict]:
        call = self._pending[index]
        call["function"]["arguments"] += text
        return [{"tool_calls": [{"index": self.tool_calls.index(call), "function": {"arguments": text}}]}]

    def on_call_end(self, index: int) -> list[dict]:
        self._pending.pop(index, None)
        if self.single_call:
            self.done = True
        return []

    def message(self) -> dict:
        msg = {"role": "assistant", "content": self.content if (self.content or not self.tool_calls) else None}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class _ChatChoice:
    """One choice of a chat completion: its output parser, reply, logprob entries, whether it has ended."""

    def __init__(self, index: int, prompt, single_call: bool):
        self.index, self.parser, self.reply = index, prompt.parser(), _ChatReply(single_call)
        self.entries: list[dict] = []
        self.ended = False


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    st = state_of(request)
    # in a worker thread: decoding images and reading PDFs can take a while
    conv = await asyncio.to_thread(to_conversation, body, vision=supports_images(st.engine),
                                   files=getattr(request.app.state, "files", None))
    prompt = await build_prompt(st.engine, st.tokenizer, conv)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens, _ = fit_max_tokens(len(prompt.token_ids), requested, st.max_model_len, "openai")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    stop_ids = tool_section_stop_ids(st.tokenizer) if conv.forbid_tools else []
    if conv.output_prefix and ((body.response_format or {}).get("type", "text") != "text" or body.structured_outputs):
        raise invalid("a forced tool call (tool_choice 'required' or a named function) cannot be combined with "
                      "a structured response_format; drop one of them", param="response_format")
    if body.prompt_logprobs is not None and body.stream:
        raise invalid("prompt_logprobs is not available when streaming (as in vLLM); send stream: false",
                      param="prompt_logprobs")
    params = sampling_params(body, max_tokens, stop_ids, top_n, tools=conv.tool_constraint, conv=conv)
    params.lora = st.lora_for(body.model)  # multi-LoRA: the adapter the model name selects
    run = EngineRun(st.engine, prompt.engine_input, params, request_id_of(request), "openai", st.metrics)
    first = await start_run(run, request)
    if first is None:
        return Response(status_code=499)
    choices = [_ChatChoice(i, prompt, conv.single_call) for i in range(params.n)]
    lp = _Logprobs(st.tokenizer, top_n or 0) if top_n is not None else None
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return SSEResponse(_chat_stream(run, first, prompt, choices, lp, body.model, cid, created, usage))
    try:
        stopping: list[int] = []
        scored = [first]  # an output carrying the prompt's logprobs (every sample's do, once complete)

        def take(out) -> None:
            if out.prompt_logprobs is not None:
                scored[0] = out
            c = choices[out.index]
            if c.reply.done:  # a single call already ended this choice; the rest is not part of it
                return
            if lp is not None:
                c.entries.extend(lp.chat(out.new_token_ids, out.new_logprobs))
            c.reply.feed(c.parser.feed(out.new_text))
            if c.reply.done and not out.finished:
                stopping.append(c.index)  # its sample need not run on (stopped below, off this callback)

        async def take_and_stop(out) -> None:
            take(out)
            while stopping:
                await run.stop_sample(stopping.pop())

        for c in choices:
            c.reply.feed(c.parser.feed(prompt.output_prefix))
        take(first)
        if not await run.collect(request, take_and_stop, lambda: all(c.reply.done for c in choices)):
            return Response(status_code=499)
        out_choices = []
        for c in choices:
            c.reply.feed_end(c.parser)
            out_choices.append({"index": c.index, "message": c.reply.message(),
                                "logprobs": {"content": c.entries} if lp else None,
                                "finish_reason": finish_reason(run, len(c.reply.tool_calls), c.index)})
        data = {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": out_choices, "usage": openai_usage(run)}
        if body.prompt_logprobs is not None:
            data["prompt_logprobs"] = vllm_prompt_logprobs(st.tokenizer, prompt.token_ids, scored[0],
                                                           body.prompt_logprobs)
        return JSONResponse(data)
    finally:
        await run.close()


async def _chat_stream(run: EngineRun, first, prompt, choices: list[_ChatChoice], lp, model: str, cid: str,
                       created: int, include_usage: bool):
    """The chunks of all choices, interleaved as their outputs arrive, each carrying its choice's index;
    each choice ends with its own finish_reason chunk, then comes the usage chunk (include_usage)."""
    def chunk(index: int | None, delta: dict | None = None, finish=None, logprobs=None, usage=False) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if index is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                                      "finish_reason": finish}]}
        if include_usage:
            data["usage"] = openai_usage(run) if usage else None
        return sse_frame(None, data)

    def end(c: _ChatChoice) -> str:
        c.ended = True
        tail = "".join(chunk(c.index, d) for d in c.reply.feed_end(c.parser))
        return tail + chunk(c.index, {}, finish=finish_reason(run, len(c.reply.tool_calls), c.index))

    def emit(out) -> str:
        c = choices[out.index]
        if c.ended:
            return ""
        entries = lp.chat(out.new_token_ids, out.new_logprobs) if lp is not None else None
        deltas = c.reply.feed(c.parser.feed(out.new_text))
        if entries and not deltas:
            deltas = [{"content": ""}]
        text = "".join(chunk(c.index, d, logprobs={"content": entries} if entries and i == 0 else None)
                       for i, d in enumerate(deltas))
        if out.finished or c.reply.done:
            text += end(c)
        return text

    try:
        text = ""
        for c in choices:
            text += chunk(c.index, {"role": "assistant", "content": ""})
            text += "".join(chunk(c.index, d) for d in c.reply.feed(c.parser.feed(prompt.output_prefix)))
        yield text + emit(first)
        async for out in run.outputs(lambda: all(c.ended for c in choices)):
            if isinstance(out, APIError):
                yield sse_frame(None, openai_stream_error(out.kind, out.message))
                yield sse_frame(None, "[DONE]")
                return
            if out is None:
                yield ": keep-alive\n\n"
                continue
            text = emit(out)
            if text:
                yield text
            if choices[out.index].ended and not out.finished:  # a single call ended it: stop its sample
                await run.stop_sample(out.index)
        tail = "".join(end(c) for c in choices if not c.ended)
        if include_usage:
            tail += chunk(None, usage=True)
        yield tail + sse_frame(None, "[DONE]")
    except Exception as e:  # noqa: BLE001 - the status line is sent; the error must travel in the stream
        logger.exception("stream %s failed", run.request_id)
        yield sse_frame(None, openai_stream_error("api_error", f"internal error while streaming: {type(e).__name__}"))
        yield sse_frame(None, "[DONE]")
    finally:
        await run.close()
