"""moonlet's own server, started in-process for the agent: the engine (`moonlet.engine.AsyncLLM`) and
the app (`moonlet.server.app.create_app`) served by uvicorn on a free 127.0.0.1 port in a background
thread, so the agent talks to it over HTTP exactly as it would to a remote endpoint."""

from __future__ import annotations

import socket
import threading
import time


class LocalServer:
    def __init__(self, model_path: str | None = None, **engine_args):
        self.model_path = model_path
        self.engine_args = engine_args
        self.url = ""
        self.context_window: int | None = None
        self.model_name: str | None = None
        self.vision = False            # the served checkpoint takes images
        self._server = None
        self._thread = None

    def start(self, timeout: float = 600.0) -> str:
        try:
            import uvicorn

            from moonlet.engine import AsyncLLM
            from moonlet.server.app import create_app
        except ImportError as e:
            raise RuntimeError(f"moonlet's own server cannot be started in-process ({e}); pass --base-url URL to use a "
                               "running Anthropic-compatible endpoint instead") from e
        if self.model_path is None:
            from moonlet.assets import default_model_path
            self.model_path = str(default_model_path())  # FileNotFoundError says how to get it
        engine = AsyncLLM(self.model_path, start=False, **self.engine_args)
        self.context_window = int(engine.max_model_len)
        from moonlet.config import ModelConfig
        try:  # a checkpoint with a vision_config (K2.5 / K2.6) is served with its vision tower
            self.vision = ModelConfig.from_pretrained(self.model_path).vision_config is not None
        except Exception:
            self.vision = False
        app = create_app(engine, shutdown_engine_on_exit=True)
        self.model_name = app.state.moonlet.served_model_name
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="moonlet-local-server")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"moonlet's in-process server for {self.model_path} did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None
