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
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from halkspeech.api.deps import api_key_valid, bearer_token, get_state
from halkspeech.api.jobs import check_options
from halkspeech.api.metrics import Metrics
from halkspeech.api.schemas import MAX_HOTWORDS_CHARS
from halkspeech.audio.streaming import StreamingVAD
from halkspeech.config import ServerSettings
from halkspeech.errors import HalkSpeechError
from halkspeech.transcription.live import Final, LiveEvent, StreamError, StreamLimits, StreamOptions, TurnStarted
from halkspeech.transcription.streaming import LiveSession, ModelSource

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_LATER = 1000, 1001, 1008, 1011, 1013

#: Text messages are control messages of a few hundred bytes; a cap keeps a hostile one from costing the JSON
#: parser (and the event loop) seconds. Audio goes in binary frames, whose size `max_frame_bytes` bounds.
MAX_TEXT_CHARS = 64 * 1024
#: Room above a whole turn's PCM in one frame, so a client that sends a turn as one frame is not cut at a
#: round number by a few bytes.
FRAME_MARGIN_BYTES = 1 << 20
#: The sample rate a whole-turn frame is sized for: 48 kHz, the highest rate microphones and browsers commonly
#: send. Sized for 192 kHz a frame could be 116 MB at the default turn length, held whole in memory per
#: connection while it is read; a client at a higher rate sends its turn in more than one frame.
FRAME_SIZING_RATE = 48_000


def max_frame_bytes(server: ServerSettings) -> int:
    """The largest WebSocket message the server reads (uvicorn's `ws_max_size`, set by `halkspeech serve`): a
    whole turn of 16-bit PCM at 48 kHz, plus a margin. A bigger frame is closed by uvicorn with 1009; one up
    to this size that holds more than the turn can take ends the turn with `audio_too_long`."""
    return math.ceil(server.ws_max_turn_s * FRAME_SIZING_RATE) * 2 + FRAME_MARGIN_BYTES


class StartMessage(BaseModel):
    """`{"type": "start", ...}`: opens a turn. Unknown fields are refused (a typo should not pass silently), and
    so are values of another JSON type (strict: "yes" or 1 is not a boolean, "16000" not a rate)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["start"]
    language: str | None = Field(None, max_length=64)  # a code or a name; never echo a client's megabyte back
    task: Literal["transcribe", "translate"] = "transcribe"
    model: str | None = None
    sample_rate: int = 16_000
    partials: bool = False
    segment_silence_ms: int | None = None
    vad: bool = False
    hotwords: str | None = Field(None, max_length=MAX_HOTWORDS_CHARS)

    def options(self) -> StreamOptions:
        return StreamOptions(
            language=self.language,
            task=self.task,
            sample_rate=self.sample_rate,
            partials=self.partials,
            segment_silence_ms=self.segment_silence_ms,
            vad=self.vad,
            hotwords=self.hotwords or None,
        )


class ProtocolError(HalkSpeechError):
    """A message that is not valid protocol: bad JSON, unknown type, bad fields."""

    code = "invalid_message"


@dataclass
class LiveHub:
    """What every live connection of one app shares: the open connections and the batched streaming VAD."""

    connections: set[Connection] = field(default_factory=set)
    vad: StreamingVAD = field(default_factory=StreamingVAD)

    async def shut_down(self) -> None:
        """The server is stopping: every connection ends its open turn, sends its pending finals and then
        `engine_stopped`, and closes (1001). The caller bounds the wait, then calls `cut`."""
        closing = [asyncio.create_task(connection.shut_down()) for connection in self.connections]
        if closing:
            await asyncio.wait(closing)

    def cut(self) -> None:
        """The shutdown's time is up: finals still being computed are cancelled, their turns told so."""
        for connection in self.connections:
            connection.cut()


def _hub_of(app: object) -> LiveHub | None:
    """The hub of `app` if it is a FastAPI app and any client has connected."""
    hub: LiveHub | None = getattr(getattr(app, "state", None), "halkspeech_live", None)
    return hub


async def shut_down_live(app: object) -> None:
    """`LiveHub.shut_down` for the app's hub, if it has one."""
    if (hub := _hub_of(app)) is not None:
        await hub.shut_down()


