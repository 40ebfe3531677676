"""`/v1/realtime`: OpenAI's Realtime API for transcription (`?intent=transcription`), so that clients written for
OpenAI's (its SDKs' realtime clients, agent frameworks) work unchanged (docs/realtime.md).

A thin adapter over the same live sessions as `/ws` (api.live: auth, limits, idle watchdog, shutdown): appended
audio goes into a LiveTurn, and its events come out as OpenAI's. Without turn detection one commit is one
turn and one item; with `server_vad`, one turn runs while audio flows and each VAD segment is an item (the turn
is renewed at a pause before it reaches `ws_max_turn_s`). Session settings are `realtime_protocol.SessionConfig`.

Item ids name (turn, piece): the piece is 0 for a committed turn, or the VAD segment's index. Each item that any
event named ends with exactly one `...transcription.completed` or `...transcription.failed`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import APIRouter, WebSocket
from starlette.types import Message

from halkspeech.api.deps import AppState, bearer_token
from halkspeech.api.live import (
    LiveConnection,
    LiveHub,
    MalformedJSON,
    ProtocolError,
    admit,
    described,
    json_kind,
    max_frame_bytes,
    parse_object,
)
from halkspeech.api.realtime_protocol import (
    Form,
    RealtimeError,
    SessionConfig,
    error_body,
    error_event,
    event,
    new_id,
    session_event,
    session_object,
    updated,
)
from halkspeech.errors import AudioTooLong, HalkSpeechError
from halkspeech.transcription.live import (
    AppendOnlyText,
    Final,
    LiveEvent,
    Partial,
    Piece,
    SegmentReady,
    SpeechStarted,
    SpeechStopped,
    StreamError,
)
from halkspeech.transcription.streaming import LiveTurn

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

PATH = "/v1/realtime"
#: OpenAI takes appends of up to 15 MiB; so does this server, within its frame limit (`max_frame_bytes`,
#: 29.8 MB at the default ws_max_turn_s): 15 MiB of base64 is 11.25 MiB of PCM, 4 minutes at 24 kHz.
MAX_EVENT_CHARS = 15 * 2**20
#: Messages longer than this are parsed and decoded on a worker thread: json.loads takes ~20 ms for 15 MiB,
#: which the event loop (every other client's audio) should not wait for.
OFF_LOOP_CHARS = 256 * 1024
RETRY_S = 1.0  # a server_vad session whose turn could not open tries again after this long
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms of audio (input_audio_buffer_commit_empty)
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # browsers, which cannot set headers, send the key as a subprotocol
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
EXAMPLE = '{"type": "input_audio_buffer.append", "audio": "<base64 PCM16>"}'
NOT_HERE = ("response.", "conversation.", "output_audio_buffer.")  # a conversation's events: no model answers


@router.websocket(PATH)
async def realtime(websocket: WebSocket) -> None:
    offered: list[str] = list(websocket.scope.get("subprotocols") or [])
    in_protocol = next((p[len(KEY_SUBPROTOCOL) :] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)
    token = bearer_token(websocket) or in_protocol or websocket.query_params.get("token")
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "") or BETA_SUBPROTOCOL in offered
    form: Form = "beta" if beta else "ga"

    def make(ws: WebSocket, state: AppState, hub: LiveHub) -> RealtimeConnection:
        return RealtimeConnection(ws, state, hub, form)

    await admit(
        websocket,
        make,
        token=token,
        how_to_authenticate="send 'Authorization: Bearer <key>' (or the 'openai-insecure-api-key.<key>' subprotocol)",
        refusal=lambda code, why: error_event(code, why),
        subprotocol="realtime" if "realtime" in offered else None,  # browsers require one of theirs echoed
    )


@dataclass
class Item:
    """A conversation item: one piece of one turn."""

    id: str
    text: AppendOnlyText = field(default_factory=AppendOnlyText)
    started: bool = False  # speech_started sent
    stopped: bool = False  # speech_stopped sent
    committed: bool = False
    done: bool = False  # completed or failed sent


@dataclass
class TurnState:
    """What the adapter knows of one live turn."""

    number: int
    offset_s: float  # seconds of the session's audio before the turn: OpenAI's audio_*_ms count from the session
    vad: bool  # server_vad: its pieces are VAD segments
    items: dict[int, Item] = field(default_factory=dict)  # piece → item
    segments: int = 0  # SegmentReady seen (the Final's pieces after them are the rest)


class RealtimeConnection(LiveConnection):
    """One Realtime client: JSON events in, the session's events out in OpenAI's words."""

    log: ClassVar[logging.Logger] = log

    def __init__(self, websocket: WebSocket, state: AppState, hub: LiveHub, form: Form) -> None:
        super().__init__(websocket, state.pool.use, state.settings.server, hub.vad, state.metrics)
        self.pool = state.pool
        self.default_model = state.settings.model.default
        self.form = form  # of the greeting; each update is answered in its own form
        self.config = SessionConfig()
        self.session_id = new_id("sess")
        self.turns: dict[int, TurnState] = {}
        self.appended_s = 0.0  # audio appended so far, in seconds
        self.last_committed: str | None = None  # previous_item_id of the next commit
        #: A turn could not open (its error was told): appends are dropped quietly until this monotonic time, or
        #: a commit, clear or update (a committed buffer would miss audio; a server_vad one tries again in 1 s).
        self.refused_until = 0.0
        self.max_chars = min(MAX_EVENT_CHARS, max_frame_bytes(self.server))

    async def opened(self) -> None:
        await self.send(session_event("created", self.form, self._session(self.form)))

    def _session(self, form: Form) -> dict[str, Any]:
        return session_object(self.config, self.session_id, form, self.default_model)

    # --- client events -----------------------------------------------------------------------------------
    async def handle(self, message: Message) -> None:
        """One message; an error in it is told as an `error` event naming the client's event_id, and nothing
        else changes."""
        event_id: str | None = None
        try:
            if message.get("text") is None:
                if message.get("bytes") is not None:
                    raise RealtimeError("invalid_event", f"binary frames are not part of this protocol: send {EXAMPLE}")
                return
            data = await _parsed(message["text"], self.max_chars)
            given = data.get("event_id")
            event_id = given[:100] if isinstance(given, str) else None
            await self._dispatch(data)
        except HalkSpeechError as exc:
            await self.send(error_event(exc.code, str(exc), exc.param, event_id))

    async def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "input_audio_buffer.append":
            await self._append(data.get("audio"))
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            await self._clear()
        elif kind in ("session.update", "transcription_session.update"):
            await self._update(data.get("session"), "ga" if kind == "session.update" else "beta")
        elif isinstance(kind, str) and kind.startswith(NOT_HERE):
            message = f"{kind[:60]!r} is not supported: this server transcribes only (no responses or conversation)"
            raise RealtimeError("invalid_event", message, param="type")
        else:
            raise RealtimeError("invalid_event", f"{described(kind)}: expected an input_audio_buffer or session event")

    async def _update(self, session: Any, form: Form) -> None:
        config = updated(self.config, session, form)
        if config.engine_model is not None:
            param = (
                "session.audio.input.transcription.model" if form == "ga" else "session.input_audio_transcription.model"
            )
            try:
                self.pool.check(config.engine_model)
            except HalkSpeechError as exc:
                raise RealtimeError(exc.code, str(exc), param=param) from None
        config.stream_options()  # its own checks, before anything changes
        self.config, self.refused_until = config, 0.0
        turn = self.session.turn
        if turn is not None and self.turns[turn.turn].vad:  # what was heard so far ends its items; the next
            await self._end_turn()  # append opens a turn with the new settings (a committed turn keeps its own)
        await self.send(session_event("updated", form, self._session(form)))

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise RealtimeError(
                "invalid_value", f"'audio' must be a base64 string, got {json_kind(audio)}", param="audio"
            )
        pcm = await _decoded(audio)
        if not pcm or time.monotonic() < self.refused_until:
            return
        turn = self.session.turn
        if turn is not None and await self._renewable(turn, len(pcm) / 2 / turn.options.sample_rate):
            await self._end_turn()
        if self.session.turn is None:
            await self._open_turn()
        # At the buffer's own rate: a manual buffer keeps the one it was opened with through a rate update.
        opened = self.session.turn
        seconds = len(pcm) / 2 / (opened.options.sample_rate if opened is not None else self.config.rate)
        try:
            await self.session.feed(pcm)  # AudioDecodeError (an odd length): refused whole, not counted below
        except AudioTooLong:  # what fitted was kept; the turn was ended and its final follows
            self.appended_s += seconds
            limit = self.server.ws_max_turn_s
            message = f"the buffer reached the limit of {limit:g} s; it was committed"
            raise RealtimeError("audio_too_long", message) from None
        self.appended_s += seconds

    async def _renewable(self, turn: LiveTurn, seconds: float) -> bool:
        """A server_vad turn is ended (and the next append opens a fresh one) before it would hold more than
        `ws_max_turn_s` (cutting speech if need be), and, from half that, at the first moment no one speaks (as
        the VAD has heard, once it has caught up with the audio): its buffer holds the whole turn."""
        if not self.turns[turn.turn].vad:
            return False
        limit = self.server.ws_max_turn_s
        if turn.duration + seconds > limit:
            return True
        if turn.duration <= limit / 2 and time.monotonic() - turn.started <= limit / 2:
            return False
        await turn.heard_all()
        return not turn.in_speech

    async def _open_turn(self) -> None:
        number = self.session.turns + 1  # the number start() gives it
        self.turns[number] = TurnState(number, self.appended_s, self.config.turn_detection is not None)
        try:
            await self.session.start(self.config.stream_options(), self.config.engine_model)
        except BaseException:
            del self.turns[number]
            vad = self.config.turn_detection is not None
            self.refused_until = time.monotonic() + RETRY_S if vad else math.inf
            raise

    async def _commit(self) -> None:
        if self.refused_until > time.monotonic():  # the refusal was this buffer's one error
            self.refused_until = 0.0
            return
        if self.session.turn is not None:
            await self.session.turn.heard_all()  # a pause the VAD has yet to hear has committed part of it
        turn = self.session.turn
        held = 0.0 if turn is None else turn.uncut_s
        if turn is None or held < MIN_COMMIT_S:
            message = f"buffer too small: expected at least 100 ms of audio, but the buffer has {held * 1000:.2f} ms"
            raise RealtimeError("input_audio_buffer_commit_empty", message)
        await self._end_turn(commit=True)

    async def _clear(self) -> None:
        self.refused_until = 0.0
        if self.session.turn is not None:
            self.session.end(drop_rest=True)  # what was not committed yet is not transcribed
        await self.send(event("input_audio_buffer.cleared"))

    async def _end_turn(self, *, commit: bool = False) -> None:
        """End the open turn (a commit, or a server_vad turn's renewal): the piece being spoken is committed at
        once, so that items are committed in the order they were spoken, and its text follows with the final.
        A commit commits the piece even if nobody speaks (it then completes empty), as OpenAI commits silence."""
        turn = self.session.turn
        if turn is None:
            return
        await turn.heard_all()
        if self.session.turn is not turn:  # the watchdog ended it meanwhile (too long): its final ends its items
            return
        item = self._item(turn.turn, turn.piece) if commit or turn.in_speech else None
        self.session.end()
        if item is not None:
            await self.send(*self._stopped(turn.turn, item, self.appended_s), *self._committed(item))

    # --- session events ----------------------------------------------------------------------------------
    def messages(self, live: LiveEvent) -> list[dict[str, Any]]:
        state = self.turns.get(live.turn) if live.turn is not None else None
        if isinstance(live, StreamError):
            return self._error(live, state)
        if state is None:  # TurnStarted of a turn whose start failed after all, or a turn already over
            return []
        if isinstance(live, Partial):
            item = self._item(live.turn, live.piece)
            fragment = item.text.grow(live.stable_text) if not item.done else ""
            return [self._delta(item, fragment)] if fragment else []
        if isinstance(live, SpeechStarted):
            item = self._item(live.turn, live.piece)
            item.started = True
            ms = round((state.offset_s + live.at_s) * 1000)
            return [event("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=item.id)]
        if isinstance(live, SpeechStopped):
            item = self._item(live.turn, live.piece)
            return self._stopped(live.turn, item, state.offset_s + live.at_s) + self._committed(item)
        if isinstance(live, SegmentReady):
            state.segments += 1
            return self._completed(live.turn, live.index, live.piece)
        if isinstance(live, Final):
            return self._final(live, state)
        return []  # TurnStarted: nothing to say

    def _final(self, final: Final, state: TurnState) -> list[dict[str, Any]]:
        """The rest after the last segment is the last item; then every item of the turn still open ends:
        committed ones with an empty transcript (a commit of silence), the others (cleared: named by speech_started
        or a delta) as failed."""
        out: list[dict[str, Any]] = []
        for index, piece in enumerate(final.pieces[state.segments :], start=state.segments):
            out += self._completed(final.turn, index, piece)
        for index, item in sorted(state.items.items()):
            if item.done or not (item.committed or item.started or item.text.sent):  # never named: nothing to end
                continue
            if item.committed:
                out += self._completed(final.turn, index, None)
            else:
                why = "the audio of this item was cleared before it was committed"
                out += self._stopped(final.turn, item, state.offset_s + final.duration)
                out += self._failed(item, error_body("input_audio_buffer_cleared", why))
        del self.turns[final.turn]
        return out

    def _error(self, error: StreamError, state: TurnState | None) -> list[dict[str, Any]]:
        """A turn that failed fails its open items; a turn open too long is committed (its items end as
        usual, and a server_vad turn is simply renewed); anything else is an `error` event."""
        if state is not None and error.ends_turn:
            del self.turns[state.number]
            body = error_body(error.code, error.message)
            failed = [m for item in state.items.values() if not item.done for m in self._failed(item, body)]
            if failed:
                return failed
        elif state is not None and error.code == "turn_timeout":
            if state.vad:
                return []
            limit = self.server.ws_max_turn_s
            return [error_event(error.code, f"the buffer was open longer than {limit:g} s; it was committed")]
        return [error_event(error.code, error.message)]

    # --- items -------------------------------------------------------------------------------------------
    def _item(self, turn: int, piece: int) -> Item:
        items = self.turns[turn].items
        if piece not in items:
            items[piece] = Item(new_id("item"))
        return items[piece]

    def _stopped(self, turn: int, item: Item, at_s: float) -> list[dict[str, Any]]:
        """speech_stopped for an item whose speech_started went out (server_vad), once."""
        if not item.started or item.stopped:
            return []
        item.stopped = True
        return [event("input_audio_buffer.speech_stopped", audio_end_ms=round(at_s * 1000), item_id=item.id)]

    def _committed(self, item: Item) -> list[dict[str, Any]]:
        if item.committed:
            return []
        item.committed, previous, self.last_committed = True, self.last_committed, item.id
        return [event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)]

    def _delta(self, item: Item, fragment: str) -> dict[str, Any]:
        kind = "conversation.item.input_audio_transcription.delta"
        return event(kind, item_id=item.id, content_index=0, delta=fragment)

    def _completed(self, turn: int, index: int, piece: Piece | None) -> list[dict[str, Any]]:
        """The item's last delta (the final's text after what partials sent) and `completed`, committed first
        if it was not yet (the turn ended without a pause: a commit, or the turn's renewal)."""
        item = self._item(turn, index)
        if item.done:
            return []
        out = self._stopped(turn, item, self.turns[turn].offset_s + (piece.end if piece else 0.0))
        out += self._committed(item)
        fragment, transcript = item.text.finish(piece.text if piece else "", piece.language if piece else None)
        if fragment:
            out.append(self._delta(item, fragment))
        seconds = round(piece.end - piece.start, 3) if piece else 0.0
        item.done = True
        kind = "conversation.item.input_audio_transcription.completed"
        usage = {"type": "duration", "seconds": seconds}
        return [*out, event(kind, item_id=item.id, content_index=0, transcript=transcript, usage=usage)]

    def _failed(self, item: Item, error: dict[str, Any]) -> list[dict[str, Any]]:
        item.done = True
        kind = "conversation.item.input_audio_transcription.failed"
        return [event(kind, item_id=item.id, content_index=0, error=error)]


async def _parsed(text: str, max_chars: int) -> dict[str, Any]:
    """A client event as a JSON object (`parse_object`; a long one parsed on a worker thread), or RealtimeError
    with OpenAI's codes: `invalid_json` for what is not JSON, `invalid_event` for the rest."""
    parse = functools.partial(parse_object, text, max_chars, EXAMPLE, ": append audio in smaller pieces")
    try:
        return await asyncio.to_thread(parse) if OFF_LOOP_CHARS < len(text) <= max_chars else parse()
    except MalformedJSON as exc:
        raise RealtimeError("invalid_json", str(exc)) from None
    except ProtocolError as exc:
        raise RealtimeError("invalid_event", str(exc)) from None


async def _decoded(audio: str) -> bytes:
    """Base64 → PCM bytes (a long one decoded on a worker thread), or RealtimeError."""
    try:
        if len(audio) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(base64.b64decode, audio, validate=True)
        return base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("invalid_audio", "'audio' is not valid base64", param="audio") from None


PROTOCOL: dict[str, Any] = {
    "endpoint": "ws://HOST:PORT/v1/realtime?intent=transcription (wss:// behind TLS); auth: 'Authorization: "
    "Bearer <key>', the 'openai-insecure-api-key.<key>' subprotocol, or ?token=<key>",
    "protocol": "OpenAI's Realtime API for transcription: GA session.update, or beta transcription_session.update",
    "client_events": [
        "session.update",
        "transcription_session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
    ],
    "server_events": [
        "session.created / transcription_session.created",
        "session.updated / transcription_session.updated",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.input_audio_transcription.failed",
        "error",
    ],
    "audio": "PCM16 mono little-endian, 24 kHz unless session.audio.input.format.rate says otherwise (8000-192000)",
    "docs": "docs/realtime.md in the repository",
}


@router.get(PATH, summary="OpenAI Realtime transcription protocol (open /v1/realtime as a WebSocket to use it)")
async def protocol() -> dict[str, Any]:
    """Describes `/v1/realtime`, which OpenAPI cannot show: OpenAI's Realtime API for transcription over a
    WebSocket (`?intent=transcription`). Point an OpenAI realtime client at this server's `/v1` base URL."""
    return PROTOCOL
