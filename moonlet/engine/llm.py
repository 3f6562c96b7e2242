"""LLM: the offline Python API — batches of prompts or chat conversations in, RequestOutputs out."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from .core import build_engine
from .multimodal import MultimodalPrompt
from .params import SamplingParams
from .sequence import RequestOutput

Prompt = str | list[int] | dict | MultimodalPrompt


class LLM:
    """Offline generation with the serving engine (continuous batching, paged latent cache, prefix cache).

    ``LLM(model_path)`` loads a checkpoint directory (None: the bundled moonlet-tiny);
    ``LLM(model=transformer, tokenizer=tok)`` wraps objects already built (the tokenizer may be None
    when prompts are token ids and no stop strings are used). Other keyword arguments are
    ``EngineConfig`` fields (block_size, num_blocks, kv_cache_memory, max_num_seqs, ...).
    """

    def __init__(self, model_path=None, *, model=None, tokenizer=None, **engine_args):
        self.engine = build_engine(model_path, model, tokenizer, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def close(self) -> None:
        """Release what outlives the object otherwise: tensor-parallel worker processes."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def stats(self) -> dict:
        return self.engine.stats()

    def add_lora(self, name: str, path) -> None:
        """Register a PEFT LoRA adapter directory under ``name`` (multi-LoRA serving: the engine must be
        built with ``enable_lora=True`` or ``lora_modules``); select it with ``SamplingParams(lora=name)``."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter (ValueError when unknown)."""
        self.engine.remove_lora(name)

    def list_loras(self) -> dict[str, str]:
        """{name: adapter directory} of the registered adapters."""
        return self.engine.list_loras()

    def _encode(self, prompt: Prompt) -> list[int] | MultimodalPrompt:
        if isinstance(prompt, MultimodalPrompt):
            return prompt
        if isinstance(prompt, dict):  # {"prompt": text or ids, "images": [...]} (vision models)
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs 'prompt' (text or token ids) and 'images'")
            ids = self._encode(prompt["prompt"])
            images = prompt.get("images") or []
            return self.engine.prepare_prompt(ids, images) if images else ids
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this LLM has none (pass token id lists)")
            return self.tokenizer.encode(prompt, allow_special=True)
        return list(prompt)

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text, a list of token ids, or for vision models
        ``{"prompt": text or ids, "images": [...]}`` with one ``<|media_pad|>`` run per image, or a
        ``MultimodalPrompt``); outputs in prompt order.

        ``params`` is one SamplingParams for all prompts or one per prompt (default: SamplingParams()).
        Every prompt is checked before any work starts.

        Parallel sampling: a prompt whose params have ``n > 1`` gives n outputs, its samples in index
        order (``RequestOutput.index`` 0..n-1), where a prompt with n = 1 gives one: the list is the
        prompts' outputs one after another, ``sum(p.n for p in params)`` long. The n samples compute
        the prompt once (see ``SamplingParams``).
        """
        if isinstance(prompts, (str, dict, MultimodalPrompt)) or \
                (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; "
                             f"give one, or one per prompt")
        encoded = [self._encode(p) for p in prompts]
        for ids, p in zip(encoded, params):
            self.engine.check_request(ids, p)
        rids = [f"llm-{next(self._ids)}" for _ in prompts]
        keys = [(rid, i) for rid, p in zip(rids, params) for i in range(p.n)]
        results: dict[tuple[str, int], RequestOutput] = {}
        try:
            for rid, ids, p in zip(rids, encoded, params):
                self.engine.add_request(rid, ids, p)
            while len(results) < len(keys):
                for out in self.engine.step():
                    if out.finished:
                        results[(out.request_id, out.index)] = out
        finally:
            for rid in rids:
                self.engine.abort_request(rid)  # a no-op for finished requests
        return [results[key] for key in keys]

    def chat(self, conversations, params: SamplingParams | Seq[SamplingParams] | None = None, tools=None,
             **template_kwargs) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of message dicts) or a list of them, rendered with
        the tokenizer's chat template (``tools`` and extra kwargs such as ``thinking=False`` reach it).

        Vision models: a content list may hold image parts, ``{"type": "image", "image": X}`` or
        OpenAI-style ``{"type": "image_url", "image_url": {"url": X}}``, X a data URL, a file path, raw
        bytes or a PIL image. Each renders as the K2.5 media placeholder where it stands and its image
        goes with the prompt, in order (``moonlet.chat.split_image_parts``). A text-only model refuses
        them (ValueError)."""
        from ..chat import split_image_parts

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this LLM has none")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts: list[Prompt] = []
        for k, conv in enumerate(conversations):
            conv, images = split_image_parts(conv)
            if images and not self.engine.supports_images:
                raise ValueError(f"conversation {k} has {len(images)} image part(s), but this model has no vision "
                                 "(its config has no vision_config); remove the images or describe them in text")
            ids = self.tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=True,
                                                     **template_kwargs)
            prompts.append({"prompt": ids, "images": images} if images else ids)
        return self.generate(prompts, params)
