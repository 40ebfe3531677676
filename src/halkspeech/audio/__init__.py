"""Audio layer (a leaf): bytes, paths or files -> 16 kHz mono float32 -> Whisper log-mel, on CPU or GPU."""

from halkspeech.audio.decode import AudioSource, audio_duration, decode_audio, decode_pcm16
from halkspeech.audio.features import log_mel_spectrogram, log_mel_windows, mel_filters, pad_or_trim

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
