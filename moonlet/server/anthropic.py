"""The Anthropic Messages API: ``POST /v1/messages`` (also ``?beta=true``) and
``POST /v1/messages/count_tokens``. Request conversion lives in ``anthropic_convert``.

Structured outputs: ``output_config.format`` (``{"type": "json_schema", "schema": {...}}``, the
generally available shape) or the earlier beta's top-level ``output_format`` (same object, sent with
``anthropic-beta: structured-outputs-2025-11-13``) constrain the reply text to the schema, strictly
(only the properties it names); thinking stays free. The JSON comes back as the text block.
Tools with ``strict: true``: every ``tool_use`` block the reply makes names a declared tool and its
input is valid under that tool's ``input_schema`` (see ``generation.tool_constraint``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat import ARGS_BEGIN, CALL_BEGIN, CALL_END
from ..engine.params import SamplingParams, StructuredOutput
from .anthropic_convert import check_thinking_budget, to_conversation
from .errors import APIError, anthropic_stream_error, invalid
from .generation import (Conversation, EngineRun, Prompt, SSEResponse, build_prompt, check_structured, fit_max_tokens,
                         format_beside_tools, json_schema_format, make_sampling, sse_frame, start_run, supports_images,
                         tool_section_stop_ids)
from .reply import ReplyBuilder
from .state import request_id_of, state_of
from .tool_ids import normalize_k2_id, to_anthropic_id

logger = logging.getLogger(__name__)
router = APIRouter()


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(BaseModel):
    """Unknown fields (metadata, cache_control, context_management, ...) are accepted and ignored;
    ``output_config.format`` / ``output_format`` ask for structured output (``output_format_of``)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[InputMessage]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None


def thinking_signature(thinking: str) -> str:
    """An opaque signature for a thinking block (clients echo it back; the server does not check it)."""
    return "moonlet:" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


class AnthropicReply(ReplyBuilder):
    """Turns output-parser events into Anthropic content blocks and the SSE frames that build them.

    ``feed``/``finish`` return frames as (event type, payload); ``content`` is the final block list.
    Whitespace-only text is held until real text follows (it never makes a block on its own).
    Tool calls arrive whole from the parser; one whose arguments are not a JSON object is returned
    as text, as the model wrote it. ``done``: single_call satisfied, the caller stops generating."""

    def __init__(self, single_call: bool = False):
        super().__init__(single_call)
        self.content: list[dict] = []
        self._open: int | None = None
        self._ws = ""
        self.num_tool_uses = 0

    def finish(self) -> list[tuple[str, dict]]:
        self._ws = ""
        return self._close()

    def on_reasoning(self, text: str) -> list:
        return self._delta("thinking", text)

    def on_text(self, text: str) -> list:
        if not text:
            return []
        if not self._is_open("text"):
            if not (self._ws + text).strip():
                self._ws += text
                return []
            text, self._ws = self._ws + text, ""
        return self._delta("text", text)

    def _is_open(self, kind: str) -> bool:
        return self._open is not None and self.content[self._open]["type"] == kind

    def _delta(self, kind: str, text: str) -> list:
        if not text:
            return []
        frames = []
        if not self._is_open(kind):
            frames += self._close()
            if kind == "text":
                block = {"type": "text", "text": ""}
            else:
                block = {"type": "thinking", "thinking": "", "signature": ""}
            frames += self._start(block)
        block = self.content[self._open]
        block[kind] += text
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        frames.append(("content_block_delta", {"type": "content_block_delta", "index": self._open, "delta": delta}))
        return frames

    def _start(self, block: dict) -> list:
        self.content.append(block)
        self._open = len(self.content) - 1
        start = dict(block, input={}) if block["type"] == "tool_use" else dict(block)
        return [("content_block_start", {"type": "content_block_start", "index": self._open, "content_block": start})]

    def _close(self) -> list:
        if self._open is None:
            return []
        frames, index, block = [], self._open, self.content[self._open]
        if block["type"] == "thinking":
            block["signature"] = thinking_signature(block["thinking"])
            frames.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "signature_delta",
                                                             "signature": block["signature"]}}))
        frames.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        self._open = None
        return frames

    def on_tool_call(self, raw_id: str, name: str, args: str) -> list:
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            return self.on_text(f"{CALL_BEGIN}{raw_id}{ARGS_BEGIN}{args}{CALL_END}")
        self._ws = ""
        k2 = normalize_k2_id(raw_id, name, self.num_tool_uses)
        frames = self._close()
        frames += self._start({"type": "tool_use", "id": to_anthropic_id(k2), "name": name, "input": parsed})
        frames.append(("content_block_delta", {"type": "content_block_delta", "index": self._open,
                                               "delta": {"type": "input_json_delta", "partial_json": args}}))
        frames += self._close()
        self.num_tool_uses += 1
        if self.single_call:
            self.done = True
        return frames


def _stop(reply: AnthropicReply, run: EngineRun, stops: list[str], clamped: bool) -> tuple[str, str | None]:
    s = run.stats
    if reply.num_tool_uses:
        return "tool_use", None
    if s.finish_reason == "length":
        return ("model_context_window_exceeded" if clamped else "max_tokens"), None
    if s.finish_reason == "stop" and isinstance(s.stop_reason, str) and s.stop_reason in stops:
        return "stop_sequence", s.stop_reason
    return "end_turn", None


def _usage(run: EngineRun) -> dict:
    s = run.stats
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": s.cached_tokens}


