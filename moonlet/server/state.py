"""What the request handlers need from the app: the engine, its tokenizer, names and metrics."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request


@dataclass
class ServerState:
    engine: object  # moonlet.engine.AsyncLLM or anything with its interface
    served_model_name: str
    metrics: object  # ServerMetrics
    api_key: str | None = None
    created: float = field(default_factory=time.time)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (moonlet serve --allow-runtime-lora)
    allow_runtime_lora: bool = False

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine serves LoRA adapters (multi-LoRA serving); then requests select by model name."""
        return bool(getattr(self.engine, "lora_enabled", False))

    def loras(self) -> dict[str, str]:
        """{adapter name: directory} of the engine's registered LoRA adapters."""
        list_loras = getattr(self.engine, "list_loras", None)
        return list_loras() if list_loras is not None and self.lora_enabled else {}

    def lora_for(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` selects: None for the served model name (the base model);
        an adapter's name for itself. With adapters served, any other name is a 404 naming the models;
        without, every name is served by the one model (as before multi-LoRA)."""
        if not self.lora_enabled or model is None or model == self.served_model_name:
            return None
        if model in self.loras():
            return model
        from .errors import APIError

        names = [self.served_model_name, *sorted(self.loras())]
        raise APIError("not_found", f"model {model!r} not found; this server serves {', '.join(map(repr, names))} "
                                    "(the base model and its LoRA adapters)", param="model")

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)


def state_of(request: Request) -> ServerState:
    return request.app.state.moonlet


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid or f"req_{uuid.uuid4().hex[:24]}"
