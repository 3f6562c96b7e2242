"""The OpenAI text completions API: ``POST /v1/completions`` (one prompt: a string or token ids;
``echo``, legacy ``logprobs``, streaming with ``stream_options.include_usage``, structured output with
``response_format`` / ``structured_outputs`` as on chat completions, ``n`` choices sampled in
parallel: their chunks interleave, each with its choice's ``index``)."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, invalid, openai_stream_error
from .generation import EngineRun, SSEResponse, fit_max_tokens, sse_frame, start_run
from .openai import SamplingFields, finish_reason, openai_usage, sampling_params
from .state import request_id_of, state_of

logger = logging.getLogger(__name__)
router = APIRouter()


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


def _completion_prompt(body: CompletionRequest, tokenizer) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, allow_special=True)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise invalid("prompt must be one string or one list of token ids (batches of prompts are not supported; "
                  "send one request per prompt)", param="prompt")


def _completion_logprobs(tokenizer, token_ids, dicts, top_n: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, d in zip(token_ids, dicts or []):
        text = tokenizer.decode([t])
        tokens.append(text)
        token_lps.append(max(float(d.get(t, float("-inf"))), -9999.0))
        tops.append({tokenizer.decode([k]): float(v) for k, v in list(d.items())[:top_n]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state_of(request)
    if body.suffix:
        raise invalid("suffix (fill-in-the-middle) is not supported", param="suffix")
    ids = _completion_prompt(body, st.tokenizer)
    if not ids:
        raise invalid("the prompt is empty; give at least one token", param="prompt")
    max_tokens, _ = fit_max_tokens(len(ids), body.max_tokens, st.max_model_len, "openai")
    params = sampling_params(body, max_tokens, [], body.logprobs, engine=st.engine)
    params.lora = st.lora_for(body.model)  # multi-LoRA: the adapter the model name selects
    run = EngineRun(st.engine, ids, params, request_id_of(request), "openai", st.metrics)
    first = await start_run(run, request)
    if first is None:
        return Response(status_code=499)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = st.tokenizer.decode(ids) if body.echo else ""
    n = params.n

    def choice(index: int, text: str, out, offset: int, finish=None) -> dict:
        lps = None
        if body.logprobs is not None:
            lps = _completion_logprobs(st.tokenizer, out.new_token_ids, out.new_logprobs, body.logprobs, offset)
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def frame(choices, usage=False) -> str:
            data = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices}
            if include_usage:
                data["usage"] = openai_usage(run) if usage else None
            return sse_frame(None, data)

        async def stream():
            # per choice: characters sent so far, and the echoed prompt, which goes out with its first output
            offsets, prefixes = [len(echo)] * n, [echo] * n

            def emit(out) -> str:
                i = out.index
                text = prefixes[i] + out.new_text
                finish = finish_reason(run, index=i) if out.finished else None
                offsets[i], prefixes[i] = offsets[i] + len(text), ""
                if text or finish or (body.logprobs is not None and out.new_token_ids):
                    return frame([choice(i, text, out, offsets[i] - len(text), finish)])
                return ""

            try:
                chunk = emit(first)
                if chunk:
                    yield chunk
                async for out in run.outputs():
                    if isinstance(out, APIError):
                        yield sse_frame(None, openai_stream_error(out.kind, out.message))
                        break
                    if out is None:
                        yield ": keep-alive\n\n"
                        continue
                    chunk = emit(out)
                    if chunk:
                        yield chunk
                if include_usage:
                    yield frame([], usage=True)
                yield sse_frame(None, "[DONE]")
            except Exception as e:  # noqa: BLE001 - see _chat_stream
                logger.exception("stream %s failed", run.request_id)
                yield sse_frame(None, openai_stream_error("api_error", f"internal error while streaming: "
                                                                       f"{type(e).__name__}"))
                yield sse_frame(None, "[DONE]")
            finally:
                await run.close()

        return SSEResponse(stream())
    try:
        texts: list[str] = [echo] * n
        entries: list[list[dict]] = [[] for _ in range(n)]

        def take(out) -> None:
            i = out.index
            if body.logprobs is not None:
                entries[i].append(choice(i, "", out, len(texts[i]))["logprobs"])
            texts[i] += out.new_text

        take(first)
        if not await run.collect(request, take):
            return Response(status_code=499)
        choices = []
        for i in range(n):
            lps = None
            if body.logprobs is not None:
                lps = {k: sum((e[k] for e in entries[i]), []) for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                        "text_offset")}
            choices.append({"index": i, "text": texts[i], "logprobs": lps,
                            "finish_reason": finish_reason(run, index=i)})
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                             "choices": choices, "usage": openai_usage(run)})
    finally:
        await run.close()
