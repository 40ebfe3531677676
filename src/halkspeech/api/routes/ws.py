"""`/ws`: push-to-talk over one WebSocket, many turns per connection (protocol: docs/websocket.md).

This module only speaks the protocol: parsing and validating messages, and turning events into JSON. What
every live protocol shares (auth, the session limit, the idle watchdog, shutdown) is `api.live`; the turn
logic is `transcription.streaming.LiveSession`. `GET /ws` (plain HTTP) describes the protocol, so that /docs
shows it: OpenAPI has no WebSockets.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Message

from halkspeech.api.deps import AppState, bearer_token
from halkspeech.api.live import (
    LiveConnection,
    LiveHub,
    ProtocolError,
    admit,
    described,
    parse_object,
)
from halkspeech.api.schemas import MAX_HOTWORDS_CHARS
from halkspeech.errors import HalkSpeechError
from halkspeech.transcription.live import LiveEvent, StreamError, StreamOptions

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

#: Text messages are control messages of a few hundred bytes; a cap keeps a hostile one from costing the JSON
#: parser (and the event loop) seconds. Audio goes in binary frames, whose size `max_frame_bytes` bounds.
MAX_TEXT_CHARS = 64 * 1024
START_EXAMPLE = '{"type": "start"}'


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


@router.websocket("/ws")
async def live(websocket: WebSocket) -> None:
    token = bearer_token(websocket) or websocket.query_params.get("token")
    await admit(
        websocket,
        Connection.make,
        token=token,
        how_to_authenticate="send 'Authorization: Bearer <key>' or ?token=<key>",
        refusal=lambda code, why: StreamError(code, why).as_message(),
    )


class Connection(LiveConnection):
    """One /ws client: start, binary audio frames and end in; the session's events out as they are."""

    log: ClassVar[logging.Logger] = log

    @classmethod
    def make(cls, websocket: WebSocket, state: AppState, hub: LiveHub) -> Connection:
        return cls(websocket, state.pool.use, state.settings.server, hub.vad, state.metrics)

    def messages(self, event: LiveEvent) -> list[dict[str, Any]]:
        return [event.as_message()]

    async def handle(self, message: Message) -> None:
        if message.get("bytes") is not None:
            await self.session.feed(message["bytes"])
        elif message.get("text") is not None:
            await self._control(message["text"])

    async def _control(self, text: str) -> None:
        data = parse_object(text, MAX_TEXT_CHARS, START_EXAMPLE, "; audio goes in binary frames")
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
            raise ProtocolError(f"{described(kind)}: expected 'start' or 'end' (audio goes in binary frames)")


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
