"""Client side of OpenAI's Realtime API for transcription (`/v1/realtime`, docs/realtime.md) as `loadtest ws
--protocol realtime` speaks it: the URL, the client events, and the server events translated into `/ws`'s words
(`final`, `partial`, `error` with a flat `code`), so that one load tester times and counts both protocols."""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

from halkspeech.loadtest.ws_common import ws_url

PATH = "/v1/realtime"
#: What OpenAI's realtime clients send (the protocol's default): the server resamples it to 16 kHz, and that is
#: part of the load, so the simulated users send it too.
SAMPLE_RATE = 24_000
#: OpenAI's non-streaming name: the server sends no deltas while the user speaks, only the whole transcript
#: at the end (one delta, then `completed`). Any other name streams deltas from partial results.
NON_STREAMING_MODEL = "whisper-1"
STREAMING_MODEL = "gpt-4o-transcribe"  # one of OpenAI's names: the server's default model, with deltas
PREFIX = "conversation.item.input_audio_transcription."
COMMIT = json.dumps({"type": "input_audio_buffer.commit"})


def realtime_url(url: str) -> str:
    """Add /v1/realtime when no path is given, and `?intent=transcription` (what OpenAI's clients send) when
    there is no query."""
    url = ws_url(url, PATH)
    return url if "?" in url else url + "?intent=transcription"


def transcription_model(model: str | None, partials: bool) -> str:
    """The session's model: the one named, else OpenAI's name for the server's default with or without deltas."""
    return model or (STREAMING_MODEL if partials else NON_STREAMING_MODEL)


def session_update(*, model: str, language: str | None, sample_rate: int = SAMPLE_RATE) -> str:
    """GA `session.update`: PCM16 at `sample_rate`, no turn detection (the client commits each turn)."""
    transcription: dict[str, Any] = {"model": model}
    if language:
        transcription["language"] = language
    audio = {"format": {"type": "audio/pcm", "rate": sample_rate}, "transcription": transcription}
    session = {"type": "transcription", "audio": {"input": audio | {"turn_detection": None}}}
    return json.dumps({"type": "session.update", "session": session})


@functools.cache  # every user sends the same clips' frames: each is encoded once (bytes keep their hash)
def append(frame: bytes) -> str:
    """`input_audio_buffer.append` of one PCM16 frame."""
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(frame).decode()})


def as_ws_message(message: dict[str, Any], *, deltas: bool) -> dict[str, Any]:
    """A server event (already `ws_common.parse`d) in `/ws`'s words: `completed` → `final` (with `duration`),
    a delta → `partial` (when the session streams them: whisper-1's one delta is the final's text), `error` and
    `...transcription.failed` → `error` with the code at top level. Others pass as they are (their types are
    none of /ws's)."""
    kind = message["type"]
    if kind == "error" or kind == PREFIX + "failed":
        error = message.get("error")
        code, text = (error.get("code"), error.get("message")) if isinstance(error, dict) else (None, None)
        return {"type": "error", "code": code or message.get("code") or "bad_server_message", "message": text}
    if kind == PREFIX + "completed":
        usage = message.get("usage")
        seconds = usage.get("seconds") if isinstance(usage, dict) else None
        return {"type": "final", "text": message.get("transcript"), "duration": seconds}
    if kind == PREFIX + "delta":
        return {"type": "partial", "text": message.get("delta")} if deltas else {"type": "delta"}
    return message
