"""What routes depend on: the app's state (settings, model pool, admission gate, metrics, URL fetcher) and the
API-key check. Annotated dependencies, so a route says `state: StateDep`.

They take an HTTPConnection, so WebSocket routes can use them too.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from halkspeech.api.fetch import URLFetcher
from halkspeech.api.limits import AdmissionGate
from halkspeech.api.metrics import Metrics
from halkspeech.config import Settings
from halkspeech.engine.pool import ModelPool


@dataclass(frozen=True)
class AppState:
    """Everything the routes share; built once by create_app."""

    settings: Settings
    pool: ModelPool
    gate: AdmissionGate
    metrics: Metrics
    fetcher: URLFetcher


def get_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.halkspeech
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def api_key_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would time the match)."""
    if presented is None:
        return False
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def bearer_token(connection: HTTPConnection) -> str | None:
    """The key from `Authorization: Bearer <key>` (or `X-API-Key: <key>`), if any."""
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key")


def require_api_key(connection: HTTPConnection, state: StateDep) -> None:
    """401 unless the server has no keys or the request carries one of them."""
    keys = state.settings.server.api_keys
    if not keys:
        return
    token = bearer_token(connection)
    if not api_key_valid(token, keys):
        reason = "missing API key: send 'Authorization: Bearer <key>'" if token is None else "invalid API key"
        raise HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


Authorized = Depends(require_api_key)
