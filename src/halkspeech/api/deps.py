"""What routes depend on: the app's state (settings, model pool, admission gate, metrics, URL fetcher, Triton's
statistics), as an Annotated dependency (a route says `state: StateDep`), and the API-key check.

The key check is a middleware, not a dependency: FastAPI reads and parses a request's whole body before it
runs any dependency, and a client without a key must not make the server receive an upload. The helpers take
an HTTPConnection, so the WebSocket route checks keys with them too.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection, Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from halkspeech.api.errors import error_response
from halkspeech.api.fetch import URLFetcher
from halkspeech.api.limits import AdmissionGate
from halkspeech.api.metrics import Metrics
from halkspeech.api.stopping import StopSignal
from halkspeech.api.triton_stats import TritonStats
from halkspeech.config import ServerSettings, Settings
from halkspeech.engine.pool import ModelPool


@dataclass(frozen=True)
class AppState:
    """Everything the routes share; built once by create_app."""

    settings: Settings
    pool: ModelPool
    gate: AdmissionGate
    metrics: Metrics
    fetcher: URLFetcher
    #: Triton's statistics of its model (api/triton_stats.py), over HTTP and gRPC
    triton_stats: TritonStats = field(default_factory=TritonStats)
    #: set by the server's shutdown when what is still running must be answered now (api/server.py)
    stopping: StopSignal = field(default_factory=StopSignal)


def get_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.halkspeech
    return state


async def _state_dependency(connection: HTTPConnection) -> AppState:
    # async: FastAPI runs a plain `def` dependency on a worker thread, a hop every request would pay for an
    # attribute read (under load, waiting for a thread and then for the GIL: bench/http_host.py)
    return get_state(connection)


StateDep = Annotated[AppState, Depends(_state_dependency)]


def api_key_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would time the match)."""
    if not presented:  # no key, or an empty one: never a match (settings refuse blank keys too)
        return False
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def presented_key(authorization: str, x_api_key: str) -> str | None:
    """The key from an `Authorization: Bearer <key>` value (or an `X-API-Key: <key>` one), if any: HTTP headers
    and gRPC metadata alike."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return x_api_key.strip() or None


def bearer_token(connection: HTTPConnection) -> str | None:
    """The key from `Authorization: Bearer <key>` (or `X-API-Key: <key>`), if any."""
    return presented_key(connection.headers.get("authorization", ""), connection.headers.get("x-api-key", ""))


def key_refusal(token: str | None, keys: list[str], send: str = "Authorization: Bearer <key>") -> str | None:
    """Why a request with `token` may not pass (no key, a wrong key), or None: it carries a key, or the server
    has none. `send`: how the client should send one."""
    if not keys or api_key_valid(token, keys):
        return None
    return f"missing API key: send '{send}'" if token is None else "invalid API key"


def api_key_refusal(connection: HTTPConnection, keys: list[str]) -> str | None:
    """Why the request may not pass (no key, a wrong key), or None: it carries a key, or the server has none."""
    return key_refusal(bearer_token(connection), keys)


class APIKeyMiddleware:
    """401 for a request to one of `routes` without a valid key (`server.api_keys`; none: every request
    passes), before anything reads its body. Other routes (/health, /docs, /openapi.json, /ws) are open."""

    def __init__(self, app: ASGIApp, *, server: ServerSettings, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.server = server
        self.routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.server.api_keys:
            await self.app(scope, receive, send)
            return
        route = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        reason = api_key_refusal(HTTPConnection(scope), self.server.api_keys) if route is not None else None
        if reason is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as the router would: the metrics count the refusal under the route's path
        headers = {"WWW-Authenticate": "Bearer"}
        response = error_response(Request(scope), 401, reason, code="invalid_api_key", headers=headers)
        await response(scope, receive, send)
