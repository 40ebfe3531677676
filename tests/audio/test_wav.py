"""The 16 kHz mono 16-bit WAV fast path gives exactly decode_audio's samples, and hands everything else
(other rates, stereo, truncated, too long) to decode_audio with its checks and messages; a server reads small
ones without a worker thread (small_pcm_wav)."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from conftest import TEST_DATA
from halkspeech.audio import decode_audio
from halkspeech.audio.wav import INLINE_BYTES, decode_upload, pcm_wav_samples, small_pcm_wav
from halkspeech.errors import AudioDecodeError, AudioTooLong

GERMAN = TEST_DATA / "test_de.wav"  # 16 kHz mono 16-bit
LJ = TEST_DATA / "LJ001-0002.wav"  # 22.05 kHz


def wav(samples: np.ndarray, *, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def test_fast_path_matches_decode_audio_exactly() -> None:
    data = GERMAN.read_bytes()
    fast = pcm_wav_samples(data)
    assert fast is not None and fast.dtype == np.float32
    assert np.array_equal(fast, decode_audio(data))
    ramp = wav(np.arange(-32768, 32768, 7))  # every corner of the 16-bit range
    assert np.array_equal(pcm_wav_samples(ramp), decode_audio(ramp))  # type: ignore[arg-type]


def test_other_inputs_are_left_to_decode_audio() -> None:
    tone = (np.sin(np.arange(16000) / 10) * 8000).astype(np.int16)
    assert pcm_wav_samples(LJ.read_bytes()) is None  # 22.05 kHz
    assert pcm_wav_samples(wav(np.repeat(tone, 2), channels=2)) is None  # stereo
    assert pcm_wav_samples(wav(tone, rate=8000)) is None
    assert pcm_wav_samples(GERMAN.read_bytes()[:50_000]) is None  # truncated
    assert pcm_wav_samples(wav(tone), max_duration_s=0.5) is None  # too long: decode_audio says so
    assert pcm_wav_samples(b"RIFF") is None and pcm_wav_samples((TEST_DATA / "jfk.flac").read_bytes()) is None


def test_decode_upload() -> None:
    data = GERMAN.read_bytes()
    reference = decode_audio(data)
    file = io.BytesIO(data)
    assert np.array_equal(decode_upload(file), reference) and file.tell() == 0
    assert np.array_equal(decode_upload(LJ.read_bytes()), decode_audio(LJ))  # the ordinary path
    with open(TEST_DATA / "jfk.flac", "rb") as flac:
        assert len(decode_upload(flac)) == 11 * 16000
    with pytest.raises(AudioTooLong, match="longer than the limit of 2 s"):
        decode_upload(io.BytesIO(data), max_duration_s=2)
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_upload(data[:50_000])


class CountingFile(io.BytesIO):
    """A seekable file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_small_wavs_are_read_inline_and_larger_ones_only_sized() -> None:
    data = GERMAN.read_bytes()
    assert len(data) <= INLINE_BYTES
    reference = decode_audio(data)
    file = CountingFile(data)
    assert np.array_equal(small_pcm_wav(data), reference)  # type: ignore[arg-type]
    assert np.array_equal(small_pcm_wav(file), reference) and file.tell() == 0  # type: ignore[arg-type]
    assert small_pcm_wav(data, max_duration_s=2) is None  # decode_upload refuses it, with its message
    assert small_pcm_wav(LJ.read_bytes()) is None and small_pcm_wav((TEST_DATA / "jfk.flac").read_bytes()) is None
    big = CountingFile(wav(np.zeros(INLINE_BYTES // 2, np.int16)))  # a minute and more: a worker thread's job
    assert small_pcm_wav(big) is None and big.read_bytes == 0 and big.tell() == 0
    assert small_pcm_wav(str(GERMAN)) is None  # a path is opened on the worker thread, not here
