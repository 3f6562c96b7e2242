"""Anthropic Messages requests -> K2 chat input (OpenAI-style messages, tools, template switches).

What is done with each part of a request:
- ``system`` (string or text blocks, joined by blank lines) becomes the system message.
- Consecutive turns of the same role are merged; a final assistant turn is a prefill: its text is
  placed after the generation prompt and the reply continues it (thinking is switched off then,
  so the prefill is answer text, not reasoning).
- User turns: text blocks and ``document`` blocks (joined by blank lines) become the user message
  (a document's text, title and context; a PDF's pages as text with page markers, and as images on
  models with vision: see ``documents``); each ``tool_result`` becomes a tool message (``## Return of <K2 id>``) placed before
  the user's text; ``is_error`` results are prefixed with "Error: ". ``image`` blocks (in user turns
  and tool results) with a ``base64`` source become the K2.5 image placeholder at their place (see
  ``images``) on models with vision; a ``url`` source is a 400 (the server fetches nothing), and a
  text-only model answers any image with a 400. Documents in tool results are read as in user turns.
- Assistant turns: text -> content, ``thinking`` -> reasoning_content, ``tool_use`` -> tool_calls
  with K2 ids (see ``tool_ids``); ``redacted_thinking`` is dropped (it cannot be read back).
- ``tools`` with ``input_schema`` become K2 function declarations; Anthropic server tools (typed,
  without a schema) are skipped: the model cannot run them.
- ``tool_choice``: auto -> tools offered; none -> no tools declared and generation stops at a
  tool-section opener; any -> the reply is opened with K2's tool-section token, so it must be a
  call; tool -> the reply is opened with the named call up to its arguments (Anthropic likewise
  prefills for forced tool use, and allows no thinking with it). ``disable_parallel_tool_use``
  keeps the first call and ends the reply there. Tools with ``strict: true`` constrain the calls
  (``Conversation.tool_constraint``; see ``generation.tool_constraint``).
- ``thinking``: enabled/adaptive -> template ``thinking=True``; disabled -> ``thinking=False``;
  absent -> the template's default. ``enabled`` needs ``budget_tokens``, an integer >= 1024 (the
  API's floor) and below max_tokens (checked by the endpoint; the ``interleaved-thinking-*`` beta
  lifts that); it is enforced by the engine (``SamplingParams.thinking_token_budget``): after that
  many thinking tokens the reply's thinking is closed with ``</think>`` and the answer follows.

``history_to_messages`` converts a conversation that is all history (training data, a stored agent
session) the same way, keeping a final assistant turn, thinking and tool calls included, as a message.
"""

from __future__ import annotations

import json

from . import documents
from .errors import invalid
from .generation import Conversation, apply_tool_choice
from .images import Images, join_content
from .tool_ids import ToolIdMap


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{where}.content.{j} must be an object with a 'type'", param=f"{where}.content.{j}")
    return content


