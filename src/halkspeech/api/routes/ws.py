"""`/ws`: push-to-talk over one WebSocket, many turns per connection (protocol: docs/websocket.md).

This module only speaks the protocol: auth, the session limit, JSON parsing and validation, the idle
watchdog, and turning events into JSON. The turn logic is `transcription.streaming.LiveSession`.
`GET /ws` (plain HTTP) describes the protocol, so that /docs shows it: OpenAPI has no WebSockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, WebSocket
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from halkspeech.api.deps import api_key_valid, bearer_token, get_state
from halkspeech.audio.streaming import StreamingVAD
from halkspeech.config import ServerSettings
from halkspeech.errors import HalkSpeechError
from halkspeech.transcription.live import LiveEvent, StreamError, StreamLimits, StreamOptions
from halkspeech.transcription.streaming import LiveSession, ModelSource

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_LATER = 1000, 1008, 1013


class StartMessage(BaseModel):
    """`{"type": "start", ...}`: opens a turn. Unknown fields are refused (a typo should not pass silently)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    model: str | None = None
    sample_rate: int = 16_000
    partials: bool = False
    segment_silence_ms: int | None = None
    vad: bool = False

    def options(self) -> StreamOptions:
        return StreamOptions(
            language=self.language,
            task=self.task,
            sample_rate=self.sample_rate,
            partials=self.partials,
            segment_silence_ms=self.segment_silence_ms,
            vad=self.vad,
        )


class ProtocolError(HalkSpeechError):
    """A message that is not valid protocol: bad JSON, unknown type, bad fields."""

    code = "invalid_message"


@dataclass
class LiveHub:
    """What every live connection of one app shares: the session count and the batched streaming VAD."""

    sessions: int = 0
    vad: StreamingVAD = field(default_factory=StreamingVAD)


def live_hub(app: FastAPI) -> LiveHub:
    """The app's hub, made on first use (nothing is created at import or before a client connects)."""
    hub: LiveHub | None = getattr(app.state, "halkspeech_live", None)
    if hub is None:
        hub = app.state.halkspeech_live = LiveHub()
    return hub


def limits_from(server: ServerSettings) -> StreamLimits:
    return StreamLimits(max_turn_s=server.ws_max_turn_s, force_decode_tokens=server.force_decode_tokens)


@router.websocket("/ws")
async def live(websocket: WebSocket) -> None:
    state = get_state(websocket)
    server = state.settings.server
    hub = live_hub(websocket.app)
    await websocket.accept()
    keys = server.api_keys
    token = bearer_token(websocket) or websocket.query_params.get("token")
    if keys and not api_key_valid(token, keys):
        why = (
            "missing API key: send 'Authorization: Bearer <key>' or ?token=<key>"
            if token is None
            else "invalid API key"
        )
        await _refuse(websocket, "invalid_api_key", why, CLOSE_POLICY)
        return
    if hub.sessions >= server.ws_max_sessions:
        why = f"the server has its maximum of {server.ws_max_sessions} live sessions; try again later"
        await _refuse(websocket, "too_many_sessions", why, CLOSE_TRY_LATER)
        return
    hub.sessions += 1
    try:
        await Connection(websocket, state.pool.use, server, hub.vad).serve()
    finally:
        hub.sessions -= 1


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(StreamError(code, message).as_message())
        await websocket.close(close_code, message[:120])


