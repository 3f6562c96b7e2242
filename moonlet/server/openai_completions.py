"""The OpenAI text completions API: ``POST /v1/completions`` (one prompt: a string or token ids;
``echo``, legacy ``logprobs``, streaming with ``stream_options.include_usage``, structured output with
``response_format`` / ``structured_outputs`` as on chat completions, ``n`` choices sampled in
parallel: their chunks interleave, each with its choice's ``index``).

Scoring (lm-evaluation-harness's loglikelihood requests): ``echo`` with ``logprobs`` puts the prompt's
tokens, ``token_logprobs`` (None for the first) and ``top_logprobs`` ahead of the generated ones
(``SamplingParams.prompt_logprobs``); ``max_tokens: 0`` with ``echo`` computes the prompt only.
vLLM's ``prompt_logprobs`` field adds each choice's ``prompt_logprobs`` (``vllm_prompt_logprobs``)."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, invalid, openai_stream_error
from .generation import EngineRun, SSEResponse, fit_error, fit_max_tokens, sse_frame, start_run
from .openai import SamplingFields, finish_reason, openai_usage, sampling_params, top_items, vllm_prompt_logprobs
from .state import request_id_of, state_of

logger = logging.getLogger(__name__)
router = APIRouter()


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo (score the prompt, generate nothing)
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


def _prompt_logprobs(tokenizer, prompt_ids: list[int], out, top_n: int) -> dict:
    """The legacy logprobs of the echoed prompt: its tokens, their log-probabilities and top ``top_n``
    (None for the first token, which has no context), offsets from 0."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for t, d in zip(prompt_ids, out.prompt_logprobs or ()):
        text = tokenizer.decode([t])
        tokens.append(text)
        token_lps.append(None if d is None else max(float(d[t]), -9999.0))
        tops.append(None if d is None else {tokenizer.decode([k]): float(v) for k, v in top_items(d, top_n, t)[:top_n]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _join_logprobs(parts: list[dict]) -> dict:
    return {k: sum((p[k] for p in parts), []) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


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
    if body.max_tokens == 0:
        if not body.echo:
            raise invalid("max_tokens=0 generates nothing; it is allowed with echo: true (to score the prompt "
                          "with logprobs)", param="max_tokens")
        if len(ids) > st.max_model_len:  # the prompt itself must fit
            raise fit_error(len(ids), st.max_model_len, "openai")
        max_tokens = 0
    else:
        max_tokens, _ = fit_max_tokens(len(ids), body.max_tokens, st.max_model_len, "openai")
    # echo with logprobs scores the prompt too; vLLM's prompt_logprobs field asks for it directly
    wanted = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    params = sampling_params(body, max_tokens, [], body.logprobs, engine=st.engine,
                             prompt_logprobs=max(wanted) if wanted else None)
    echo_lps = body.echo and body.logprobs is not None
    params.lora = st.lora_for(body.model)  # multi-LoRA: the adapter the model name selects
    run = EngineRun(st.engine, ids, params, request_id_of(request), "openai", st.metrics)
    first = await start_run(run, request)
    if first is None:
        return Response(status_code=499)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = st.tokenizer.decode(ids) if body.echo else ""
    n = params.n

    def choice(index: int, text: str, out, offset: int, finish=None, first_of_choice: bool = False) -> dict:
        """A choice's entry for ``out``'s new tokens; ``first_of_choice``: also the echoed prompt's logprobs
        (echo with logprobs) and vLLM's prompt_logprobs, which come with a choice's first output."""
        lps = None
        if body.logprobs is not None:
            lps = _completion_logprobs(st.tokenizer, out.new_token_ids, out.new_logprobs, body.logprobs, offset)
            if first_of_choice and echo_lps:
                lps = _join_logprobs([_prompt_logprobs(st.tokenizer, ids, out, body.logprobs), lps])
        data = {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}
        if first_of_choice and body.prompt_logprobs is not None:
            data["prompt_logprobs"] = vllm_prompt_logprobs(st.tokenizer, ids, out, body.prompt_logprobs)
        return data

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

            started = [False] * n  # whether the choice has sent a chunk (the prompt's logprobs go in its first)

            def emit(out) -> str:
                i = out.index
                text = prefixes[i] + out.new_text
                finish = finish_reason(run, index=i) if out.finished else None
                offsets[i], prefixes[i] = offsets[i] + len(text), ""
                if text or finish or (body.logprobs is not None and out.new_token_ids):
                    first_of_choice, started[i] = not started[i], True
                    return frame([choice(i, text, out, offsets[i] - len(text), finish, first_of_choice)])
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
        scored: list = [None] * n  # per choice, its first output (it carries the prompt's logprobs)

        def take(out) -> None:
            i = out.index
            if scored[i] is None:
                scored[i] = out
                if echo_lps:
                    entries[i].append(_prompt_logprobs(st.tokenizer, ids, out, body.logprobs))
            if body.logprobs is not None:
                entries[i].append(choice(i, "", out, len(texts[i]))["logprobs"])
            texts[i] += out.new_text

        take(first)
        if not await run.collect(request, take):
            return Response(status_code=499)
        choices = []
        for i in range(n):
            lps = _join_logprobs(entries[i]) if body.logprobs is not None else None
            choices.append({"index": i, "text": texts[i], "logprobs": lps,
                            "finish_reason": finish_reason(run, index=i)})
            if body.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = vllm_prompt_logprobs(st.tokenizer, ids, scored[i],
                                                                      body.prompt_logprobs)
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                             "choices": choices, "usage": openai_usage(run)})
    finally:
        await run.close()
