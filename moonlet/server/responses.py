"""The OpenAI Responses API: ``POST /v1/responses``, and ``GET`` / ``DELETE /v1/responses/{id}`` for
responses kept in the server's in-memory store.

A request's ``input`` (a string, or a list of items) becomes the same K2 chat conversation the chat
completions route builds: ``message`` items (user / system / developer / assistant, text parts) are
messages; ``reasoning`` items become the next assistant turn's ``reasoning_content`` (the template
keeps or drops it, as it does for chat); consecutive assistant ``message`` and ``function_call``
items make one assistant turn with tool calls; ``function_call_output`` items are tool results.
``instructions`` is a system message in front. Tool-call ids (``call_id``) are K2's own
``functions.NAME:IDX``; other ids get K2 ids in conversation order (``ToolIdMap``).

The reply is split by the same ``StreamingOutputParser`` as the other routes and comes back as
output items: ``reasoning`` (the model's thinking as ``reasoning_text`` content; there is no
summarizer, so ``summary`` is empty), ``message`` (one ``output_text`` part) and ``function_call``.
Streaming sends the documented events (``response.created`` ... ``response.completed``) with
``sequence_number``; both paths are built from one event list, so a stream's deltas add up to the
non-streamed output exactly.

Finished responses are stored (unless ``store: false``) in a bounded in-memory LRU store, so
``previous_response_id`` continues a conversation: the stored chain's input and output items come
before the new input (the earlier ``instructions`` are not carried over, as in OpenAI's API).

Structured output: ``text.format`` ``{"type": "json_schema", "name", "schema", "strict"}`` or
``{"type": "json_object"}`` constrains the message text (reasoning stays free; see
``moonlet.engine.structured``); the response echoes the format.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat import THINK_END
from ..engine.params import SamplingParams, StructuredOutput
from ..engine.structured import structured_available
from .documents import file_input
from .errors import APIError, invalid, openai_stream_error
from .generation import (Conversation, EngineRun, Prompt, SSEResponse, apply_tool_choice, build_prompt,
                         check_structured, fit_max_tokens, format_beside_tools, json_schema_format, make_sampling,
                         sse_frame, start_run, supports_images, tool_section_stop_ids)
from .images import Images, join_content
from .reply import ReplyBuilder
from .state import request_id_of, state_of
from .tool_ids import ToolIdMap, normalize_k2_id, openai_decode

logger = logging.getLogger(__name__)
router = APIRouter()

MAX_STORED_RESPONSES = 1024
MAX_STORED_BYTES = 256 * 2**20  # JSON size of the stored responses and their items, all together
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
_NOT_TEXT = ("input_image", "input_file", "input_audio", "image_url", "image")


class ResponsesRequest(BaseModel):
    """The create-response body. Unknown fields (``include``, ``service_tier``, ``prompt_cache_key``,
    ``stream_options``, ...) are accepted and ignored; fields whose meaning this server cannot honour
    (structured output, background mode, automatic truncation) are a 400 (see ``_check_supported``)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    thinking_token_budget: int | None = Field(None, ge=0)  # moonlet's (and vLLM's) cap on reasoning tokens


# ---- the in-memory store ------------------------------------------------------------------------
@dataclass
class _Stored:
    response: dict
    items: list[dict]  # this response's own input items, then its output items
    previous: str | None
    size: int