def cut_live(app: object) -> None:
    """`LiveHub.cut` for the app's hub, if it has one."""
    if (hub := _hub_of(app)) is not None:
        hub.cut()


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
    if len(hub.connections) >= server.ws_max_sessions:
        why = f"the server has its maximum of {server.ws_max_sessions} live sessions; try again later"
        await _refuse(websocket, "too_many_sessions", why, CLOSE_TRY_LATER)
        return
    connection = Connection(websocket, state.pool.use, server, hub.vad, state.metrics)
    hub.connections.add(connection)
    state.metrics.ws_sessions.inc()
    try:
        await connection.serve()
    finally:
        hub.connections.discard(connection)
        state.metrics.ws_sessions.dec()


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(StreamError(code, message).as_message())
        await websocket.close(close_code, message[:120])


class Connection:
    """One client: reads frames and messages, hands them to its LiveSession, writes its events."""

    def __init__(
        self, websocket: WebSocket, models: ModelSource, server: ServerSettings, vad: StreamingVAD, metrics: Metrics
    ) -> None:
        self.ws = websocket
        self.server = server
        self.metrics = metrics
        self.session = LiveSession(models, limits_from(server), self.emit, vad, check=check_options)
        self.last_seen = time.monotonic()
        self._send_lock = asyncio.Lock()
        self._stopping = asyncio.Event()  # set by shut_down: the server is stopping
        self._cut = asyncio.Event()  # set by cut: the shutdown's time is up, pending finals are abandoned
        self._closed = asyncio.Event()  # set when serve() has returned

    async def serve(self) -> None:
        """Until the client leaves, the connection idles out, the server stops, or a bug stops the reader or the
        watchdog. When the server closes it, the open turn is ended and every final delivered first, then the
        reason."""
        reader = asyncio.create_task(self._read())
        watchdog = asyncio.create_task(self._watch())
        stopping = asyncio.create_task(self._stopping.wait())
        close_code = CLOSE_NORMAL
        try:
            await asyncio.wait([reader, watchdog, stopping], return_when=asyncio.FIRST_COMPLETED)
            idle, shutdown = _returned(watchdog), stopping.done()
            await _stop(reader, watchdog, stopping)  # nothing more is read: no new turn opens while this closes
            failure = _failure(reader) or _failure(watchdog)
            if failure is not None:  # a bug: the server log gets the traceback, the client a clear error
                log.error("live connection failed", exc_info=failure)
                close_code = CLOSE_INTERNAL
                await self._wind_down(StreamError("internal_error", "the server failed; closing the connection"))
            elif shutdown:
                close_code = CLOSE_GOING_AWAY
                await self._wind_down(StreamError("engine_stopped", "the server is shutting down; reconnect later"))
            elif idle:
                why = f"no message for {self.server.ws_idle_timeout_s:g} s; closing the connection"
                await self._wind_down(StreamError("idle_timeout", why))
        finally:
            await _stop(reader, watchdog, stopping)  # also when this handler itself is cancelled
            await self.session.close()  # cancels open work: engine slots and buffers are freed now
            if self.ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await self.ws.close(close_code)
            self._closed.set()

    async def shut_down(self) -> None:
        """Close for a server shutdown (serve() winds the session down first) and wait until it is closed."""
        self._stopping.set()
        await self._closed.wait()

    def cut(self) -> None:
        """The shutdown cannot wait for this connection's finals any longer: see _wind_down."""
        self._cut.set()

    async def _wind_down(self, reason: StreamError) -> None:
        """The server closes the connection: nothing it accepted is lost, so the open turn ends as if `end` had
        come and every pending final goes out before `reason`; unless the shutdown's time runs out first
        (`cut`): then each unfinished turn gets engine_stopped instead of its final."""
        if self.ws.client_state != WebSocketState.CONNECTED:
            return  # nobody to tell: session.close() cancels the work instead
        ending = asyncio.create_task(self.session.end_all())
        cut = asyncio.create_task(self._cut.wait())
        await asyncio.wait([ending, cut], return_when=asyncio.FIRST_COMPLETED)
        await _stop(cut)
        if not ending.done():
            await _stop(ending)
            await self.session.cut("the server is shutting down and could not finish this turn in time")
        await self.emit(reason)

    async def emit(self, event: LiveEvent) -> None:
        """Send one event; a client that is gone is not an error here (the reader sees the disconnect)."""
        self._count(event)
        text = json.dumps(event.as_message(), ensure_ascii=False)
        async with self._send_lock:
            if self.ws.client_state != WebSocketState.CONNECTED:
                return
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.send_text(text)

    def _count(self, event: LiveEvent) -> None:
        """Turns started, finals and their audio seconds (a final is transcribed audio, delivered or not)."""
        if isinstance(event, TurnStarted):
            self.metrics.ws_turns.labels(event.model).inc()
        elif isinstance(event, Final):
            self.metrics.ws_finals.labels(event.model).inc()
            self.metrics.audio_seconds.labels(event.model).inc(event.duration)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.last_seen = time.monotonic()
            await self._handle(message)

    async def _handle(self, message: Message) -> None:
        """One frame or text message. Whatever goes wrong is told to the client, and the connection (with its
        open turn) goes on: a bad message must not cost the audio already accepted."""
        turn = self.session.turn.turn if self.session.turn is not None else None
        try:
            if message.get("bytes") is not None:
                self.session.feed(message["bytes"])
            elif message.get("text") is not None:
                await self._control(message["text"])
        except HalkSpeechError as exc:
            await self.emit(StreamError(exc.code, str(exc), turn))
        except Exception:  # a bug: the traceback goes to the server log, never to the client
            log.exception("live connection: handling a message failed")
            await self.emit(StreamError("internal_error", "the server failed to handle this message", turn))

    async def _control(self, text: str) -> None:
        data = _parsed(text)
        kind = data.get("type")
        if kind == "start":
            try:
                start = _validated(data)
                options = start.options()
            except HalkSpeechError:
                self.session.refuse_start()
                raise
            await self.session.start(options, start.model)
        elif kind == "end":
            self.session.end()
        else:
            raise ProtocolError(f"{_described(kind)}: expected 'start' or 'end' (audio goes in binary frames)")

    async def _watch(self) -> None:
        """Ends over-long turns; returns when the connection has been idle too long (serve() then closes it)."""
        idle = self.server.ws_idle_timeout_s
        tick = max(0.05, min(1.0, idle / 4, self.server.ws_max_turn_s / 4))
        while True:
            await asyncio.sleep(tick)
            await self.session.expire()
            if self.session.finishing:  # not counted while a final is pending: the client is waiting for it
                self.last_seen = max(self.last_seen, time.monotonic())
            elif time.monotonic() - self.last_seen > idle:
                return