class Connection:
    """One client: reads frames and messages, hands them to its LiveSession, writes its events."""

    def __init__(self, websocket: WebSocket, models: ModelSource, server: ServerSettings, vad: StreamingVAD) -> None:
        self.ws = websocket
        self.server = server
        self.session = LiveSession(models, limits_from(server), self.emit, vad)
        self.last_seen = time.monotonic()
        self._send_lock = asyncio.Lock()

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read())
        watchdog = asyncio.create_task(self._watch())
        try:
            await asyncio.wait([reader, watchdog], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watchdog):
                task.cancel()
            await asyncio.wait([reader, watchdog])  # not gather: it re-raises a child's CancelledError as ours
            await self.session.close()  # cancels open work: engine slots and buffers are freed now
            if self.ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await self.ws.close(CLOSE_NORMAL)

    async def emit(self, event: LiveEvent) -> None:
        """Send one event; a client that is gone is not an error here (the reader sees the disconnect)."""
        text = json.dumps(event.as_message(), ensure_ascii=False)
        async with self._send_lock:
            if self.ws.client_state != WebSocketState.CONNECTED:
                return
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.send_text(text)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.last_seen = time.monotonic()
            turn = self.session.turn.turn if self.session.turn is not None else None
            try:
                if message.get("bytes") is not None:
                    self.session.feed(message["bytes"])
                elif message.get("text") is not None:
                    await self._control(message["text"])
            except HalkSpeechError as exc:
                await self.emit(StreamError(exc.code, str(exc), turn))

    async def _control(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            raise ProtocolError('text frames must be JSON objects such as {"type": "start"}') from None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "start":
            start = _validated(data)
            await self.session.start(start.options(), start.model)
        elif kind == "end":
            self.session.end()
        else:
            raise ProtocolError(
                f"unknown message type {kind!r}: expected 'start' or 'end' (audio goes in binary frames)"
            )

    async def _watch(self) -> None:
        """Ends over-long turns and closes idle connections; returns when the connection should close."""
        idle = self.server.ws_idle_timeout_s
        tick = max(0.05, min(1.0, idle / 4, self.server.ws_max_turn_s / 4))
        while True:
            await asyncio.sleep(tick)
            await self.session.expire()
            if not self.session.finishing and time.monotonic() - self.last_seen > idle:
                await self.emit(StreamError("idle_timeout", f"no message for {idle:g} s; closing the connection"))
                return


def _validated(data: dict[str, Any]) -> StartMessage:
    try:
        return StartMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise ProtocolError(f"unknown field {where!r} in start") from None
        raise ProtocolError(f"invalid value for {where!r} in start: {first.get('msg')}") from None


PROTOCOL: dict[str, Any] = {
    "endpoint": "ws://HOST:PORT/ws (wss:// behind TLS); auth: 'Authorization: Bearer <key>' or ?token=<key>",
    "client_to_server": {
        "start": {
            "type": "start",
            "language": "ISO 639-1 code or null (detect)",
            "task": "transcribe | translate",
            "model": "model name or null (the server's default)",
            "sample_rate": "Hz of the PCM that follows, 8000-192000 (default 16000)",
            "partials": "bool: send partial results while audio arrives",
            "segment_silence_ms": "int 100-30000 or null: a pause this long ends a segment (server VAD)",
            "vad": "bool: skip audio without speech (server VAD)",
        },
        "binary frames": "16-bit little-endian mono PCM at sample_rate, any length (20 ms is typical)",
        "end": {"type": "end"},
    },
    "server_to_client": {
        "started": ["turn", "model", "sample_rate"],
        "partial": ["turn", "text", "stable_text (only grows)", "audio_s"],
        "segment": ["turn", "id", "start", "end", "text", "language", "segments"],
        "final": ["turn", "text", "language", "duration", "segments", "timings_ms"],
        "error": ["code", "message", "turn (when about one)"],
    },
    "docs": "docs/websocket.md in the repository, or the README's WebSocket section",
}


@router.get("/ws", summary="WebSocket push-to-talk protocol (open /ws as a WebSocket to use it)")
async def protocol() -> dict[str, Any]:
    """Describes `/ws`, which OpenAPI cannot show. Connect with a WebSocket client to the same path:

    1. send `{"type": "start", "language": "en", "partials": true}`;
    2. send the audio as binary frames of 16-bit little-endian mono PCM (16 kHz unless `sample_rate` says
       otherwise), 20 ms each or any other size;
    3. send `{"type": "end"}` and read `{"type": "final", "text": ...}`; start the next turn on the same
       connection whenever you like.

    While audio arrives the server may send `partial` (with `partials: true`) and `segment` (with
    `segment_silence_ms`) messages; anything wrong yields `{"type": "error", "code", "message"}` and the
    connection stays usable. Every server message carries the `turn` number it belongs to.
    """
    return PROTOCOL