class ResponseStore:
    """Finished responses by id, least recently used first out, bounded by count and by (JSON) size.

    Each entry holds only its own items and a link to its previous response, so a long chain costs
    memory linear in its length; continuing a chain marks all of it as recently used."""

    def __init__(self, max_responses: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, items: list[dict], previous: str | None) -> None:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(items, ensure_ascii=False))
        if size > self.max_bytes:
            logger.warning("response %s (%d bytes) is larger than the whole store; not stored", response["id"], size)
            return
        self.delete(response["id"])
        self._entries[response["id"]] = _Stored(response, items, previous, size)
        self._bytes += size
        while len(self._entries) > self.max_responses or self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.size

    def get(self, response_id: str) -> dict | None:
        entry = self._entries.get(response_id)
        return None if entry is None else entry.response

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry is not None

    def conversation(self, response_id: str) -> list[dict]:
        """The items of the chain ending at ``response_id`` (oldest first); a 400 when it, or a
        response it continues, is not (or no longer) stored."""
        chain, rid = [], response_id
        while rid is not None:
            entry = self._entries.get(rid)
            if entry is None:
                which = "it" if rid == response_id else f"the earlier response {rid!r} it continues"
                raise invalid(f"previous_response_id {response_id!r}: {which} is not in this server's response "
                              f"store (responses are kept in memory, {self.max_responses} at most, and are lost "
                              f"on restart or when sent with store=false); send the whole conversation as input "
                              f"instead", param="previous_response_id")
            chain.append(rid)
            rid = entry.previous
            if len(chain) > len(self._entries):
                raise invalid(f"previous_response_id {response_id!r} refers to a cyclic chain",
                              param="previous_response_id")
        items: list[dict] = []
        for rid in reversed(chain):
            self._entries.move_to_end(rid)
            items += self._entries[rid].items
        return items


def store_of(request: Request) -> ResponseStore:
    state = request.app.state
    store = getattr(state, "responses_store", None)
    if store is None:
        store = state.responses_store = ResponseStore()
    return store


# ---- request -> conversation ----------------------------------------------------------------------
def _check_supported(body: ResponsesRequest) -> None:
    if body.background:
        raise invalid("background mode is not supported; this server answers in the request (stream=true "
                      "to receive output as it is generated)", param="background")
    if body.truncation == "auto":
        raise invalid("truncation 'auto' is not supported: the server never drops input items; shorten the "
                      "input or send truncation 'disabled'", param="truncation")
    extra = body.model_extra or {}
    for name in ("prompt", "conversation"):
        if extra.get(name) is not None:
            raise invalid(f"{name!r} (a stored prompt or conversation object) is not supported; send the input "
                          f"items (or previous_response_id) instead", param=name)
    if body.reasoning is not None:
        effort = body.reasoning.get("effort")
        if effort is not None and not isinstance(effort, str):
            raise invalid("reasoning.effort must be a string ('none' switches thinking off; 'minimal', 'low', "
                          "'medium', 'high' keep it on)", param="reasoning.effort")


