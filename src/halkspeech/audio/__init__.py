"""Audio layer (a leaf): bytes, paths or files -> 16 kHz mono float32 -> Whisper log-mel, on CPU or GPU.

The names below are imported on first use, so code that only computes features (the engine, benchmarks
on a GPU box) does not pull in PyAV/FFmpeg, which only decoding needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below imports lazily
    from halkspeech.audio.decode import AudioSource, audio_duration, decode_audio, decode_pcm16
    from halkspeech.audio.features import log_mel_spectrogram, log_mel_windows, mel_filters, pad_or_trim

_HOME = {
    "AudioSource": "decode",
    "audio_duration": "decode",
    "decode_audio": "decode",
    "decode_pcm16": "decode",
    "log_mel_spectrogram": "features",
    "log_mel_windows": "features",
    "mel_filters": "features",
    "pad_or_trim": "features",
}
__all__ = [
    "AudioSource",
    "audio_duration",
    "decode_audio",
    "decode_pcm16",
    "log_mel_spectrogram",
    "log_mel_windows",
    "mel_filters",
    "pad_or_trim",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
