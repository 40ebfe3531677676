"""OpenAI's Realtime API for transcription, in words: the session's configuration as clients send it (the GA
`session.update` and the beta `transcription_session.update`) → `SessionConfig` → the live turn's
StreamOptions, the session object the server shows back, and the server events' shapes. No WebSocket here
(routes/realtime.py speaks it).

Shapes follow OpenAI's API reference (https://developers.openai.com/api/reference/resources/realtime/
client-events and .../server-events) and the `openai` Python SDK's types (openai.types.realtime for GA,
openai.types.beta.realtime for beta).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from halkspeech.api.schemas import MAX_HOTWORDS_CHARS
from halkspeech.audio.streaming import MAX_RATE, MIN_RATE
from halkspeech.errors import HalkSpeechError, InvalidRequest
from halkspeech.model.languages import normalize_language
from halkspeech.transcription.live import StreamOptions

Form = Literal["ga", "beta"]  # GA: session.* events, nested audio.input; beta: transcription_session.*, flat

#: OpenAI's transcription models: each stands for the server's default model, as `whisper-1` does over HTTP.
OPENAI_MODELS = frozenset(
    {
        "whisper-1",
        "gpt-4o-transcribe",
        "gpt-4o-transcribe-latest",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe-diarize",
        "gpt-transcribe",
        "gpt-live-transcribe",
        "gpt-realtime-whisper",
    }
)
#: OpenAI's whisper-1 sends no incremental deltas, only the whole transcript when done; so does this server
#: under that name. Every other name streams deltas from partial results.
NON_STREAMING_MODEL = "whisper-1"
OPENAI_RATE = 24_000  # the only rate OpenAI takes (GA audio/pcm, beta pcm16)
MIN_SILENCE_MS = 100  # the VAD's shortest pause (3 frames of 32 ms): shorter ones are raised to it


class RealtimeError(HalkSpeechError):
    """An error the client caused, told as OpenAI's `error` event: its own `code` and the `param` at fault."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = code


@dataclass(frozen=True)
class ServerVad:
    """`turn_detection: {"type": "server_vad", ...}`, with OpenAI's defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    """One connection's transcription settings; a session update makes a new one."""

    model: str | None = None  # as the client named it; None: the server's default
    language: str | None = None  # None: detect
    prompt: str | None = None
    keywords: tuple[str, ...] = ()  # names and terms to favour: the turn's hotwords
    rate: int = OPENAI_RATE  # Hz of the PCM appended (HalkSpeech also takes 8000-192000 in GA's format.rate)
    turn_detection: ServerVad | None = ServerVad()  # None: the client commits each item

    @property
    def engine_model(self) -> str | None:
        """The model the server runs: OpenAI's names mean its default."""
        return None if self.model is None or self.model in OPENAI_MODELS else self.model

    def stream_options(self) -> StreamOptions:
        """The live turn's options: one item per commit without turn detection, one per VAD segment with it."""
        vad = self.turn_detection
        return StreamOptions(
            language=self.language,
            sample_rate=self.rate,
            partials=self.model != NON_STREAMING_MODEL,
            segment_silence_ms=None if vad is None else vad.silence_duration_ms,
            prompt=self.prompt,
            hotwords=", ".join(self.keywords) or None,
            vad_threshold=None if vad is None else vad.threshold,
            preroll_ms=None if vad is None else vad.prefix_padding_ms,
            speech_events=vad is not None,
        )


# --- what clients send ---------------------------------------------------------------------------------


