"""Domain errors and framework errors → HTTP status codes and OpenAI's error body.

Every error answer has the shape OpenAI's clients parse, `{"error": {"message", "type", "param", "code"}}`;
routes outside /v1 add `"detail"` (the message again), which FastAPI-style clients read. Nothing a client
sends may produce a 500: bad input is a 4xx whose message says what to fix. A bug still answers a 500 of that
shape, from UnexpectedErrorMiddleware: with the request id, logged once, and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from halkspeech.api.logging import request_id
from halkspeech.api.stopping import STOPPED, StopSignal
from halkspeech.errors import (
    AudioDecodeError,
    AudioTooLong,
    Cancelled,
    EngineStopped,
    HalkSpeechError,
    InvalidRequest,
    ModelInUse,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    URLFetchError,
)

log = logging.getLogger(__name__)

# First match wins, so subclasses come before their bases.
_STATUS: tuple[tuple[type[HalkSpeechError], int], ...] = (
    (AudioTooLong, 413),
    (PayloadTooLarge, 413),
    (AudioDecodeError, 400),
    (InvalidRequest, 400),
    (URLFetchError, 400),
    (ModelNotFound, 404),
    (ModelInUse, 409),
    (ModelLoadError, 422),  # the named files exist but are not a loadable Whisper model
    (Overloaded, 429),
    (RequestTimeout, 504),
    (EngineStopped, 503),
    (Cancelled, 499),  # nginx's "client closed request": the client is gone and never reads it
)


def status_for(exc: HalkSpeechError) -> int:
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 400)


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_fields(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    """OpenAI's error object: `{"message", "type", "param", "code"}`."""
    return {"message": message, "type": _error_type(status), "param": param, "code": code}


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):  # Triton's form, as tritonclient reads
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body: dict[str, Any] = {"error": error_fields(status, message, code, param)}
    if not request.url.path.startswith("/v1/"):
        body["detail"] = message
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HalkSpeechError)
    status = status_for(exc)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if status >= 500:
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(request, status, str(exc), code=exc.code, param=exc.param, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's field errors → one line naming the field; 400 on /v1 (as OpenAI), 422 elsewhere (FastAPI's)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    kind = first.get("type")
    param = location[0] if location and kind != "json_invalid" else None  # a JSON error's loc is a byte offset
    if kind == "missing":
        message = f"the field {param!r} is required" if param else "the request has no body; send a JSON object"
    elif kind == "json_invalid":
        message = "the request body is not valid JSON"
    elif param == "file":
        message = "the field 'file' must be a file upload (a multipart part with a filename), not text"
    elif param:
        message = f"invalid value for {param!r}: {first.get('msg', 'invalid')}"
    else:
        message = f"the request body is invalid: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    status = 400 if request.url.path.startswith("/v1/") else 422
    return error_response(request, status, message, code="invalid_value", param=param)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    messages = {
        404: f"no route {request.url.path}",
        405: f"method {request.method} is not allowed on {request.url.path}",
        413: "the request body is larger than the upload limit",
    }
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code in messages and detail in (None, "Not Found", "Method Not Allowed", "Content Too Large"):
        detail = messages[exc.status_code]
    if exc.status_code == 400 and detail and detail.startswith("Part exceeded maximum size"):
        # Starlette's limit on a non-file part: which part it was, it does not say
        detail = f"a text field of the form (such as 'prompt') is too long: {detail[5:].rstrip('.')}"
    elif exc.status_code == 400 and detail and ("multipart" in detail.lower() or "parsing the body" in detail):
        # Starlette's "Invalid multipart data." alone does not say what a client should send instead
        if "json" in request.headers.get("content-type", "").lower():  # FastAPI's answer to undecodable bytes
            # FastAPI does not say which: bytes that are not UTF-8, nesting deeper than the parser recurses, or an
            # integer longer than Python converts (sys.get_int_max_str_digits(); 0 is no limit)
            digits = sys.get_int_max_str_digits()
            detail = "the request body is not valid JSON (it must be UTF-8 text, not nested too deeply" + (
                f", its integers at most {digits} digits)" if digits else ")"
            )
        else:
            detail = (
                f"the upload could not be parsed ({detail.rstrip('.')}): send multipart/form-data with a 'file' part"
            )
    code = {401: "invalid_api_key", 408: "body_timeout", 413: "payload_too_large", 499: Cancelled.code}.get(
        exc.status_code
    )
    return error_response(request, exc.status_code, detail or "request failed", code=code, headers=exc.headers)


def _internal_error(request: Request) -> JSONResponse:
    rid = request_id()
    message = f"internal server error (request id {rid}); the server log has the details"
    if rid is None:
        message = "internal server error; the server log has the details"
    return error_response(request, 500, message, code="internal_error")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The last resort, in Starlette's outermost middleware: only for errors UnexpectedErrorMiddleware missed."""
    log.error("unhandled error", exc_info=exc)
    return _internal_error(request)


class UnexpectedErrorMiddleware:
    """Any other exception → a 500 of the usual shape, answered inside the request-id middleware (so it carries
    the id, in the body and as X-Request-ID), with the traceback logged once. The exception ends here: the
    server sees a complete response and keeps the connection open for the client's next request.

    Once a response has started (a stream) no 500 can be sent: the traceback is logged all the same, and the
    server, seeing the response unfinished, closes the connection, which tells the client it is incomplete.

    A request the server's shutdown cancels once `stopping` is set (one that did not watch it, e.g. an upload
    still arriving) is answered 503 engine_stopped here, instead of uvicorn's bare 500 and its traceback."""

    def __init__(self, app: ASGIApp, stopping: StopSignal | None = None) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if started or self.stopping is None or not self.stopping.is_set:
                raise
            # the request task ends here, answered: nothing else is waiting on this cancellation
            await error_response(Request(scope), 503, STOPPED, code=EngineStopped.code)(scope, receive, send)
        except Exception:
            log.exception("unhandled error")
            if not started:
                await _internal_error(Request(scope))(scope, receive, send)


def document_validation_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI schema say what _validation_error answers. FastAPI documents a 422 with its own body
    (HTTPValidationError) for every operation with parameters; here /v1 answers 400 (documented by the routes)
    and the other routes 422, both in the error body. Changes `schema` in place and returns it."""
    generated = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            auto = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema")
            if auto != generated:
                continue
            if path.startswith("/v1/"):
                del responses["422"]
            else:
                responses["422"] = {
                    "description": "A malformed field or body",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(schema.get("paths", {})):
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's, referenced by nothing now
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HalkSpeechError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_validation_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