def _returned(task: asyncio.Task[None]) -> bool:
    """The task finished by returning (not cancelled, no exception)."""
    return task.done() and not task.cancelled() and task.exception() is None


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    """A finished task's exception (retrieved, so asyncio logs no 'never retrieved'); None if it had none."""
    return None if task.cancelled() else task.exception()


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)  # not gather: it re-raises a child's CancelledError as ours


def _parsed(text: str) -> dict[str, Any]:
    """A text message as a JSON object, or ProtocolError: too long, not JSON, nested too deeply, not an object."""
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(
            f"a text message may have at most {MAX_TEXT_CHARS} characters, got {len(text)}; audio goes in binary frames"
        )
    try:
        data = json.loads(text)
    except RecursionError:  # the parser recurses once per level: hostile nesting must not kill the reader
        raise ProtocolError("the message's JSON is nested too deeply") from None
    except ValueError:
        raise ProtocolError('text frames must be JSON objects such as {"type": "start"}') from None
    if not isinstance(data, dict):
        raise ProtocolError(f'a message must be a JSON object such as {{"type": "start"}}, got {_json_kind(data)}')
    return data


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (never the value itself: it may be huge or deeply nested)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return "a number"


def _described(kind: Any) -> str:
    """The `type` of an unknown message, shortened: it comes from the client and may be anything."""
    if kind is None:
        return "the message has no 'type'"
    if not isinstance(kind, str):
        return f"the message's 'type' is {_json_kind(kind)}, not a string"
    shown = kind if len(kind) <= 40 else kind[:40] + "…"
    return f"unknown message type {shown!r}"


def _validated(data: dict[str, Any]) -> StartMessage:
    try:
        return StartMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))[:60]  # a client's field name: keep it short
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
            "hotwords": f"string of at most {MAX_HOTWORDS_CHARS} characters or null: names and terms to favour "
            "(faster-whisper's hotwords)",
        },
        "binary frames": "16-bit little-endian mono PCM at sample_rate, any even length up to a whole turn at "
        "48 kHz (20 ms is typical)",
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
    connection stays usable. Every message about a turn (started, partial, segment, final, and errors
    raised while one is open or that end one) carries its `turn` number.
    """
    return PROTOCOL