class _Fields(BaseModel):
    """Known fields are checked strictly (a string is not a number); unknown ones are ignored: clients send
    many this server has no use for (noise_reduction, include, modalities, client_secret …)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class _Transcription(_Fields):
    model: str | None = Field(default=None, max_length=200)
    language: str | None = Field(default=None, max_length=64)
    prompt: str | None = Field(default=None, max_length=MAX_HOTWORDS_CHARS)
    keywords: list[str] | None = Field(default=None, max_length=500)  # a bound before the characters' bound


class _TurnDetection(_Fields):
    type: str | None = None  # beta's is optional; server_vad then
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


class _Format(_Fields):
    type: str | None = None
    rate: int | None = None


class _Input(_Fields):
    format: _Format | None = None
    transcription: _Transcription | None = None
    turn_detection: _TurnDetection | None = None


class _Audio(_Fields):
    input: _Input | None = None


class _GASession(_Fields):
    type: str | None = None
    audio: _Audio | None = None


class _BetaSession(_Fields):
    input_audio_format: str | None = None
    input_audio_transcription: _Transcription | None = None
    turn_detection: _TurnDetection | None = None


def updated(config: SessionConfig, session: Any, form: Form) -> SessionConfig:
    """`config` with a session update's fields (the event's `session`). A nested object that is present
    replaces the old one whole (its absent fields take their defaults); an absent one leaves it as it was;
    `turn_detection: null` turns detection off. Raises RealtimeError (`param` names the field) and then
    changes nothing."""
    where = "session"
    if not isinstance(session, dict):
        raise RealtimeError("invalid_value", "'session' must be an object", param=where)
    try:
        if form == "ga":
            ga = _GASession.model_validate(session)
            if ga.type not in (None, "transcription"):
                raise RealtimeError(
                    "invalid_value",
                    f"this server has transcription sessions only: session.type must be 'transcription', "
                    f"got {ga.type[:40]!r}",
                    param="session.type",
                )
            given = ga.audio.input if ga.audio is not None and ga.audio.input is not None else _Input()
            where = "session.audio.input"
            fmt, transcription, detection = "format", "transcription", "turn_detection"
            raw = (session.get("audio") or {}).get("input") or {}
        else:
            beta = _BetaSession.model_validate(session)
            given = _Input(transcription=beta.input_audio_transcription, turn_detection=beta.turn_detection)
            fmt, transcription, detection = "input_audio_format", "input_audio_transcription", "turn_detection"
            raw = session
            if beta.input_audio_format not in (None, "pcm16"):
                raise _unsupported_format(beta.input_audio_format, f"{where}.{fmt}", "pcm16")
    except ValidationError as exc:
        raise _invalid(exc, where) from None
    new = config
    if form == "ga" and fmt in raw:
        new = replace(new, rate=_rate(given.format, f"{where}.{fmt}"))
    if transcription in raw:
        t = given.transcription or _Transcription()
        keywords = tuple(k.strip() for k in t.keywords or () if k.strip())
        if len(", ".join(keywords)) > MAX_HOTWORDS_CHARS:
            message = f"keywords may have at most {MAX_HOTWORDS_CHARS} characters in all"
            raise RealtimeError("invalid_value", message, param=f"{where}.{transcription}.keywords")
        language, prompt = t.language or None, t.prompt or None
        new = replace(new, model=t.model or None, language=language, prompt=prompt, keywords=keywords)
        _check_language(new.language, f"{where}.{transcription}.language")
    if detection in raw:
        new = replace(new, turn_detection=_turn_detection(given.turn_detection, f"{where}.{detection}"))
    return new


def _rate(given: _Format | None, param: str) -> int:
    if given is None:
        return OPENAI_RATE
    if given.type not in (None, "audio/pcm"):
        raise _unsupported_format(given.type, f"{param}.type", "audio/pcm")
    rate = OPENAI_RATE if given.rate is None else given.rate
    if not MIN_RATE <= rate <= MAX_RATE:
        message = f"rate must be {MIN_RATE} to {MAX_RATE} Hz, got {rate}"
        raise RealtimeError("invalid_value", message, param=f"{param}.rate")
    return rate


def _unsupported_format(kind: str, param: str, supported: str) -> RealtimeError:
    return RealtimeError(
        "invalid_value", f"audio format {kind[:40]!r} is not supported here: send {supported!r}", param=param
    )


def _check_language(language: str | None, param: str) -> None:
    try:
        normalize_language(language)
    except InvalidRequest as exc:
        raise RealtimeError("invalid_value", str(exc), param=param) from None


def _turn_detection(given: _TurnDetection | None, param: str) -> ServerVad | None:
    if given is None:
        return None
    if given.type not in (None, "server_vad"):
        why = "semantic_vad is not supported here; use server_vad or null" if given.type == "semantic_vad" else ""
        raise RealtimeError(
            "invalid_value", why or f"unknown turn detection {given.type[:40]!r}", param=f"{param}.type"
        )
    vad = ServerVad()
    if given.threshold is not None:
        if not 0.0 <= given.threshold <= 1.0:
            message = f"threshold must be 0.0 to 1.0, got {given.threshold}"
            raise RealtimeError("invalid_value", message, param=f"{param}.threshold")
        vad = replace(vad, threshold=given.threshold)
    if given.prefix_padding_ms is not None:
        if not 0 <= given.prefix_padding_ms <= 30_000:
            message = f"prefix_padding_ms must be 0 to 30000, got {given.prefix_padding_ms}"
            raise RealtimeError("invalid_value", message, param=f"{param}.prefix_padding_ms")
        vad = replace(vad, prefix_padding_ms=given.prefix_padding_ms)
    if given.silence_duration_ms is not None:
        if not 0 <= given.silence_duration_ms <= 30_000:
            message = f"silence_duration_ms must be 0 to 30000, got {given.silence_duration_ms}"
            raise RealtimeError("invalid_value", message, param=f"{param}.silence_duration_ms")
        vad = replace(vad, silence_duration_ms=max(MIN_SILENCE_MS, given.silence_duration_ms))
    return vad


def _invalid(exc: ValidationError, where: str) -> RealtimeError:
    """The first problem pydantic found, as OpenAI words it: the field's dotted path in `param`."""
    first = exc.errors()[0]
    path = ".".join(str(part) for part in first.get("loc", ()))[:120]  # the client's field names: keep it short
    param = f"{where}.{path}" if path else where
    return RealtimeError("invalid_value", f"invalid value for {param!r}: {first.get('msg')}", param=param)