async def _prepare(body: CountTokensRequest, request: Request) -> tuple[Conversation, Prompt]:
    st = state_of(request)
    # in a worker thread: decoding images and reading PDFs can take a while (the event loop serves the
    # other streams meanwhile)
    conv = await asyncio.to_thread(to_conversation, body, vision=supports_images(st.engine))
    # rendering and tokenizing a long conversation takes a while: keep the event loop (other streams) free;
    # images are expanded to their token counts here, so count_tokens and usage include them
    return conv, await build_prompt(st.engine, st.tokenizer, conv)


def output_format_of(body: CountTokensRequest) -> tuple[StructuredOutput | None, str]:
    """(the StructuredOutput of ``output_config.format`` or the beta ``output_format``, its field name)."""
    extra = body.model_extra or {}
    config, beta = extra.get("output_config"), extra.get("output_format")
    fmt, param = None, "output_config.format"
    if config is not None:
        if not isinstance(config, dict):
            raise invalid("output_config must be an object", param="output_config")
        fmt = config.get("format")
    if beta is not None:
        if fmt is not None:
            raise invalid("give output_config.format or output_format, not both", param="output_format")
        fmt, param = beta, "output_format"
    if fmt is None:
        return None, param
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind != "json_schema":
        raise invalid(f"{param}.type must be 'json_schema'; got {kind!r}", param=f"{param}.type")
    return json_schema_format(fmt, param, name_required=False), param


def _sampling(body: MessagesRequest, max_tokens: int, conv: Conversation, tokenizer,
              structured: StructuredOutput | None = None) -> SamplingParams:
    return make_sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p if body.top_p else 1.0,
        top_k=body.top_k if body.top_k else -1,
        stop=list(body.stop_sequences or []),
        stop_token_ids=tool_section_stop_ids(tokenizer) if conv.forbid_tools else [],
        skip_special_tokens=False,
        thinking_token_budget=conv.thinking_budget,
        structured=structured,
    )


def _interleaved_thinking(request: Request) -> bool:
    """Whether the request opts into the interleaved-thinking beta (``anthropic-beta`` header)."""
    betas = ",".join(request.headers.getlist("anthropic-beta"))
    return any(b.strip().startswith("interleaved-thinking") for b in betas.split(","))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    _, prompt = await _prepare(body, request)
    return {"input_tokens": len(prompt.token_ids)}


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request):
    st = state_of(request)
    conv, prompt = await _prepare(body, request)
    check_thinking_budget(conv.thinking_budget, body.max_tokens, _interleaved_thinking(request))
    max_tokens, clamped = fit_max_tokens(len(prompt.token_ids), body.max_tokens, st.max_model_len, "anthropic")
    structured, param = output_format_of(body)
    if structured is not None:
        if conv.output_prefix:
            raise invalid("a forced tool call (tool_choice any or tool) cannot be combined with a structured "
                          "output format; drop one of them", param=param)
        check_structured(structured, f"{param}.schema")
        structured = format_beside_tools(structured, conv)  # with tools to call: JSON text or tool calls
    else:  # strict tools
        structured = conv.tool_constraint
        check_structured(structured, "tools")
    params = _sampling(body, max_tokens, conv, st.tokenizer, structured)
    params.lora = st.lora_for(body.model)  # multi-LoRA: the adapter the model name selects
    rid = request_id_of(request)
    run = EngineRun(st.engine, prompt.engine_input, params, rid, "anthropic", st.metrics)
    first = await start_run(run, request)
    if first is None:
        return Response(status_code=499)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    parser, reply = prompt.parser(), AnthropicReply(single_call=conv.single_call)
    stops = list(body.stop_sequences or [])
    if body.stream:
        return SSEResponse(_stream(run, first, prompt, parser, reply, body.model, message_id, stops, clamped))
    try:
        reply.feed(parser.feed(prompt.output_prefix + first.new_text))
        if not await run.collect(request, lambda out: reply.feed(parser.feed(out.new_text)), lambda: reply.done):
            return Response(status_code=499)
        reply.feed_end(parser)
        reply.finish()
        stop_reason, stop_sequence = _stop(reply, run, stops, clamped)
        return JSONResponse({"id": message_id, "type": "message", "role": "assistant", "model": body.model,
                             "content": reply.content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                             "usage": _usage(run)})
    finally:
        await run.close()


async def _stream(run: EngineRun, first, prompt: Prompt, parser, reply: AnthropicReply, model: str, message_id: str,
                  stops: list[str], clamped: bool):
    def frames(items):
        return "".join(sse_frame(name, data) for name, data in items)

    try:
        start_usage = dict(_usage(run), output_tokens=0)
        yield sse_frame("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
        yield sse_frame("ping", {"type": "ping"})
        chunk = frames(reply.feed(parser.feed(prompt.output_prefix + first.new_text)))
        if chunk:
            yield chunk
        async for out in run.outputs(lambda: reply.done):
            if isinstance(out, APIError):
                yield sse_frame("error", anthropic_stream_error(out.kind, out.message))
                return
            if out is None:
                yield sse_frame("ping", {"type": "ping"})
                continue
            chunk = frames(reply.feed(parser.feed(out.new_text)))
            if chunk:
                yield chunk
        tail = reply.feed_end(parser)
        tail += reply.finish()
        stop_reason, stop_sequence = _stop(reply, run, stops, clamped)
        tail.append(("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": _usage(run)}))
        tail.append(("message_stop", {"type": "message_stop"}))
        yield frames(tail)
    except Exception as e:  # noqa: BLE001 - the status line is sent; the error must travel as an event
        logger.exception("stream %s failed", run.request_id)
        yield sse_frame("error", anthropic_stream_error("api_error", f"internal error while streaming: "
                                                                     f"{type(e).__name__}: {e}"))
    finally:
        await run.close()
