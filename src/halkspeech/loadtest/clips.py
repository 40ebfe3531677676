"""What the request load testers send: clips read once, as files and as Triton's WAV samples, and the
TEXT_PREFIX of TensorRT-LLM's Whisper examples. Shared by the HTTP (loadtest/http.py) and gRPC
(loadtest/triton_grpc.py) clients."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from halkspeech.audio import decode_audio
from halkspeech.errors import AudioDecodeError, InvalidRequest
from halkspeech.model.dims import SAMPLE_RATE

TRITON_MODEL = "whisper"  # the name TensorRT-LLM's Triton examples give the Whisper model


@dataclass(frozen=True)
class Clip:
    name: str
    data: bytes  # the file, as posted to the OpenAI and simple APIs
    seconds: float
    samples: bytes  # 16 kHz float32, as Triton's WAV input


#: One request of a clip: its failure's name (an HTTP status, "timeout", a gRPC status ...), or None when it
#: succeeded.
Send = Callable[[Clip], Awaitable[str | None]]


def load_clips(paths: tuple[Path, ...]) -> list[Clip]:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvalidRequest(f"no such file: {', '.join(missing)}")
    clips = []
    for path in paths:
        audio = read_audio(path)
        clips.append(Clip(path.name, path.read_bytes(), len(audio) / SAMPLE_RATE, audio.astype("<f4").tobytes()))
    return clips


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A clip's samples; an error names the file, one of several --audio files."""
    try:
        return decode_audio(path, sample_rate=sample_rate)
    except AudioDecodeError as e:
        raise AudioDecodeError(f"{path}: {e}") from e


def text_prefix(language: str | None) -> str:
    """TEXT_PREFIX of TensorRT-LLM's Whisper examples: transcribe, no timestamps, the language if known."""
    return f"<|startoftranscript|>{f'<|{language}|>' if language else ''}<|transcribe|><|notimestamps|>"
