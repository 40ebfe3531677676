"""HTTP API test helpers: the real app under a real uvicorn server on a free port, in a thread, one per module.

Every server hands out one session-wide tiny.en engine (loading it costs seconds; sharing it keeps the suite
short). Its pools see a borrowed copy whose close() does nothing, so unloading or shutting a server down never
stops the engine the other modules use. Other models (base) load for real, and close with their server.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from halkspeech.api.app import create_app
from halkspeech.api.server import Server, uvicorn_config
from halkspeech.config import EngineSettings, ModelSettings, ServerSettings, Settings
from halkspeech.engine.engine import Engine
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.pool import ModelPool
from halkspeech.model.registry import ModelRegistry


@dataclasses.dataclass
class BorrowedEngine(ModelEngine):
    """A session-owned engine lent to a pool: closing it is the session's business."""

    def close(self) -> None:
        pass


@pytest.fixture(scope="session")
def shared_tiny_en() -> Iterator[ModelEngine]:
    settings = api_settings()
    model = start_engine(ModelRegistry(settings.model).load("tiny.en"), settings.engine)
    yield model
    model.close()


def api_settings(default: str = "tiny.en", **server: Any) -> Settings:
    """Settings for a test server: CPU, no downloads (only the cached real models), `server` overrides. The
    heap is not frozen after loads (a full collection each, ~0.3 s, for hundreds of test servers) unless a test
    asks for it (tests/engine/test_pool.py does)."""
    return Settings(
        model=ModelSettings(default=default, allow_download=False),
        engine=EngineSettings(device="cpu"),
        server=ServerSettings(**{"freeze_heap": False, **server}),
    )


def lending_loader(settings: Settings, shared: ModelEngine) -> Callable[[str], ModelEngine]:
    registry = ModelRegistry(settings.model)

    def load(key: str) -> ModelEngine:
        if key == "tiny.en":
            return BorrowedEngine(**{f.name: getattr(shared, f.name) for f in dataclasses.fields(ModelEngine)})
        return start_engine(registry.load(key), settings.engine)

    return load


class LiveServer:
    """uvicorn serving create_app(settings, pool) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, settings: Settings, shared: ModelEngine, *, lifespan: bool = False) -> None:
        self.settings = settings
        self.lifespan = lifespan
        self.pool = ModelPool(settings, ModelRegistry(settings.model), loader=lending_loader(settings, shared))
        self.app = create_app(settings, self.pool)
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn_config(self.app, settings.server, lifespan="on" if lifespan else "off", timeout_keep_alive=30)
        self._server = Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> LiveServer:
        if not self.lifespan:  # else the lifespan preloads
            self.pool.load_now()
        self._thread.start()
        deadline = time.monotonic() + 60
        grpc = self.settings.server.grpc_port is not None  # started after HTTP (api/server.py): wait for it too
        while not self._server.started or (grpc and self._server.grpc is None):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()
        self.pool.close_now()

    def engine(self, name: str = "tiny.en") -> Engine:
        """The engine behind a loaded model (its stats, running, queue_depth)."""
        for item in self.pool.loaded():
            if item.name == name:
                return item.model.engine
        raise LookupError(f"{name} is not loaded")


@contextmanager
def live_server(settings: Settings, shared: ModelEngine, *, lifespan: bool = False) -> Iterator[LiveServer]:
    server = LiveServer(settings, shared, lifespan=lifespan).start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll (a bound, not a timing assertion: slow machines only wait longer)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.05)
