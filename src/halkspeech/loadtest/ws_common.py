"""Client side of the `/ws` push-to-talk protocol, shared by `halkspeech ws-client` and `loadtest ws`:
connecting (with the API key), cutting audio into 16-bit PCM frames, sending them at a pace, and an energy
gate that holds back silence."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidURI

from halkspeech.errors import HalkSpeechError

SAMPLE_RATE = 16_000

#: Errors after which the turn goes on: the server ended it itself (too much audio, open too long) and its
#: `final` still follows (the protocol promises it), or one frame was refused. Warnings, not failures.
TURN_GOES_ON = frozenset({"audio_too_long", "turn_timeout", "invalid_audio"})
#: Of those, the ones that ended the turn: the client stops sending audio and waits for the final.
TURN_ENDED = frozenset({"audio_too_long", "turn_timeout"})


class ConnectionFailed(HalkSpeechError):
    """The server could not be reached or refused the WebSocket handshake."""

    code = "connection_failed"


def ws_url(url: str, path: str = "/ws") -> str:
    """Accept http(s):// and bare host:port too; add `path` when none is given."""
    if "://" not in url:
        url = "ws://" + url
    scheme, _, rest = url.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("ws", "wss"):
        raise ConnectionFailed(f"expected a ws:// or wss:// URL, got {url!r}")
    url = f"{scheme}://{rest}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        raise ConnectionFailed(f"not a valid URL: {url!r} ({exc})") from None
    if not parts.hostname:
        raise ConnectionFailed(f"the URL has no host: {url!r}")
    if parts.path in ("", "/"):
        url = url.rstrip("/") + path
    return url


async def open_ws(url: str, api_key: str | None = None, *, timeout: float = 10.0) -> ClientConnection:
    """Connect, sending `Authorization: Bearer <key>` when a key is given; one-line errors."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        return await connect(
            ws_url(url),
            additional_headers=headers,
            open_timeout=timeout,
            max_size=16 * 2**20,
            compression=None,  # PCM does not deflate well; spare both sides the CPU
            proxy=None,
        )
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ValueError) as exc:
        raise ConnectionFailed(f"cannot open {url}: {exc}") from exc


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] [n] → int16 [n]."""
    return (np.clip(audio, -1.0, 1.0 - 1 / 32768) * 32768).astype("<i2")


def pcm_frames(pcm: np.ndarray, frame_ms: float = 20.0, sample_rate: int = SAMPLE_RATE) -> list[bytes]:
    """int16 [n] at `sample_rate` → frames of `frame_ms` as little-endian bytes (the last may be shorter)."""
    step = max(1, int(sample_rate * frame_ms / 1000))
    return [pcm[i : i + step].astype("<i2").tobytes() for i in range(0, len(pcm), step)]


class EnergyGate:
    """Client-side VAD: drop frames quieter than `threshold_db` (dBFS RMS) unless they are within `pad_frames`
    of a louder one, so word edges survive. Frames come out in order, each at most `pad_frames` late."""

    def __init__(self, threshold_db: float = -45.0, pad_frames: int = 15) -> None:  # 15: 300 ms of 20 ms
        self.threshold_db = threshold_db
        self.pad_frames = pad_frames
        self._held: list[bytes] = []  # quiet frames that may still precede speech
        self._since_loud = pad_frames  # quiet frames since the last loud one

    def push(self, frame: bytes) -> list[bytes]:
        """One frame in → the frames to send now (none, this one, or held ones and this one)."""
        if self.loud(frame):
            out, self._held = [*self._held, frame], []
            self._since_loud = 0
            return out
        if self._since_loud < self.pad_frames:
            self._since_loud += 1
            return [frame]
        self._held = [*self._held, frame][-self.pad_frames :] if self.pad_frames else []
        return []

    def filter(self, frames: Iterable[bytes]) -> Iterator[bytes]:
        for frame in frames:
            yield from self.push(frame)

    def loud(self, frame: bytes) -> bool:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768
        rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
        return 20 * np.log10(max(rms, 1e-10)) >= self.threshold_db


async def paced(frames: list[bytes], speed: float, frame_s: float) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (index, frame) at real time × speed on an absolute schedule (no drift); speed 0: at once."""
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        if speed > 0:
            delay = start + i * frame_s / speed - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i, frame


def start_message(
    *,
    language: str | None = None,
    model: str | None = None,
    partials: bool = False,
    segment_silence_ms: int | None = None,
    vad: bool = False,
    task: str = "transcribe",
    sample_rate: int = SAMPLE_RATE,
    hotwords: str | None = None,
) -> str:
    message: dict[str, Any] = {"type": "start", "task": task, "sample_rate": sample_rate, "partials": partials}
    if language:
        message["language"] = language
    if model:
        message["model"] = model
    if segment_silence_ms is not None:
        message["segment_silence_ms"] = segment_silence_ms
    if vad:
        message["vad"] = True
    if hotwords:
        message["hotwords"] = hotwords
    return json.dumps(message)


END_MESSAGE = json.dumps({"type": "end"})


def parse(message: str | bytes) -> dict[str, Any]:
    """A server message; anything unexpected becomes an `error` of code `bad_server_message`."""
    try:
        data = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return {"type": "error", "code": "bad_server_message", "message": repr(message)[:200]}
    return data
