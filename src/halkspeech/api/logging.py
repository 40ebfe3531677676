"""Structured logs (JSON lines or key=value pairs) and the request id that ties a request's lines together.

Every HTTP request gets an id: the client's `X-Request-ID` if it is sane (1-128 characters of [A-Za-z0-9._:-]),
else a fresh one. It is returned in the `X-Request-ID` header and added to every log line written while the
request runs (a context variable, so it follows the request into its tasks).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_REQUEST_ID: ContextVar[str | None] = ContextVar("halkspeech_request_id", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_access = logging.getLogger("halkspeech.access")

# LogRecord attributes that are not extra fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


def request_id() -> str | None:
    """The id of the request being handled, if any."""
    return _REQUEST_ID.get()


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    if (rid := _REQUEST_ID.get()) is not None:
        fields.setdefault("request_id", rid)
    return fields


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=info logger=... msg="..." request_id=... key=value`."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra_fields(record),
        }
        text = " ".join(f"{k}={_kv(v)}" for k, v in pairs.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _kv(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"']*")


class RedactTokens(logging.Filter):
    """Masks `?token=<key>` (the WebSocket's API key for clients that cannot set headers) in log lines:
    uvicorn logs every WebSocket's path with its query string ("WebSocket /ws?token=..." [accepted])."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = _TOKEN_IN_QUERY.sub(r"\1***", message), None
        return True


def configure_logging(level: str = "info", fmt: Literal["json", "text"] = "json") -> None:
    """Send every log line (ours, uvicorn's) to stderr in one format, API keys in URLs masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # A malformed upload is the client's mistake, answered with a 400; the parser's own warning is noise.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


class RequestContextMiddleware:
    """Assigns the request id, returns it as `X-Request-ID`, and writes one access line per request."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        token = _REQUEST_ID.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log and scope["type"] == "http":
                client = scope.get("client")
                _access.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    },
                )
            _REQUEST_ID.reset(token)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.fullmatch(text) else None
    return None