# --- what the server sends -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An id such as OpenAI's (`event_…`, `item_…`, `sess_…`): unique within the server's life."""
    return f"{prefix}_{secrets.token_hex(10)}"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event: its type, a fresh event_id, then its fields."""
    return {"type": kind, "event_id": new_id("event"), **fields}


#: Codes that are the server's trouble, not the client's (OpenAI's `server_error`).
SERVER_CODES = frozenset({"internal_error", "engine_stopped", "overloaded", "model_load_error", "cancelled"})


def error_body(code: str, message: str, param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    """The `error` object of an `error` event and of a `...transcription.failed` event."""
    kind = "server_error" if code in SERVER_CODES else "invalid_request_error"
    return {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}


def error_event(code: str, message: str, param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {type, code, message, param, event_id}}`; `event_id` inside is the client's
    event that caused it, if it gave one."""
    return event("error", error=error_body(code, message, param, event_id))


def session_object(config: SessionConfig, session_id: str, form: Form, default_model: str) -> dict[str, Any]:
    """The session as `session.created`/`session.updated` (GA) or `transcription_session.*` (beta) show it: the
    effective settings; noise reduction and logprobs are always off here."""
    vad = config.turn_detection
    detection = None if vad is None else {"type": "server_vad", **vars(vad)}
    transcription: dict[str, Any] = {
        "model": config.model or default_model,
        "language": config.language,
        "prompt": config.prompt or "",
    }
    if config.keywords:
        transcription["keywords"] = list(config.keywords)
    if form == "beta":
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_transcription": transcription,
            "turn_detection": detection,
            "input_audio_noise_reduction": None,
            "include": None,
        }
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": config.rate},
                "noise_reduction": None,
                "transcription": transcription,
                "turn_detection": detection,
            }
        },
        "include": None,
    }


def session_event(kind: Literal["created", "updated"], form: Form, session: dict[str, Any]) -> dict[str, Any]:
    """`session.created` / `session.updated` (GA) or `transcription_session.created` / `.updated` (beta)."""
    prefix = "session" if form == "ga" else "transcription_session"
    return event(f"{prefix}.{kind}", session=session)
