"""The serving engine: paged latent KV cache, continuous batching, prefix caching, sampling.

``LLM`` is the offline API, ``AsyncLLM`` the asyncio-facing one the server uses; both run an
``EngineCore``. See docs/serving-engine.md.
"""

from __future__ import annotations

import importlib

from .errors import EngineDeadError, EngineOverloadedError, PromptTooLongError
from .params import SamplingParams, StructuredOutput
from .sequence import RequestOutput

_LAZY = {
    "LLM": "moonlet.engine.llm",
    "AsyncLLM": "moonlet.engine.async_llm",
    "EngineCore": "moonlet.engine.core",
    "EngineConfig": "moonlet.engine.config",
    "MultimodalPrompt": "moonlet.engine.multimodal",
}

__all__ = ["AsyncLLM", "EngineConfig", "EngineCore", "EngineDeadError", "EngineOverloadedError", "LLM",
           "MultimodalPrompt", "PromptTooLongError", "RequestOutput", "SamplingParams", "StructuredOutput"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moonlet.engine' has no attribute {name!r}")
