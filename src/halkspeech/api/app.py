"""The HTTP app, built by a factory: `create_app(settings, pool)`. Nothing is created at import, so tests and
benchmarks hand in their own settings and model pool.

Served by uvicorn (`halkspeech serve`). The app owns the pool once served: its lifespan starts the idle
reaper, loads `server.preload`, and closes every engine at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from halkspeech import __version__
from halkspeech.api.deps import AppState, Authorized
from halkspeech.api.errors import install_error_handlers
from halkspeech.api.fetch import URLFetcher
from halkspeech.api.limits import AdmissionGate, BodyLimitMiddleware
from halkspeech.api.logging import RequestContextMiddleware
from halkspeech.api.metrics import Metrics, MetricsMiddleware
from halkspeech.api.routes import health, metrics, models, openai, simple, ws
from halkspeech.config import Settings
from halkspeech.engine.pool import ModelPool
from halkspeech.transcription.word_workers import word_executor

# Multipart framing around the file (boundaries, part headers, the small form fields) on top of max_upload_mb.
_FORM_OVERHEAD = 64 * 1024

_DESCRIPTION = """Fast self-hosted Whisper: the OpenAI audio API (`/v1/audio/transcriptions`, `/v1/audio/translations`,
`/v1/models`), the simple `/transcribe` API, Prometheus `/metrics` and `/health`. Requests from every client share
the GPU's batches. Send `Authorization: Bearer <key>` when the server has API keys.

Live speech: a WebSocket push-to-talk protocol at `/ws` (partial results, pause segments, finals at once); OpenAPI
cannot describe WebSockets, so `GET /ws` (tag *live*) explains it."""


def create_app(settings: Settings, pool: ModelPool) -> FastAPI:
    server = settings.server
    gate = AdmissionGate(server.max_concurrent_requests, server.max_queue_size, retry_after_s=server.retry_after_s)
    state = AppState(settings, pool, gate, Metrics(pool, gate), URLFetcher(server))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.start()
        await pool.preload()
        for loaded in pool.loaded():  # word timing's workers start with the server, not at the first request
            word_executor(loaded.model.word_processes)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="HalkSpeech", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.halkspeech = state
    install_error_handlers(app)

    auth = [Authorized] if server.api_keys else []
    app.include_router(openai.router, dependencies=auth)
    app.include_router(simple.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=[] if server.metrics_open else auth)
    # --- WebSocket push-to-talk (api/routes/ws.py): `app.include_router(ws.router)` goes on the next line ---
    app.include_router(ws.router)  # checks API keys itself (header or ?token=); GET /ws, the protocol, is open

    # Outermost last: the request id wraps everything, then metrics, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(server.max_upload_mb * 1e6) + _FORM_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestContextMiddleware, access_log=server.access_log)
    return app
