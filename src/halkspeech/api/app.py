"""The HTTP app, built by a factory: `create_app(settings, pool)`. Nothing is created at import, so tests and
benchmarks hand in their own settings and model pool.

Served by uvicorn (`halkspeech serve`). The app owns the pool once served: its lifespan starts the idle
reaper, loads `server.preload`, watches the event loop's lag, and closes every engine at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from halkspeech import __version__
from halkspeech.api.deps import APIKeyMiddleware, AppState
from halkspeech.api.errors import UnexpectedErrorMiddleware, install_error_handlers
from halkspeech.api.fetch import URLFetcher
from halkspeech.api.limits import AdmissionGate, BodyLimitMiddleware, keep_uploads_in_memory
from halkspeech.api.logging import RequestContextMiddleware
from halkspeech.api.loop_lag import watch_loop_lag
from halkspeech.api.metrics import Metrics, MetricsMiddleware
from halkspeech.api.routes import health, metrics, models, openai, realtime, simple, triton, ws
from halkspeech.api.triton_stats import TritonStats
from halkspeech.config import Settings
from halkspeech.engine.pool import ModelPool
from halkspeech.transcription.word_workers import word_executor

# Multipart framing around the file (boundaries, part headers, the small form fields) on top of max_upload_mb.
_FORM_OVERHEAD = 64 * 1024

_DESCRIPTION = """Fast self-hosted Whisper: the OpenAI audio API (`/v1/audio/transcriptions`, `/v1/audio/translations`,
`/v1/models`), the simple `/transcribe` API, Triton's HTTP API (`/v2`, KServe v2) for TensorRT-LLM's Whisper
clients, Prometheus `/metrics` and `/health`. Requests from every client share the GPU's batches. Send
`Authorization: Bearer <key>` when the server has API keys.

Live speech: a WebSocket push-to-talk protocol at `/ws` (partial results, pause segments, finals at once), and OpenAI's
Realtime API for transcription at `/v1/realtime`; OpenAPI cannot describe WebSockets, so `GET /ws` and
`GET /v1/realtime` (tag *live*) explain them."""


def create_app(settings: Settings, pool: ModelPool) -> FastAPI:
    server = settings.server
    gate = AdmissionGate(server.max_concurrent_requests, server.max_queue_size, retry_after_s=server.retry_after_s)
    stats = TritonStats()  # the Triton APIs' statistics, which /metrics also reads
    state = AppState(settings, pool, gate, Metrics(pool, gate, stats), URLFetcher(server), triton_stats=stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.start()
        await pool.preload()
        for loaded in pool.loaded():  # word timing's workers start with the server, not at the first request
            word_executor(loaded.model.word_processes)
        interval_s = server.loop_lag_interval_ms / 1000
        lag = asyncio.create_task(watch_loop_lag(state.metrics.loop_lag.observe, interval_s)) if interval_s else None
        try:
            yield
        finally:
            if lag is not None:
                lag.cancel()
            await pool.close()

    app = FastAPI(title="HalkSpeech", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.halkspeech = state
    install_error_handlers(app)

    app.include_router(openai.router)
    app.include_router(simple.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(triton.router)  # Triton's HTTP API (KServe v2) for TensorRT-LLM's Whisper clients
    app.include_router(triton.health_router)
    # --- WebSocket push-to-talk (api/routes/ws.py): `app.include_router(ws.router)` goes on the next line ---
    app.include_router(ws.router)  # checks API keys itself (header or ?token=); GET /ws, the protocol, is open
    app.include_router(realtime.router)  # likewise (OpenAI's Realtime API for transcription at /v1/realtime)

    # API keys guard these routers' routes (not /health, /docs, /openapi.json, /ws), checked before the body is read.
    protected = [openai.router, simple.router, models.router, triton.router]
    protected += [] if server.metrics_open else [metrics.router]

    keep_uploads_in_memory(int(server.upload_memory_mb * 1e6))
    # Outermost last: the request id wraps everything, then the 500 for a bug (inside it, so it carries the
    # id), metrics, the API key, and the body limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_upload_mb=server.max_upload_mb,
        overhead=_FORM_OVERHEAD,
        idle_timeout_s=server.body_idle_timeout_s,
        min_rate=server.body_min_rate_bytes_s,
    )
    app.add_middleware(APIKeyMiddleware, server=server, routes=[r for router in protected for r in router.routes])
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(UnexpectedErrorMiddleware, stopping=state.stopping)
    app.add_middleware(RequestContextMiddleware, access_log=server.access_log)
    return app
