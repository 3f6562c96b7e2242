"""AsyncLLM: the engine for asyncio code (the HTTP server). The engine loop runs on its own thread;
requests and aborts reach it through a command queue, outputs come back through per-request
asyncio queues on the caller's event loop."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import uuid
from typing import AsyncIterator

from .core import EngineCore, build_engine
from .errors import EngineDeadError, EngineOverloadedError
from .multimodal import MultimodalPrompt
from .params import SamplingParams
from .sequence import RequestOutput

logger = logging.getLogger(__name__)

# The engine thread waits this long for work before checking for shutdown again.
_IDLE_WAIT_S = 0.5


class _Stream:
    """Where one request's outputs go: an asyncio queue on the event loop that asked for them."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the caller's loop is closed; nobody is listening
            return False


class AsyncLLM:
    """Asyncio-facing engine. Same constructor as ``LLM``; ``start=False`` defers starting the loop.

    ``generate`` is an async generator of RequestOutputs (deltas in ``new_token_ids``/``new_text``,
    the last one has ``finished=True``). Errors about the request itself (PromptTooLongError,
    ValueError, EngineOverloadedError) are raised at the first iteration, before any output. Leaving
    the iteration early (break, cancellation, aclose) aborts the request and frees its blocks.
    A request with ``params.n > 1`` yields the outputs of its n samples interleaved as the engine
    makes them, each with its ``index``; the iteration ends after every sample's last output, and
    leaving it early (or ``abort``) aborts all of them.
    """

    def __init__(self, model_path=None, *, model=None, tokenizer=None, start: bool = True, **engine_args):
        self.engine: EngineCore = build_engine(model_path, model, tokenizer, **engine_args)
        self._commands: collections.deque = collections.deque()
        self._lock = threading.Lock()  # guards _commands, _streams, _queued_adds
        self._streams: dict[str, _Stream] = {}
        self._queued_adds = 0
        self._wakeup = threading.Event()
        self._stop = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats = self.engine.stats()
        self._ids = itertools.count()
        self._loras = self.engine.list_loras()  # {name: path}, replaced after each add_lora / remove_lora
        if start:
            self.start()

    # ---- properties -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """The engine's counters as of its last step (keys as in ``EngineCore.stats``), plus
        ``engine_alive``."""
        stats = dict(self._stats)
        stats["engine_alive"] = self.is_running
        return stats

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent). Requests submitted before it wait in the queue."""
        if self._error is not None or self._closed:
            raise EngineDeadError("cannot restart the engine: " + (f"it failed: {self._error!r}" if self._error
                                                                   else "it was shut down"))
        if self.is_running:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moonlet-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight end with EngineDeadError and their blocks
        are freed."""
        self._closed = True
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))
        if not self.is_running:  # only touch the engine once its thread is gone
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
            self._stats = self.engine.stats()
            self.engine.close()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests -------------------------------------------------------------------------------
    @property
    def supports_images(self) -> bool:
        return self.engine.supports_images

    def prepare_prompt(self, prompt_token_ids, images) -> MultimodalPrompt:
        """``EngineCore.prepare_prompt``: CPU work, callable from any thread (run it in a worker thread
        for large images)."""
        return self.engine.prepare_prompt(prompt_token_ids, images)

    async def generate(self, prompt_token_ids, params: SamplingParams | None = None,
                       request_id: str | None = None, images=None) -> AsyncIterator[RequestOutput]:
        """``prompt_token_ids``: token ids or a ``MultimodalPrompt``; ``images`` (vision models): the
        images for the prompt's placeholder runs, prepared here, on the caller's thread. A request with
        a structured-output constraint is checked — its grammar compiled — in a worker thread, so
        other streams on this event loop go on meanwhile; the engine thread then finds it cached."""
        params = params if params is not None else SamplingParams()
        if images:
            prompt_token_ids = self.engine.prepare_prompt(prompt_token_ids, images)
        if params.structured is not None:  # compiling a new grammar takes a while: not on the event loop
            ids = await asyncio.to_thread(self.engine.check_request, prompt_token_ids, params)
        else:
            ids = self.engine.check_request(prompt_token_ids, params)
        if isinstance(prompt_token_ids, MultimodalPrompt):
            ids = prompt_token_ids  # the engine thread runs the vision tower on it
        if self._error is not None or self._closed:
            raise EngineDeadError("the engine is not running: " + (f"it failed: {self._error!r}" if self._error
                                                                   else "it was shut down"))
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            # waiting sequences: queued, parked samples (n > 1) and requests not yet handed to the engine
            waiting = len(self.engine.scheduler.waiting) + self.engine.scheduler.num_parked + self._queued_adds
            if waiting >= self.engine.config.max_waiting:
                raise EngineOverloadedError(waiting, self.engine.config.max_waiting)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._commands.append(("add", request_id, ids, params))
            self._queued_adds += params.n  # sequences: each sample waits as one
        self._wakeup.set()
        finished = False
        running = set(range(params.n))  # samples not finished yet
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    running.discard(item.index)
                finished = not running
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit_abort(request_id)
            with self._lock:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]

    # ---- LoRA adapters (multi-LoRA serving) ------------------------------------------------------
    async def add_lora(self, name: str, path) -> None:
        """``EngineCore.add_lora`` on the engine thread (between steps); ValueError as it raises."""
        await self._call(self.engine.add_lora, name, str(path))

    async def remove_lora(self, name: str) -> None:
        """``EngineCore.remove_lora`` on the engine thread; ValueError when unknown or in use."""
        await self._call(self.engine.remove_lora, name)

    @property
    def lora_enabled(self) -> bool:
        """Whether this engine serves LoRA adapters unmerged (enable_lora / lora_modules)."""
        return self.engine.lora is not None

    def list_loras(self) -> dict[str, str]:
        """{name: adapter directory} of the registered adapters (as of the last add / remove)."""
        return dict(self._loras)

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread between steps (directly when the thread is not running)
        and refresh the adapter list."""
        if not self.is_running:
            result = fn(*args)
        else:
            future: concurrent.futures.Future = concurrent.futures.Future()
            with self._lock:
                self._commands.append(("call", fn, args, future))
            self._wakeup.set()
            result = await asyncio.wrap_future(future)
        self._loras = self.engine.list_loras()
        return result

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or finished). Its stream gets a final output with
        finish_reason 'abort' for each of its samples still going."""
        self._submit_abort(request_id)

    async def abort_sample(self, request_id: str, index: int) -> None:
        """Stop sample ``index`` of a request with ``n > 1`` (no-op if unknown or finished); its stream
        gets that sample's final output with finish_reason 'abort', the other samples go on."""
        with self._lock:
            self._commands.append(("abort_sample", request_id, index))
        self._wakeup.set()

    def _submit_abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wakeup.set()

    # ---- the engine thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None and not stream.put(item):
            with self._lock:
                self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
                if cmd[0] == "add":
                    self._queued_adds -= cmd[3].n
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                try:
                    self.engine.add_request(rid, ids, params)
                except Exception as e:  # noqa: BLE001 - reported to the caller, the engine goes on
                    self._deliver(rid, e)
            elif cmd[0] == "call":
                _, fn, args, future = cmd
                try:
                    future.set_result(fn(*args))
                except Exception as e:  # noqa: BLE001 - the caller's error, the engine goes on
                    future.set_exception(e)
            elif cmd[0] == "abort_sample":
                out = self.engine.abort_sample(cmd[1], cmd[2])
                if out is not None:
                    self._deliver(cmd[1], out)
            else:
                for out in self.engine.abort_samples(cmd[1]):
                    self._deliver(cmd[1], out)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._drain_commands()
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                for out in engine.step():
                    self._deliver(out.request_id, out)
                self._stats = engine.stats()
        except BaseException as e:  # noqa: BLE001 - a crashed loop must not leave callers waiting
            logger.exception("the engine loop failed; failing all open requests")
            self._error = e
            self._fail_all(EngineDeadError(f"the engine loop failed: {e!r}"))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
            commands = list(self._commands)
            self._commands.clear()
            self._queued_adds = 0
        for _, stream in streams:
            stream.put(error)
        for cmd in commands:
            if cmd[0] == "call" and not cmd[3].done():
                cmd[3].set_exception(error)