def text_format(body: ResponsesRequest) -> tuple[StructuredOutput | None, dict]:
    """``text.format`` as (its StructuredOutput or None for plain text, the format to echo)."""
    text = body.text if body.text is not None else {}
    if not isinstance(text, dict):
        raise invalid("text must be an object {'format': {...}}", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None, {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return StructuredOutput(json_object=True, any_whitespace=False), {"type": "json_object"}
    if kind == "json_schema":
        spec = json_schema_format(fmt, "text.format")
        echo = {"type": "json_schema", "name": fmt["name"], "schema": fmt["schema"], "strict": spec.strict}
        if isinstance(fmt.get("description"), str):
            echo["description"] = fmt["description"]
        return spec, echo
    raise invalid(f"text.format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}",
                  param="text.format.type")


def _image_file(file_id, where: str, images: Images, files) -> str:
    """An ``input_image`` given by ``file_id``: the image uploaded to /v1/files -> its placeholder."""
    if not isinstance(file_id, str) or not file_id:
        raise invalid(f"{where} must be the id of a file uploaded to /v1/files", param=where)
    if files is None:
        raise invalid(f"{where}: this server has no file store; send the image inline as image_url "
                      "'data:image/png;base64,...'", param=where)
    try:
        data = files.content(file_id)
    except APIError:
        raise invalid(f"{where}: no file {file_id!r} on this server; upload it first (POST /v1/files)",
                      param=where) from None
    return images.add_file(data, where)


def _text(content, where: str, images: Images | None = None, files=None) -> str:
    """The text of a message's (or tool output's) content: a string, or a list of text parts.
    ``images`` (user messages only): ``input_image`` parts with a data URL become the image placeholder
    at their place and their images are collected there; ``input_file`` parts are PDFs read by
    ``documents.file_input`` (``files``: the server's FileStore, for ``file_id``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is not None and isinstance(part.get(key), str):
            texts.append(("text", part[key]))
        elif kind == "input_image" and images is not None:
            if images.vision and part.get("file_id") is not None and part.get("image_url") is None:
                texts.append(("image", _image_file(part["file_id"], f"{where}.{j}.file_id", images, files)))
                continue
            texts.append(("image", images.add_url(part.get("image_url"), f"{where}.{j}.image_url", part=f"{where}.{j}")))
        elif kind == "input_image":
            raise invalid(f"{where}.{j} is an input_image part; only user messages may hold images",
                          param=f"{where}.{j}")
        elif kind == "input_file" and images is not None:
            texts.append(("text", file_input(part, f"{where}.{j}", f"{where}.{j}", images, files)))
        elif kind == "input_file":
            raise invalid(f"{where}.{j} is an input_file part; only user messages may hold files",
                          param=f"{where}.{j}")
        elif kind in _NOT_TEXT:
            raise invalid(f"{where}.{j} is an {kind} part, but this server reads text (and, on models with "
                          f"vision, input_image parts); send input_text parts", param=f"{where}.{j}")
        else:
            raise invalid(f"{where}.{j} must be a text part ({{'type': 'input_text', 'text': ...}}, or "
                          f"'output_text' in assistant messages)", param=f"{where}.{j}")
    return join_content(texts, "\n")


def input_items(value) -> list[dict]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def _convert_tools(tools) -> tuple[dict[str, dict], list[dict]]:
    """Function tools -> (K2 declarations by name, the tools as the response echoes them)."""
    declared: dict[str, dict] = {}
    echo: list[dict] = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            if isinstance(kind, str):
                raise invalid(f"tools.{i} has type {kind!r}; this server runs no built-in tools and takes only "
                              f"function tools ({{'type': 'function', 'name', 'parameters'}})",
                              param=f"tools.{i}.type")
            raise invalid(f"tools.{i} must be {{'type': 'function', 'name': ..., 'parameters': {{...}}}}",
                          param=f"tools.{i}")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            hint = " (the Responses API puts name and parameters on the tool itself, not under 'function')" \
                if isinstance(tool.get("function"), dict) else ""
            raise invalid(f"tools.{i}.name must be a non-empty string{hint}", param=f"tools.{i}.name")
        params = tool.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise invalid(f"tools.{i}.parameters must be a JSON schema object", param=f"tools.{i}.parameters")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"tools.{i}.description must be a string", param=f"tools.{i}.description")
        decl = {"name": name}
        if description:
            decl["description"] = description
        decl["parameters"] = params
        declared[name] = {"type": "function", "function": decl}
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"tools.{i}.strict must be true or false", param=f"tools.{i}.strict")
        echo.append({"type": "function", "name": name, "description": description, "parameters": params,
                     "strict": strict is not False})
    return declared, echo


def _tool_choice(choice, tools: dict) -> tuple[str, str | None, Any]:
    """(kind for apply_tool_choice, forced tool name, the choice as the response echoes it)."""
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = choice.get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...} "
                          "(built-in tools and allowed_tools are not supported)", param="tool_choice")
        if name not in tools:
            raise invalid(f"tool_choice names function {name!r}, which is not among the tools "
                          f"({', '.join(tools) or 'none'})", param="tool_choice")
        return "tool", name, {"type": "function", "name": name}
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise invalid("tool_choice 'required' needs at least one tool", param="tool_choice")
        return {"required": "any"}.get(choice, choice), None, choice
    raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                  param="tool_choice")


class _Turns:
    """Builds chat messages from items: an assistant turn stays open (reasoning, text and tool
    calls merge into it) until a non-assistant message or a tool result comes."""

    def __init__(self, vision: bool = False, files=None):
        self.messages: list[dict] = []
        self.ids = ToolIdMap(decode=openai_decode)
        self.images = Images(vision)  # the user messages' images, in order
        self.files = files  # the server's FileStore (input_file parts with a file_id), or None

    def _assistant(self, fresh_if) -> dict:
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant" or fresh_if(last):
            last = {"role": "assistant", "content": ""}
            self.messages.append(last)
        return last

    def add(self, item, where: str) -> None:
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an input item object (a message, function_call, function_call_output "
                          f"or reasoning item)", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{where}.role must be user, system, developer or assistant; got {role!r}",
                              param=f"{where}.role")
            text = _text(item.get("content"), f"{where}.content", self.images if role == "user" else None,
                         self.files)
            if role != "assistant":
                self.messages.append({"role": "user" if role == "user" else "system", "content": text})
                return
            turn = self._assistant(lambda m: bool(m.get("tool_calls")))
            turn["content"] = turn["content"] + "\n" + text if turn["content"] else text
        elif kind == "reasoning":
            content, summary = item.get("content") or [], item.get("summary") or []
            if not isinstance(content, list) or not isinstance(summary, list):
                raise invalid(f"{where}: a reasoning item's summary and content must be lists of text parts",
                              param=where)
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if not any(isinstance(t, str) and t for t in texts):
                texts = [p.get("text") for p in summary if isinstance(p, dict)]
            text = "\n".join(t for t in texts if isinstance(t, str) and t)
            if text:
                turn = self._assistant(lambda m: bool(m["content"] or m.get("tool_calls")))
                turn["reasoning_content"] = (turn.get("reasoning_content") or "") + text
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if isinstance(args, dict):
                args = json.dumps(args, ensure_ascii=False)
            if not isinstance(name, str) or not name or not isinstance(args, str) or not isinstance(call_id, str):
                raise invalid(f"{where} must be {{'type': 'function_call', 'call_id': str, 'name': str, "
                              f"'arguments': JSON string}}", param=where)
            turn = self._assistant(lambda m: False)
            turn.setdefault("tool_calls", []).append({"id": self.ids.add_call(call_id, name), "type": "function",
                                                      "function": {"name": name, "arguments": args or "{}"}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.call_id must be the call_id of an earlier function_call",
                              param=f"{where}.call_id")
            k2 = self.ids.result_id(call_id)
            message = {"role": "tool", "tool_call_id": k2, "content": _text(item.get("output"), f"{where}.output")}
            name = self.ids.name_of(k2)
            if name:
                message["name"] = name
            self.messages.append(message)
        elif kind == "item_reference":
            raise invalid(f"{where}: item_reference is not supported; send the item itself, or continue a stored "
                          f"response with previous_response_id", param=f"{where}.type")
        else:
            raise invalid(f"{where}.type {kind!r} is not supported; this server takes message, function_call, "
                          f"function_call_output and reasoning items", param=f"{where}.type")


def to_conversation(body: ResponsesRequest, history: list[dict], items: list[dict],
                    vision: bool = False, files=None) -> tuple[Conversation, dict]:
    """The K2 conversation for a request (``history``: a stored chain's items, ``items``: the new
    input), and the parameters the response echoes (tools, tool_choice, reasoning). ``vision``: the
    model takes images (else an input_image is a 400); ``files``: the server's FileStore (input_file
    parts with a file_id)."""
    tools, tools_echo = _convert_tools(body.tools)
    kind, forced, choice_echo = _tool_choice(body.tool_choice, tools)
    turns = _Turns(vision, files)
    if body.instructions:
        turns.messages.append({"role": "system", "content": body.instructions})
    for item in history:
        turns.add(item, "previous_response_id")
    for i, item in enumerate(items):
        turns.add(item, f"input.{i}")
    if not any(m["role"] != "system" for m in turns.messages):
        raise invalid("input must hold at least one item (a string, or a list of message / function_call_output "
                      "items)", param="input")
    kwargs: dict = {}
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:
        kwargs["thinking"] = effort != "none"
    conv = Conversation(messages=turns.messages, tools=list(tools.values()), template_kwargs=kwargs,
                        thinking_budget=body.thinking_token_budget, images=turns.images.images)
    # The Responses API defaults strict to true. That default is kept when the grammar library is
    # installed; without it (a base install) only tools that ask for strict explicitly are constrained
    # (and get the 400 naming the extra), so clients that never mention strict keep working.
    explicit = {t.get("name") for t in (body.tools or []) if isinstance(t, dict) and t.get("strict") is True}
    if not structured_available():
        for t in tools_echo:
            t["strict"] = t["name"] in explicit
    strict = [t["name"] for t in tools_echo if t["strict"]]
    apply_tool_choice(conv, kind, forced, turns.ids.count, body.parallel_tool_calls is False, strict)
    summary = (body.reasoning or {}).get("summary")
    echo = {"tools": tools_echo, "tool_choice": choice_echo,
            "reasoning": {"effort": effort, "summary": summary if isinstance(summary, str) else None}}
    return conv, echo


# ---- parser events -> output items and stream events -------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutput(ReplyBuilder):
    """Turns output-parser events into Responses output items and the stream events that build them.

    ``feed``/``finish`` return events (dicts with ``type``, without ``sequence_number``); ``output``
    is the item list. Whitespace-only text does not open a message on its own. A tool call arrives
    whole from the parser and becomes a function_call item; ``single_call`` ends the reply there."""

    def __init__(self, single_call: bool = False):
        super().__init__(single_call)
        self.output: list[dict] = []
        self.num_calls = 0
        self._open: int | None = None  # index of the reasoning or message item being written
        self._ws = ""

    def finish(self, incomplete: bool) -> list[dict]:
        """Close the open item (``incomplete``: generation was cut by max_output_tokens). A reply with
        no item at all becomes one message (its text possibly empty)."""
        out: list[dict] = []
        if not self.output:
            out += self._open_message()
            out += self._text_delta(self._ws)
        self._ws = ""
        return out + self._close("incomplete" if incomplete else "completed")

    def _kind_open(self) -> str | None:
        return None if self._open is None else self.output[self._open]["type"]

    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        self._open = len(self.output) - 1
        return [{"type": "response.output_item.added", "output_index": self._open, "item": copy.deepcopy(item)}]

    def _part_event(self, kind: str, part: dict) -> dict:
        return {"type": kind, "item_id": self.output[self._open]["id"], "output_index": self._open,
                "content_index": 0, "part": dict(part)}

    def on_reasoning(self, text: str) -> list[dict]:
        if not text:
            return []
        out = []
        if self._kind_open() != "reasoning":
            out += self._close("completed")
            out += self._add({"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                              "encrypted_content": None, "status": "in_progress"})
            part = {"type": "reasoning_text", "text": ""}
            self.output[self._open]["content"].append(part)
            out.append(self._part_event("response.content_part.added", part))
        item = self.output[self._open]
        item["content"][0]["text"] += text
        out.append({"type": "response.reasoning_text.delta", "item_id": item["id"], "output_index": self._open,
                    "content_index": 0, "delta": text})
        return out

    def _open_message(self) -> list[dict]:
        out = self._close("completed")
        out += self._add({"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                          "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output[self._open]["content"].append(part)
        out.append(self._part_event("response.content_part.added", part))
        return out

    def on_text(self, text: str) -> list[dict]:
        if not text:
            return []
        out = []
        if self._kind_open() != "message":
            if not (self._ws + text).strip():
                self._ws += text
                return []
            text, self._ws = self._ws + text, ""
            out += self._open_message()
        return out + self._text_delta(text)

    def _text_delta(self, text: str) -> list[dict]:
        if not text:
            return []
        item = self.output[self._open]
        item["content"][0]["text"] += text
        return [{"type": "response.output_text.delta", "item_id": item["id"], "output_index": self._open,
                 "content_index": 0, "delta": text, "logprobs": []}]

    def _close(self, status: str) -> list[dict]:
        if self._open is None:
            return []
        index, item = self._open, self.output[self._open]
        self._open = None
        out = []
        if item["type"] in ("reasoning", "message"):
            part = item["content"][0]
            base = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "reasoning":
                out.append({"type": "response.reasoning_text.done", **base, "text": part["text"]})
            else:
                out.append({"type": "response.output_text.done", **base, "text": part["text"], "logprobs": []})
            out.append({"type": "response.content_part.done", **base, "part": dict(part)})
        item["status"] = status
        out.append({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)})
        return out

    def on_tool_call(self, raw_id: str, name: str, args: str) -> list[dict]:
        self._ws = ""
        out = self._close("completed")
        call_id = normalize_k2_id(raw_id, name, self.num_calls)
        item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                "name": name, "arguments": ""}
        out += self._add(item)
        item["arguments"] = args
        base = {"item_id": item["id"], "output_index": self._open}
        out.append({"type": "response.function_call_arguments.delta", **base, "delta": args})
        out.append({"type": "response.function_call_arguments.done", **base, "arguments": args})
        out += self._close("completed")
        self.num_calls += 1
        if self.single_call:
            self.done = True
        return out


# ---- one generation ---------------------------------------------------------------------------------
class _Generation:
    """A running request: the engine run, the parser, the output under construction, and the response
    object it makes (``snapshot``)."""

    def __init__(self, body: ResponsesRequest, echo: dict, prompt: Prompt, conv: Conversation, run: EngineRun,
                 tokenizer, text_format: dict | None = None):
        self.body, self.echo, self.prompt, self.run = body, echo, prompt, run
        self.text_format = text_format or {"type": "text"}
        self.parser, self.reply = prompt.parser(), ResponseOutput(conv.single_call)
        self.id, self.created = _new_id("resp"), int(time.time())
        self.token_ids: list[int] = []
        try:
            self._think_end = tokenizer.token_id(THINK_END) if prompt.thinking else None
        except (KeyError, ValueError):
            self._think_end = None

    def feed(self, out) -> list[dict]:
        if out is None:
            return []
        self.token_ids = out.token_ids
        return self.reply.feed(self.parser.feed(out.new_text))

    def finish(self) -> list[dict]:
        return self.reply.feed_end(self.parser) + self.reply.finish(self.incomplete)

    @property
    def incomplete(self) -> bool:
        return self.run.stats.finish_reason == "length" and not self.reply.done

    def usage(self) -> dict:
        s = self.run.stats
        reasoning = 0
        if self.prompt.thinking:
            ids = list(self.token_ids)
            reasoning = ids.index(self._think_end) if self._think_end in ids else len(ids)
        return {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": s.prompt_tokens + s.output_tokens}

    def snapshot(self, status: str, error: dict | None = None) -> dict:
        body = self.body
        final = status in ("completed", "incomplete", "failed")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": copy.deepcopy(self.reply.output) if final else [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": self.echo["reasoning"],
            "store": body.store is not False, "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": self.text_format}, "tool_choice": self.echo["tool_choice"],
            "tools": self.echo["tools"], "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled", "usage": self.usage() if final else None, "user": body.user,
            "metadata": body.metadata or {},
        }

    def final(self) -> dict:
        return self.snapshot("incomplete" if self.incomplete else "completed")


def _sampling(body: ResponsesRequest, max_tokens: int, conv: Conversation, tokenizer,
              structured: StructuredOutput | None = None) -> SamplingParams:
    return make_sampling(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 1.0, stop_token_ids=tool_section_stop_ids(tokenizer) if conv.forbid_tools else [],
        skip_special_tokens=False, thinking_token_budget=conv.thinking_budget, structured=structured)


def _as_input_param(e: APIError) -> APIError:
    """Errors about the rendered prompt name ``messages``; here the field is ``input``."""
    if e.param == "messages":
        e.param = "input"
        e.message = e.message.replace("your messages resulted", "your input resulted")
    return e


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    st, store = state_of(request), store_of(request)
    _check_supported(body)
    structured, format_echo = text_format(body)
    history = store.conversation(body.previous_response_id) if body.previous_response_id else []
    items = input_items(body.input)
    # in a worker thread: decoding images and reading PDFs can take a while
    conv, echo = await asyncio.to_thread(to_conversation, body, history, items, vision=supports_images(st.engine),
                                         files=getattr(request.app.state, "files", None))
    try:
        prompt = await build_prompt(st.engine, st.tokenizer, conv)
        max_tokens, _ = fit_max_tokens(len(prompt.token_ids), body.max_output_tokens, st.max_model_len, "openai")
    except APIError as e:
        raise _as_input_param(e) from None
    if structured is not None:
        if conv.output_prefix:
            raise invalid("a forced tool call (tool_choice 'required' or a named function) cannot be combined "
                          "with a structured text.format; drop one of them", param="text.format")
        check_structured(structured, "text.format.schema" if structured.kind == "json_schema" else "text.format")
        structured = format_beside_tools(structured, conv)  # with tools to call: JSON text or tool calls
    else:  # strict tools
        structured = conv.tool_constraint
        check_structured(structured, "tools")
    params = _sampling(body, max_tokens, conv, st.tokenizer, structured)
    params.lora = st.lora_for(body.model)  # multi-LoRA: the adapter the model name selects
    run = EngineRun(st.engine, prompt.engine_input, params, request_id_of(request), "openai", st.metrics)
    try:
        first = await start_run(run, request)
    except APIError as e:
        raise _as_input_param(e) from None
    if first is None:
        return Response(status_code=499)
    gen = _Generation(body, echo, prompt, conv, run, st.tokenizer, format_echo)

    def keep(response: dict) -> None:
        if body.store is not False:
            store.put(response, items + response["output"], body.previous_response_id)

    if body.stream:
        return SSEResponse(_stream(gen, first, keep))
    try:
        gen.reply.feed(gen.parser.feed(prompt.output_prefix))
        gen.feed(first)
        if not await run.collect(request, gen.feed, lambda: gen.reply.done):
            return Response(status_code=499)
        gen.finish()
        response = gen.final()
        keep(response)
        return JSONResponse(response)
    finally:
        await run.close()


async def _stream(gen: _Generation, first, keep):
    run, seq = gen.run, 0

    def frames(events: list[dict]) -> str:
        nonlocal seq
        text = []
        for ev in events:
            ev = {**ev, "sequence_number": seq}
            seq += 1
            text.append(sse_frame(ev["type"], ev))
        return "".join(text)

    def failure(kind: str, message: str) -> str:
        err = openai_stream_error(kind, message)["error"]
        code = "rate_limit_exceeded" if kind in ("rate_limit", "overloaded") else "server_error"
        return frames([{"type": "error", "code": err["code"] or err["type"], "message": message, "param": None},
                       {"type": "response.failed",
                        "response": gen.snapshot("failed", {"code": code, "message": message})}])

    try:
        start = gen.snapshot("in_progress")
        chunk = frames([{"type": "response.created", "response": start},
                        {"type": "response.in_progress", "response": start}]
                       + gen.reply.feed(gen.parser.feed(gen.prompt.output_prefix)) + gen.feed(first))
        yield chunk
        async for out in run.outputs(lambda: gen.reply.done):
            if isinstance(out, APIError):
                yield failure(out.kind, out.message)
                return
            if out is None:
                yield ": keep-alive\n\n"
                continue
            chunk = frames(gen.feed(out))
            if chunk:
                yield chunk
        tail = gen.finish()
        response = gen.final()
        keep(response)
        tail.append({"type": f"response.{response['status']}", "response": response})
        yield frames(tail)
    except Exception as e:  # noqa: BLE001 - the status line is sent; the error must travel as an event
        logger.exception("stream %s failed", run.request_id)
        yield failure("api_error", f"internal error while streaming: {type(e).__name__}")
    finally:
        await run.close()


# ---- stored responses --------------------------------------------------------------------------------
def _stored(request: Request, response_id: str) -> dict:
    response = store_of(request).get(response_id)
    if response is None:
        raise APIError("not_found", f"no response with id {response_id!r} in this server's store (responses are "
                                    f"kept in memory, the most recent {store_of(request).max_responses} at most, "
                                    f"and not when created with store=false)", param="response_id")
    return response


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return JSONResponse(_stored(request, response_id))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    _stored(request, response_id)
    store_of(request).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
