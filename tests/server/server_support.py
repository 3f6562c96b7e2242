"""Fixtures for the server tests: a real uvicorn server on 127.0.0.1 and a scripted engine double.

``ScriptedEngine`` implements the AsyncLLM contract (generate / abort / stats / tokenizer /
max_model_len) and replays scripted texts token by token through the real tokenizer, honouring
max_tokens, stop strings, stop token ids, ``n`` (one script per sample, interleaved) and logprobs
(``_logprob``: a made-up value per sample and position) as the engine's contract says. It lets protocol tests
drive exact model outputs (tool calls, thinking, stops) that a random tiny model never produces;
the end-to-end tests use the real engine.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
import uvicorn

from moonlet.engine import EngineOverloadedError, PromptTooLongError, RequestOutput
from moonlet.testing import tiny_tokenizer_dir
from moonlet.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Script:
    text: str = "Hello there."
    finish: str = "stop"  # how the text ends when nothing cuts it short: 'stop' (EOS) or 'length'
    cached: int = 0  # num_cached_tokens to report
    delay: float = 0.0  # seconds between tokens
    raise_error: BaseException | None = None


def _logprob(index: int, position: int) -> float:
    """The scripted log-probability of sample ``index``'s token at ``position``: distinct per sample,
    so a test can tell whose logprobs a choice carries."""
    return -0.5 * index - 0.01 * position


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    params: object
    prompt_text: str = ""


class ScriptedEngine:
    def __init__(self, tokenizer, max_model_len: int = 4096, model_name: str = "scripted"):
        self.tokenizer, self.max_model_len, self.model_name = tokenizer, max_model_len, model_name
        self.scripts: list[Script] = []
        self.default = Script()
        self.calls: list[Call] = []
        self.aborted: list[str] = []
        self.stopped_samples: list[tuple[str, int]] = []  # (request id, sample index) stopped by the server
        self.finished: list[str] = []
        self.running = 0

    def push(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    def start(self):
        pass

    def shutdown(self):
        pass

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "cache_usage": 0.0, "blocks_total": 8, "blocks_free": 8,
                "prefix_cache_queries": 10, "prefix_cache_hits": 5, "engine_alive": True}

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def abort_sample(self, request_id: str, index: int) -> None:
        """Stop one sample of an n > 1 request: its script is not played further."""
        self.stopped_samples.append((request_id, index))

    async def generate(self, prompt_token_ids, params, request_id):
        """One script per sample: ``params.n`` (parallel sampling) takes the next n scripts (the default
        for any missing) and interleaves their outputs round-robin, each with its ``index``."""
        n = getattr(params, "n", 1)
        scripts = [self.scripts.pop(0) if self.scripts else self.default for _ in range(n)]
        self.calls.append(Call(request_id, list(prompt_token_ids), params,
                               self.tokenizer.decode(prompt_token_ids)))
        for script in scripts:
            if script.raise_error is not None:
                raise script.raise_error
        if len(prompt_token_ids) > self.max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), self.max_model_len)
        streams = [self._replay(script, prompt_token_ids, params, request_id, i) for i, script in enumerate(scripts)]
        self.running += 1
        try:
            alive = [True] * len(streams)
            while any(alive):
                for i, stream in enumerate(streams):
                    if not alive[i]:
                        continue
                    if (request_id, i) in self.stopped_samples:
                        alive[i] = False
                        continue
                    try:
                        yield await stream.__anext__()
                    except StopAsyncIteration:
                        alive[i] = False
            self.finished.append(request_id)
        finally:
            self.running -= 1
            for stream in streams:
                await stream.aclose()

    async def _replay(self, script, prompt_token_ids, params, request_id, index):
        ids = self.tokenizer.encode(script.text, allow_special=True)
        detok = IncrementalDetokenizer(self.tokenizer)
        stop_ids = set(params.stop_token_ids)
        text, emitted, out_ids = "", 0, []
        for i, tid in enumerate(ids):
            if script.delay:
                await asyncio.sleep(script.delay)
            else:
                await asyncio.sleep(0)
            out_ids.append(tid)
            finish = reason = None
            if tid in stop_ids:
                finish, reason = "stop", tid
            else:
                text += detok.push(tid)
                for s in params.stop:
                    if s in text:
                        text, finish, reason = text[:text.index(s)], "stop", s
                        break
            if finish is None and len(out_ids) >= params.max_tokens:
                finish = "length"
            if finish is None and i == len(ids) - 1:
                text += detok.flush()
                finish = script.finish
            # hold back a possible stop-string beginning, as the engine does
            hold = 0
            if finish is None:
                for s in params.stop:
                    for k in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:k]):
                            hold = max(hold, k)
            visible = text[:len(text) - hold]
            new_text, emitted = visible[emitted:], len(visible)
            yield RequestOutput(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                                num_cached_tokens=script.cached, token_ids=list(out_ids), new_token_ids=[tid],
                                text=visible, new_text=new_text, finished=finish is not None,
                                finish_reason=finish, stop_reason=reason, index=index,
                                logprobs=None if params.logprobs is None else
                                [{t: _logprob(index, j)} for j, t in enumerate(out_ids)],
                                new_logprobs=None if params.logprobs is None else [{tid: _logprob(index, i)}])
            if finish is not None:
                return


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), chat_template="kimi-k2.6")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def live_server():
    """Start servers for apps: ``live_server(app)`` returns a LiveServer (stopped after the test)."""
    servers = []

    def start(app):
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@dataclass
class ScriptedSetup:
    engine: ScriptedEngine
    url: str
    api_key: str = "test-key"
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One server per module over a ScriptedEngine, API key ``test-key``, context of 4096 tokens."""
    from moonlet.server import create_app

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), chat_template="kimi-k2.6"))
    engine = ScriptedEngine(tok)
    app = create_app(engine, served_model_name="moonlet-test", api_key="test-key", max_body_bytes=2 * 2**20)
    with LiveServer(app) as server:
        yield ScriptedSetup(engine=engine, url=server.url)


@pytest.fixture()
def engine(scripted):
    scripted.engine.scripts.clear()
    scripted.engine.calls.clear()
    return scripted.engine


__all__ = ["Script", "ScriptedEngine", "EngineOverloadedError", "LiveServer"]