def _text_of(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text must be a string", param=f"{where}.text")
    return text


def _image(block: dict, where: str, images: Images) -> str:
    """An ``image`` block -> its placeholder text (the image decoded into ``images``)."""
    source = block.get("source")
    if not images.vision:
        raise _no_vision("image", where)
    if not isinstance(source, dict):
        raise invalid(f"{where}.source must be an object ({{'type': 'base64', 'media_type', 'data'}})",
                      param=f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        return images.add_base64(source.get("data"), source.get("media_type"), f"{where}.source", where)
    if kind == "url":
        raise invalid(f"{where}.source: this server does not fetch images from URLs; send the image inline as a "
                      f"base64 source ({{'type': 'base64', 'media_type': 'image/png', 'data': ...}})",
                      param=f"{where}.source")
    raise invalid(f"{where}.source.type {kind!r} is not supported; send {{'type': 'base64', 'media_type', 'data'}}",
                  param=f"{where}.source.type")


def _document(block: dict, where: str, images: Images) -> str:
    """A ``document`` block -> its prompt text (see ``documents``): a ``base64`` PDF, a ``text`` source, or a
    ``content`` source (text and image blocks), with its ``title`` and ``context``. PDF page images (models
    with vision) and a content source's images are added to ``images``."""
    citations = block.get("citations")
    if citations is not None:
        if not isinstance(citations, dict):
            raise invalid(f"{where}.citations must be an object ({{'enabled': bool}})", param=f"{where}.citations")
        if citations.get("enabled"):
            raise invalid(f"{where}.citations: citations are not supported by this server; send the document "
                          f"without citations.enabled", param=f"{where}.citations")
    title = documents.optional_string(block.get("title"), f"{where}.title")
    context = documents.optional_string(block.get("context"), f"{where}.context")
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{where}.source must be an object ({{'type': 'base64', 'media_type': 'application/pdf', "
                      f"'data'}}, {{'type': 'text', 'data'}} or {{'type': 'content', 'content'}})",
                      param=f"{where}.source")
    kind = source.get("type")
    if kind == "text":
        data = source.get("data")
        if not isinstance(data, str):
            raise invalid(f"{where}.source.data must be the document's text", param=f"{where}.source.data")
        return documents.text_document(data, title, context)
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type != documents.PDF_MEDIA_TYPE:
            raise invalid(f"{where}.source.media_type must be {documents.PDF_MEDIA_TYPE!r} for a base64 document; "
                          f"got {media_type!r} (send text as a 'text' source)", param=f"{where}.source.media_type")
        data = documents.decode_base64_pdf(source.get("data"), f"{where}.source.data")
        return documents.pdf_document(data, where, images, title, context)
    if kind == "content":
        content = source.get("content")
        w = f"{where}.source.content"
        if isinstance(content, str):
            parts = [("text", content)]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                t = part.get("type") if isinstance(part, dict) else None
                if t == "text":
                    parts.append(("text", _text_of(part, f"{w}.{j}")))
                elif t == "image":
                    parts.append(("image", _image(part, f"{w}.{j}", images)))
                else:
                    raise invalid(f"{w}.{j} has type {t!r}; a content document holds text and image blocks",
                                  param=f"{w}.{j}")
        else:
            raise invalid(f"{w} must be a string or a list of text and image blocks", param=w)
        return documents.text_document(join_content(parts, "\n\n"), title, context)
    if kind == "url":
        raise invalid(f"{where}.source: this server does not fetch documents from URLs; send the PDF inline as a "
                      f"base64 source ({{'type': 'base64', 'media_type': 'application/pdf', 'data': ...}})",
                      param=f"{where}.source")
    if kind == "file":
        raise invalid(f"{where}.source: file sources (the Files API) are not supported by this server; send the "
                      f"PDF inline as a base64 source", param=f"{where}.source")
    raise invalid(f"{where}.source.type {kind!r} is not supported; send 'base64' (a PDF), 'text' or 'content'",
                  param=f"{where}.source.type")


def _no_vision(kind: str, where: str):
    return invalid(f"{where} is an {kind} block, but this model reads text only (no vision); remove the "
                   f"{kind} or describe it in text", param=where)


def system_text(system, where: str = "system") -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        parts = []
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise invalid(f"{where}.{j} must be a text block", param=f"{where}.{j}")
            parts.append(_text_of(block, f"{where}.{j}"))
        return "\n\n".join(parts)
    raise invalid(f"{where} must be a string or a list of text blocks", param=where)


def _tool_result_text(block: dict, where: str, images: Images) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(("text", _text_of(part, f"{where}.content.{j}")))
            elif kind == "image":
                parts.append(("image", _image(part, f"{where}.content.{j}", images)))
            elif kind == "document":
                parts.append(("text", _document(part, f"{where}.content.{j}", images)))
            else:
                raise invalid(f"{where}.content.{j} has type {kind!r}; tool results may hold text, image and "
                              f"document blocks",
                              param=f"{where}.content.{j}")
        text = join_content(parts, "\n")
    else:
        raise invalid(f"{where}.content must be a string or a list of text blocks", param=f"{where}.content")
    return "Error: " + text if block.get("is_error") else text


def _user_turn(blocks: list[dict], where: str, ids: ToolIdMap, images: Images) -> list[dict]:
    """The turn's tool messages, then its user message. Images are collected in that order too (the
    tool results' first), the order their placeholders take in the rendered prompt."""
    tool_messages, texts = [], []
    tool_images, user_images = Images(images.vision), Images(images.vision)
    for j, block in enumerate(blocks):
        w, kind = f"{where}.content.{j}", block["type"]
        if kind == "text":
            texts.append(("text", _text_of(block, w)))
        elif kind == "tool_result":
            client_id = block.get("tool_use_id")
            if not isinstance(client_id, str) or not client_id:
                raise invalid(f"{w}.tool_use_id must be the id of an earlier tool_use block", param=f"{w}.tool_use_id")
            k2 = ids.result_id(client_id)
            message = {"role": "tool", "tool_call_id": k2, "content": _tool_result_text(block, w, tool_images)}
            name = ids.name_of(k2)
            if name:
                message["name"] = name
            tool_messages.append(message)
        elif kind == "image":
            texts.append(("image", _image(block, w, user_images)))
        elif kind == "document":
            texts.append(("text", _document(block, w, user_images)))
        elif kind in ("thinking", "redacted_thinking", "tool_use"):
            raise invalid(f"{w} is a {kind} block, which only an assistant turn may hold", param=w)
        else:
            raise invalid(f"{w} has unsupported content block type {kind!r}", param=w)
    images.images += tool_images.images + user_images.images
    out = tool_messages
    if texts or not tool_messages:
        out.append({"role": "user", "content": join_content(texts, "\n\n")})
    return out


def _assistant_turn(blocks: list[dict], where: str, ids: ToolIdMap) -> dict:
    texts, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        w, kind = f"{where}.content.{j}", block["type"]
        if kind == "text":
            texts.append(_text_of(block, w))
        elif kind == "thinking":
            thought = block.get("thinking")
            if not isinstance(thought, str):
                raise invalid(f"{w}.thinking must be a string", param=f"{w}.thinking")
            reasoning.append(thought)
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            name, client_id, args = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not name:
                raise invalid(f"{w}.name must be the tool's name", param=f"{w}.name")
            if not isinstance(client_id, str) or not client_id:
                raise invalid(f"{w}.id must be a non-empty string", param=f"{w}.id")
            if not isinstance(args, dict):
                raise invalid(f"{w}.input must be an object", param=f"{w}.input")
            calls.append({"id": ids.add_call(client_id, name), "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        elif kind in ("image", "document"):
            raise invalid(f"{w} is an {kind} block in an assistant turn; images and documents go in user turns",
                          param=w)
        else:
            raise invalid(f"{w} has unsupported content block type {kind!r} in an assistant turn", param=w)
    message = {"role": "assistant", "content": "\n\n".join(texts)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


MIN_THINKING_BUDGET = 1024  # the Messages API's floor for thinking.budget_tokens


def thinking_budget(thinking: dict) -> int:
    """``budget_tokens`` of an enabled thinking config: required, an integer >= 1024."""
    budget = thinking.get("budget_tokens")
    if budget is None:
        raise invalid("thinking.budget_tokens is required when thinking.type is 'enabled' (an integer >= "
                      f"{MIN_THINKING_BUDGET}); or use thinking.type 'adaptive' for no fixed budget",
                      param="thinking.budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise invalid(f"thinking.budget_tokens must be an integer; got {budget!r}", param="thinking.budget_tokens")
    if budget < MIN_THINKING_BUDGET:
        raise invalid(f"thinking.budget_tokens must be >= {MIN_THINKING_BUDGET}; got {budget}",
                      param="thinking.budget_tokens")
    return budget


def check_thinking_budget(budget: int | None, max_tokens: int, interleaved: bool) -> None:
    """A budget must leave room for the answer: below max_tokens, unless interleaved thinking (the
    ``interleaved-thinking-2025-05-14`` beta) lets it span the turn's tool calls."""
    if budget is not None and budget >= max_tokens and not interleaved:
        raise invalid(f"max_tokens must be greater than thinking.budget_tokens (thinking tokens count toward "
                      f"max_tokens); got max_tokens={max_tokens} and budget_tokens={budget}. Raise max_tokens "
                      f"or lower the budget", param="max_tokens")


def convert_tools(tools) -> dict[str, dict]:
    """Anthropic tool definitions -> {name: K2 (OpenAI function form) declaration}."""
    out: dict[str, dict] = {}
    if tools is None:
        return out
    if not isinstance(tools, list):
        raise invalid("tools must be a list", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{i} must be an object", param=f"tools.{i}")
        schema = tool.get("input_schema")
        if schema is None and tool.get("type") not in (None, "custom"):
            continue  # an Anthropic server tool (web search, code execution...): nothing here can run it
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"tools.{i}.name must be a non-empty string", param=f"tools.{i}.name")
        if not isinstance(schema, dict):
            raise invalid(f"tools.{i}.input_schema must be a JSON schema object (tool {name!r})",
                          param=f"tools.{i}.input_schema")
        if name in out:
            raise invalid(f"tools.{i}: tool name {name!r} is used twice; tool names must be unique",
                          param=f"tools.{i}.name")
        function = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        out[name] = {"type": "function", "function": function}
    return out


def merge_turns(messages) -> list[tuple[str, list[dict], str]]:
    """(role, content blocks, where) per turn, consecutive messages of the same role merged. A message is
    an object with ``role`` and ``content`` (the request model) or a dict with those keys."""
    turns: list[tuple[str, list[dict], str]] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant"):
                raise invalid(f"{where}.role must be 'user' or 'assistant'; got {role!r}", param=f"{where}.role")
        else:
            role, content = message.role, message.content
        blocks = _blocks(content, where)
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + blocks, turns[-1][2])
        else:
            turns.append((role, list(blocks), where))
    if not turns:
        raise invalid("messages must hold at least one message", param="messages")
    return turns


def turns_to_messages(system, turns: list[tuple[str, list[dict], str]], images: Images) -> tuple[list[dict], ToolIdMap]:
    """K2 chat messages (OpenAI style) for ``system`` and merged ``turns``, every turn kept (a final
    assistant turn too), and the tool-id map built on the way."""
    ids = ToolIdMap()
    messages: list[dict] = []
    system = system_text(system)
    if system is not None:
        messages.append({"role": "system", "content": system})
    for role, blocks, where in turns:
        if role == "user":
            messages += _user_turn(blocks, where, ids, images)
        else:
            messages.append(_assistant_turn(blocks, where, ids))
    return messages, ids


def history_to_messages(system, messages, vision: bool = False) -> list[dict]:
    """A whole conversation that is history only (training data, a stored agent session) -> K2 chat
    messages: as for a request, except that a final assistant turn stays a message (no prefill), with
    its thinking and tool calls."""
    return turns_to_messages(system, merge_turns(messages), Images(vision))[0]


def to_conversation(req, vision: bool = False) -> Conversation:
    """Build the K2 chat input for a validated messages request (``req`` has the request's fields).
    ``vision``: the model takes images (else an image block is a 400)."""
    tools = convert_tools(req.tools)
    choice = req.tool_choice or {"type": "auto"}
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice.type must be one of auto, any, tool, none", param="tool_choice")
    kind = choice["type"]
    if kind in ("any", "tool") and not tools:
        raise invalid(f"tool_choice {kind!r} needs at least one tool in tools", param="tool_choice")
    forced = None
    if kind == "tool":
        forced = choice.get("name")
        if forced not in tools:
            raise invalid(f"tool_choice names tool {forced!r}, which is not among the tools "
                          f"({', '.join(tools) or 'none'})", param="tool_choice.name")

    template_kwargs: dict = {}
    budget = None
    thinking = req.thinking
    if thinking is not None:
        t = thinking.get("type") if isinstance(thinking, dict) else None
        if t in ("enabled", "adaptive"):
            template_kwargs["thinking"] = True
            if t == "enabled":
                budget = thinking_budget(thinking)
        elif t == "disabled":
            template_kwargs["thinking"] = False
        else:
            raise invalid("thinking.type must be enabled, disabled or adaptive", param="thinking.type")

    turns = merge_turns(req.messages)

    prefill = ""
    if turns[-1][0] == "assistant":
        role, blocks, where = turns.pop()
        if any(b["type"] == "tool_use" for b in blocks):
            raise invalid(f"the last message ({where}) is an assistant turn with tool_use blocks; send the "
                          f"tool results in a following user turn", param=where)
        for j, b in enumerate(blocks):
            if b["type"] == "text":
                prefill += _text_of(b, f"{where}.content.{j}")
            elif b["type"] not in ("thinking", "redacted_thinking"):
                raise invalid(f"{where}.content.{j}: a final assistant turn (prefill) may hold only text",
                              param=f"{where}.content.{j}")
        if not turns:
            raise invalid("messages holds only an assistant turn; start with a user turn", param="messages")

    images = Images(vision)
    messages, ids = turns_to_messages(req.system, turns, images)

    conv = Conversation(messages=messages, tools=list(tools.values()), template_kwargs=template_kwargs,
                        prefill=prefill, thinking_budget=budget, images=images.images)
    strict = [t["name"] for t in req.tools or [] if isinstance(t, dict) and t.get("strict") is True
              and t.get("name") in tools]
    apply_tool_choice(conv, kind, forced, ids.count, bool(choice.get("disable_parallel_tool_use")), strict)
    return conv
