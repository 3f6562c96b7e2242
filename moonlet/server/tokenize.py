"""``POST /tokenize`` and ``POST /detokenize``: the served model's tokenizer over HTTP, as vLLM serves it.

``/tokenize`` takes either ``prompt`` (text, encoded as ``/v1/completions`` encodes it: special-token
text allowed) or ``messages`` (an OpenAI chat request's messages, with its ``tools``,
``chat_template_kwargs`` and ``add_generation_prompt``, default true), rendered exactly as
``/v1/chat/completions`` renders them, so ``count`` is that request's prompt length. The answer is
``{"count", "max_model_len", "tokens"}``, plus ``token_strs`` (each token's text) with
``return_token_strs: true``. ``/detokenize`` takes ``tokens`` and answers ``{"prompt": text}``.
Errors use the OpenAI shape.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request

from .errors import invalid
from .generation import build_prompt, supports_images
from .state import state_of

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # accepted for vLLM compatibility; K2 prompts carry no BOS
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    st = state_of(request)
    tok = st.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of 'prompt' (text) or 'messages' (chat messages)", param="prompt")
    if body.prompt is not None:
        ids = tok.encode(body.prompt, allow_special=True)
    else:
        from .openai import ChatRequest, to_conversation

        chat = ChatRequest(model=body.model or st.served_model_name, messages=body.messages, tools=body.tools,
                           tool_choice=body.tool_choice, chat_template_kwargs=body.chat_template_kwargs)
        conv = await asyncio.to_thread(to_conversation, chat, vision=supports_images(st.engine),
                                       files=getattr(request.app.state, "files", None))
        if not body.add_generation_prompt:
            ids = tok.apply_chat_template(conv.messages, tools=conv.tools or None, add_generation_prompt=False,
                                          tokenize=True, **conv.template_kwargs)
        else:
            ids = (await build_prompt(st.engine, tok, conv)).token_ids
    out = {"count": len(ids), "max_model_len": st.max_model_len, "tokens": list(ids)}
    if body.return_token_strs:
        out["token_strs"] = [tok.decode([i]) for i in ids]
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    tok = state_of(request).tokenizer
    limit = tok.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < limit]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary (0 .. {limit - 1})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}
