"""What every live-speech WebSocket protocol shares (`/ws`, and OpenAI's Realtime API at `/v1/realtime`).

`admit` is the door: API key, the server's session limit, the hub that shutdown walks, the open-sessions gauge.
`LiveConnection` is one client behind it: it reads messages and hands them to the protocol (`handle`), sends
the session's events in the protocol's words (`messages`), ends over-long turns, closes idle connections and,
when the server stops, delivers every pending final before it closes. A protocol module is a subclass that
parses and words messages; the turn logic is `transcription.streaming.LiveSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import FastAPI, WebSocket
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from halkspeech.api import json_input
from halkspeech.api.deps import AppState, api_key_valid, get_state
from halkspeech.api.jobs import check_options
from halkspeech.api.metrics import Metrics
from halkspeech.audio.streaming import StreamingVAD
from halkspeech.config import ServerSettings
from halkspeech.errors import HalkSpeechError
from halkspeech.transcription.live import Final, LiveEvent, StreamError, StreamLimits, TurnStarted
from halkspeech.transcription.streaming import LiveSession, ModelSource

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_LATER = 1000, 1001, 1008, 1011, 1013

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


class ProtocolError(HalkSpeechError):
    """A message that is not valid protocol: bad JSON, unknown type, bad fields."""

    code = "invalid_message"


class MalformedJSON(ProtocolError):
    """A text message that is not JSON, or nested too deeply to parse (OpenAI's protocol tells it apart)."""


@dataclass
class LiveHub:
    """What every live connection of one app shares: the open connections and the batched streaming VAD."""

    connections: set[LiveConnection] = field(default_factory=set)
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


#: (websocket, the app's state, the hub) → the protocol's connection, made once the client is admitted.
ConnectionFactory = Callable[[WebSocket, AppState, LiveHub], "LiveConnection"]
#: (code, message) → the protocol's error message for a refused connection.
Refusal = Callable[[str, str], dict[str, Any]]


async def admit(
    websocket: WebSocket,
    make: ConnectionFactory,
    *,
    token: str | None,
    how_to_authenticate: str,
    refusal: Refusal,
    subprotocol: str | None = None,
) -> None:
    """Accept the WebSocket, then refuse it (one error, then close) without a valid key when the server has keys
    (1008) or when it already holds `ws_max_sessions` live connections of any protocol (1013); else serve it
    until it ends. Refusing after the upgrade, not with an HTTP status, gives clients a reason they can read."""
    state = get_state(websocket)
    server = state.settings.server
    hub = live_hub(websocket.app)
    await websocket.accept(subprotocol=subprotocol)
    keys = server.api_keys
    if keys and not api_key_valid(token, keys):
        why = f"missing API key: {how_to_authenticate}" if token is None else "invalid API key"
        await _refuse(websocket, refusal("invalid_api_key", why), why, CLOSE_POLICY)
        return
    if len(hub.connections) >= server.ws_max_sessions:
        why = f"the server has its maximum of {server.ws_max_sessions} live sessions; try again later"
        await _refuse(websocket, refusal("too_many_sessions", why), why, CLOSE_TRY_LATER)
        return
    connection = make(websocket, state, hub)
    hub.connections.add(connection)
    state.metrics.ws_sessions.inc()
    try:
        await connection.serve()
    finally:
        hub.connections.discard(connection)
        state.metrics.ws_sessions.dec()


async def _refuse(websocket: WebSocket, message: dict[str, Any], why: str, close_code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(message)
        await websocket.close(close_code, why[:120])


class LiveConnection(ABC):
    """One client: reads messages, hands them to the protocol (`handle`), sends the session's events in the
    protocol's words (`messages`)."""

    #: The protocol module's logger: bugs are logged under the protocol they happened in.
    log: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def __init__(
        self, websocket: WebSocket, models: ModelSource, server: ServerSettings, vad: StreamingVAD, metrics: Metrics
    ) -> None:
        self.ws = websocket
        self.server = server
        self.metrics = metrics
        self.session = LiveSession(models, limits_from(server), self.emit, vad, check=check_options)
        self.last_seen = time.monotonic()
        self._handling = False  # a message is being handled: the server is busy, the client not idle
        self._send_lock = asyncio.Lock()
        self._stopping = asyncio.Event()  # set by shut_down: the server is stopping
        self._cut = asyncio.Event()  # set by cut: the shutdown's time is up, pending finals are abandoned
        self._closed = asyncio.Event()  # set when serve() has returned

    # --- what a protocol provides ------------------------------------------------------------------------
    @abstractmethod
    async def handle(self, message: Message) -> None:
        """One frame or text message from the client. A HalkSpeechError it raises is told to the client as
        a StreamError about the open turn (see `_handle`); the connection goes on."""

    @abstractmethod
    def messages(self, event: LiveEvent) -> list[dict[str, Any]]:
        """The protocol's messages for one session event (none, one or several), in order."""

    async def opened(self) -> None:  # noqa: B027 (a hook: most protocols have nothing to say first)
        """Called once the client is admitted, before any message is read (a greeting, if the protocol has one)."""

    # --- the connection's life ---------------------------------------------------------------------------
    async def serve(self) -> None:
        """Until the client leaves, the connection idles out, the server stops, or a bug stops the reader or the
        watchdog. When the server closes it, the open turn is ended and every final delivered first, then the
        reason."""
        await self.opened()
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
                self.log.error("live connection failed", exc_info=failure)
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

    # --- sending -----------------------------------------------------------------------------------------
    async def emit(self, event: LiveEvent) -> None:
        """Send one event's messages; a client that is gone is not an error here (the reader sees the
        disconnect)."""
        self._count(event)
        await self.send(*self.messages(event))

    async def send(self, *messages: dict[str, Any]) -> None:
        """Send messages in order, none of another sender's between them."""
        texts = [json.dumps(message, ensure_ascii=False) for message in messages]
        async with self._send_lock:
            for text in texts:
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

    # --- reading -----------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.last_seen = time.monotonic()
            self._handling = True
            try:
                await self._handle(message)
            finally:
                self._handling = False

    async def _handle(self, message: Message) -> None:
        """One frame or text message. Whatever goes wrong is told to the client, and the connection (with its
        open turn) goes on: a bad message must not cost the audio already accepted."""
        turn = self.session.turn.turn if self.session.turn is not None else None
        try:
            await self.handle(message)
        except HalkSpeechError as exc:
            await self.emit(StreamError(exc.code, str(exc), turn))
        except Exception:  # a bug: the traceback goes to the server log, never to the client
            self.log.exception("live connection: handling a message failed")
            await self.emit(StreamError("internal_error", "the server failed to handle this message", turn))

    async def _watch(self) -> None:
        """Ends over-long turns; returns when the connection has been idle too long (serve() then closes it)."""
        idle = self.server.ws_idle_timeout_s
        tick = max(0.05, min(1.0, idle / 4, self.server.ws_max_turn_s / 4))
        while True:
            await asyncio.sleep(tick)
            await self.session.expire()
            if self.session.finishing or self._handling:
                # not counted while a final is pending (the client is waiting for it), nor while a message is
                # handled: a turn's start that waits for its model under load took longer than a short idle
                # timeout, which then closed the connection with that start and the audio after it unread
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


# --- JSON messages ---------------------------------------------------------------------------------------

#: Where a decoded string could hold a surrogate: JSON escapes one as \uD800-\uDFFF, and a WebSocket text
#: frame (UTF-8, checked by the server) holds none otherwise. Only then are the strings walked.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_object(text: str, max_chars: int, example: str, hint: str = "") -> dict[str, Any]:
    """A text message as a JSON object, or ProtocolError: longer than `max_chars` (the error ends with `hint`),
    not JSON, nested too deeply, not an object. `example` is a message of the protocol, shown in the errors."""
    if len(text) > max_chars:
        raise ProtocolError(f"a text message may have at most {max_chars} characters, got {len(text)}{hint}")
    try:
        data = json_input.loads(text)
    except json_input.JSONInputError as exc:
        if exc.not_json:
            raise MalformedJSON(f"text messages must be JSON objects such as {example}") from None
        raise MalformedJSON(f"the message's JSON {exc.reason}") from None
    if _ESCAPED_SURROGATE.search(text) and _has_lone_surrogate(data):
        # Python decodes one, but it cannot be encoded as UTF-8: echoed back in any message (an error naming
        # the client's event_id, the session's settings), it made the send fail.
        raise MalformedJSON(
            "the message's JSON has a lone surrogate escape (\\ud800-\\udfff): strings must be valid Unicode"
        )
    if not isinstance(data, dict):
        raise ProtocolError(f"a message must be a JSON object such as {example}, got {json_kind(data)}")
    return data


def _has_lone_surrogate(data: Any) -> bool:
    """Any string (key or value) in a parsed JSON value that UTF-8 cannot encode. Iterative: the value may be
    nested nearly as deep as the parser allows."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def json_kind(value: Any) -> str:
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


def described(kind: Any) -> str:
    """The `type` of an unknown message, shortened: it comes from the client and may be anything."""
    if kind is None:
        return "the message has no 'type'"
    if not isinstance(kind, str):
        return f"the message's 'type' is {json_kind(kind)}, not a string"
    shown = kind if len(kind) <= 40 else kind[:40] + "…"
    return f"unknown message type {shown!r}"
