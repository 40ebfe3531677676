"""decode_audio / decode_pcm16 on real recordings, re-encoded with PyAV into the formats users upload."""

from __future__ import annotations

import importlib
import io
import struct
import subprocess
import sys
import threading
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import av.logging
import numpy as np
import pytest

import halkspeech.audio.decode as decode_module
from conftest import DEV_DIR, TEST_DATA, long_opus
from halkspeech.audio.decode import _resampled, audio_duration, decode_audio, decode_pcm16
from halkspeech.errors import AudioDecodeError, AudioTooLong, Cancelled

SHORT_CLIP = TEST_DATA / "1089-134691-0000.flac"  # 2.085 s, 16 kHz mono: "HE COULD WAIT NO LONGER"
STEREO_CLIP = DEV_DIR / "faster-whisper-tests" / "stereo_diarization.wav"

# tests/data holds copies of dev clips; durations from ../shared/data/dev/manifest.jsonl.
COMMITTED_DURATIONS = {
    "jfk.flac": 11.0,
    "LJ001-0002.wav": 1.9,
    "1089-134691-0000.flac": 2.085,
    "test_de.wav": 5.256,
}


# --- helpers ------------------------------------------------------------------------------------------------


def _decode_at(path: Path, rate: int) -> np.ndarray:
    """The clip as mono float32 at `rate`, to feed an encoder."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def _encode(
    audio: np.ndarray,  # [channels, n] float32 at `rate`
    rate: int,
    container_format: str,
    codec: str,
    *,
    video_codec: str | None = None,
    options: dict[str, str] | None = None,
    target: Any = None,
) -> bytes:
    """Encode planar float audio (and black video frames, if asked) with PyAV; returns the file's bytes."""
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    out = io.BytesIO() if target is None else target
    with av.open(out, "w", format=container_format, options=options or {}) as container:
        if video_codec is not None:
            video = container.add_stream(video_codec, rate=25)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.format.name, layout=layout, rate=rate, frame_size=ctx.frame_size)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        for chunk in [*resampler.resample(frame), *resampler.resample(None), None]:
            container.mux(stream.encode(chunk))
        if video_codec is not None:
            for i in range(int(audio.shape[1] / rate * 25)):
                image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                image.pts = i
                container.mux(video.encode(image))
            container.mux(video.encode(None))
    return bytes(out.data) if target is not None else out.getvalue()


class _Pipe(io.RawIOBase):
    """A write-only, non-seekable sink, like a browser's MediaRecorder stream."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)


class _CountingReader(io.RawIOBase):
    """A readable file over bytes that counts what was read; optionally not seekable (a pipe)."""

    def __init__(self, data: bytes, *, seekable: bool = True) -> None:
        self._inner = io.BytesIO(data)
        self._seekable = seekable
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def read(self, size: int | None = -1) -> bytes:
        chunk = self._inner.read(size)
        self.bytes_read += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


def _wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """int16 samples [n] or [n, channels] as a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 1600) -> float:
    """Normalised cross-correlation of two [n] signals, maximised over lags up to 0.1 s (codec delay)."""
    n = min(a.size, b.size)
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    size = 1 << (2 * n).bit_length()
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([xc[: max_lag + 1], xc[-max_lag:]])
    return float(lags.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_one_line(error: pytest.ExceptionInfo[Exception], *words: str) -> None:
    message = str(error.value)
    assert message and "\n" not in message, message
    assert "Errno" not in message and "avcodec" not in message, message  # no FFmpeg internals
    assert any(word in message for word in words), message


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode_audio(SHORT_CLIP)


# --- what decodes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMMITTED_DURATIONS))
def test_committed_clips_decode_to_16k_mono_float32(name: str) -> None:
    audio = decode_audio(TEST_DATA / name)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio_duration(audio) == pytest.approx(COMMITTED_DURATIONS[name], abs=0.05)
    assert 0.01 < np.abs(audio).max() <= 1.0


def test_dev_clips_decode_to_manifest_duration(dev_clips: list[dict[str, Any]]) -> None:
    for clip in dev_clips:
        audio = decode_audio(clip["path"])
        # The manifest's mp3 lengths include LAME's encoder delay and padding (1105 + ~1150 samples), which
        # FFmpeg trims using the gapless header, as it does for openai-whisper: allow that much more.
        tolerance = 0.06 if clip["path"].suffix == ".mp3" else 0.05
        assert audio.dtype == np.float32 and audio.ndim == 1, clip["audio"]
        assert audio_duration(audio) == pytest.approx(clip["duration"], abs=tolerance), clip["audio"]


def test_stereo_file_is_averaged_to_mono() -> None:
    if not STEREO_CLIP.exists():
        pytest.skip(f"{STEREO_CLIP} is absent")
    with av.open(str(STEREO_CLIP)) as container:
        assert container.streams.audio[0].channels == 2
        frames = container.decode(audio=0)
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])  # s16, interleaved: [2n]
    left, right = pcm[0::2] / 32768.0, pcm[1::2] / 32768.0
    assert not np.allclose(left, right)  # the channels differ, so a wrong mix would show
    np.testing.assert_allclose(decode_audio(STEREO_CLIP), (left + right) / 2, atol=1e-6)


def test_downmix_matches_ffmpeg_s16_output(reference: np.ndarray) -> None:
    # Left = speech, right = silence: `ffmpeg -ac 1 -f s16le` (openai-whisper) gives speech/2, not /sqrt(2).
    stereo = np.stack([reference, np.zeros_like(reference)])
    audio = decode_audio(_encode(stereo, 16000, "wav", "pcm_f32le"))
    np.testing.assert_allclose(audio, reference / 2, atol=1e-6)


def _video_codec() -> str | None:
    return next((c for c in ("libx264", "mpeg4") if c in av.codecs_available), None)


# (container, codec, sample rate, channels, extra): formats browsers, phones and recorders produce.
ENCODED_CASES: dict[str, tuple[str, str, int, int, dict[str, Any]]] = {
    "wav-44k-stereo": ("wav", "pcm_s16le", 44100, 2, {}),
    "wav-48k-stereo": ("wav", "pcm_s16le", 48000, 2, {}),
    "wav-8k-stereo": ("wav", "pcm_s16le", 8000, 2, {}),
    "flac-48k": ("flac", "flac", 48000, 1, {}),
    "mp3-44k-stereo": ("mp3", "libmp3lame", 44100, 2, {}),
    "ogg-opus": ("ogg", "libopus", 48000, 1, {}),
    "m4a-aac": ("mp4", "aac", 44100, 2, {}),
    "webm-opus": ("webm", "libopus", 48000, 2, {}),
    "webm-opus-streamed": ("webm", "libopus", 48000, 1, {"target": "pipe"}),  # MediaRecorder: no duration
    "mp4-video-aac": ("mp4", "aac", 44100, 2, {"video": True}),
}


@pytest.mark.parametrize("case", sorted(ENCODED_CASES))
def test_encoded_formats_decode_to_the_original(case: str, reference: np.ndarray) -> None:
    container_format, codec, rate, channels, extra = ENCODED_CASES[case]
    video = _video_codec() if extra.get("video") else None
    if extra.get("video") and video is None:
        pytest.skip("PyAV has no video encoder here")
    source = np.tile(_decode_at(SHORT_CLIP, rate)[None], (channels, 1))
    target = _Pipe() if extra.get("target") == "pipe" else None
    data = _encode(source, rate, container_format, codec, video_codec=video, target=target)
    audio = decode_audio(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio_duration(audio) == pytest.approx(audio_duration(reference), abs=0.1)
    # 8 kHz keeps only the band below 4 kHz, where most of speech's energy is.
    assert _best_correlation(audio, reference) > (0.85 if rate == 8000 else 0.9)
    assert np.abs(audio).max() == pytest.approx(np.abs(reference).max(), rel=0.25)  # no 3 dB downmix gain


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "bytearray", "memoryview", "file", "pipe"])
def test_every_source_kind(kind: str, reference: np.ndarray) -> None:
    data = SHORT_CLIP.read_bytes()
    sources: dict[str, Callable[[], Any]] = {
        "path": lambda: SHORT_CLIP,
        "str": lambda: str(SHORT_CLIP),
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(data),
        "file": lambda: SHORT_CLIP.open("rb"),
        "pipe": lambda: _CountingReader(data, seekable=False),
    }
    source = sources[kind]()
    np.testing.assert_array_equal(decode_audio(source), reference)


def test_seekable_file_is_read_from_its_start(reference: np.ndarray) -> None:
    file = io.BytesIO(SHORT_CLIP.read_bytes())
    file.seek(0, io.SEEK_END)  # as left by whoever wrote the upload to it
    np.testing.assert_array_equal(decode_audio(file), reference)


def test_other_output_rate(reference: np.ndarray) -> None:
    audio = decode_audio(SHORT_CLIP, sample_rate=8000)
    assert audio_duration(audio, 8000) == pytest.approx(audio_duration(reference), abs=0.01)


def test_silence_is_not_an_error() -> None:
    audio = decode_audio(_wav_bytes(np.zeros(16000, np.int16)))
    assert audio.shape == (16000,) and not audio.any()


def test_format_change_mid_stream_gets_a_new_resampler() -> None:
    # HE-AAC and chained streams can switch rate or layout; PyAV's resampler raises on that: make a new one.
    def frame(rate: int, layout: str, seconds: float) -> av.AudioFrame:
        channels = 1 if layout == "mono" else 2
        f = av.AudioFrame.from_ndarray(np.zeros((channels, int(rate * seconds)), np.float32), "fltp", layout)
        f.sample_rate = rate
        return f

    frames = iter([frame(44100, "stereo", 1.0), frame(22050, "mono", 0.5), frame(48000, "stereo", 0.25)])
    assert sum(chunk.size for chunk in _resampled(frames, 16000)) == pytest.approx(1.75 * 16000, abs=32)


# --- what is refused ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_empty_bytes(empty: Any) -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(empty)
    _assert_one_line(error, "empty")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    for source in (path, path.open("rb")):
        with pytest.raises(AudioDecodeError) as error:
            decode_audio(source)
        _assert_one_line(error, "empty")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(tmp_path / "nope.wav")
    _assert_one_line(error, "No such file")


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (np.random.default_rng(0).bytes(20_000), "not audio"),
        (b"Meeting notes\n- ask about the budget\n" * 50, "text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + np.random.default_rng(1).bytes(2000), "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + np.random.default_rng(2).bytes(2000), "JPEG"),
        (b"%PDF-1.7\n" + np.random.default_rng(3).bytes(2000), "PDF"),
    ],
    ids=["random", "text", "png", "jpeg", "pdf"],
)
def test_not_audio(data: bytes, word: str) -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(data)
    _assert_one_line(error, word)


def test_real_image_has_no_audio() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        image = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(buf.getvalue())
    _assert_one_line(error, "PNG")


def test_video_without_audio_track() -> None:
    codec = _video_codec()
    if codec is None:
        pytest.skip("PyAV has no video encoder here")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            image.pts = i
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(buf.getvalue())
    _assert_one_line(error, "no audio track")


@pytest.mark.parametrize(("channels", "rate"), [(9, 16000), (1, 2**31 - 1)])
def test_audio_ffmpeg_cannot_resample_is_a_decode_error(channels: int, rate: int) -> None:
    """swresample has no downmix for 9 channels without a layout, nor memory for a 2**31 Hz filter."""
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_wav_bytes(np.zeros((4000, channels), np.int16), rate=rate))
    _assert_one_line(error, "cannot convert")


@pytest.mark.parametrize("rate", [1, 999])
def test_a_sample_rate_too_low_for_speech_says_so(rate: int) -> None:
    """A valid WAV of 5 samples at 1 Hz was called truncated (it held 0.0 s of the 5.0 s its header said)."""
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_wav_bytes(np.ones((5, 1), np.int16), rate=rate))
    _assert_one_line(error, f"sample rate is {rate} Hz: too low to hold speech")


def _float_wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """float32 mono samples [n] as an IEEE-float WAV (format tag 3), which `wave` cannot write."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_float_samples_come_back_as_16_bit_pcm_would_hold_them() -> None:
    """NaN, infinities and values past full scale in a float WAV: NaN is silence and the rest is clipped to
    [-1, 1], as openai-whisper's s16 decode leaves them, so the log-mel stays finite."""
    tone = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    odd = tone.copy()
    odd[::7], odd[1::7], odd[2::7], odd[3::7] = np.nan, np.inf, -np.inf, 1e38
    audio = decode_audio(_float_wav_bytes(odd))
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert (audio[::7] == 0).all() and (audio[1::7] == 1).all() and (audio[2::7] == -1).all()
    plain = np.r_[0:16000][np.r_[0:16000] % 7 >= 4]
    np.testing.assert_allclose(audio[plain], tone[plain], atol=1e-6)  # ordinary samples untouched


def test_zero_length_wav() -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_wav_bytes(np.zeros(0, np.int16)))
    _assert_one_line(error, "no samples")


def test_tags_that_are_not_utf8_do_not_stop_a_decode() -> None:
    """A WAV titled in Latin-1 ("Café"): PyAV up to 18 raised UnicodeDecodeError opening it unless told to
    ignore such bytes, and PyAV 19 refuses that argument (decode.py passes it by version)."""
    pcm = (np.sin(np.arange(16_000) * 0.1) * 3000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 16_000, 32_000, 2, 16)
    title = b"Caf\xe9 \xff\xfe\x00"
    info = b"INFOINAM" + struct.pack("<I", len(title)) + title
    chunks = [b"fmt ", struct.pack("<I", len(fmt)), fmt, b"LIST", struct.pack("<I", len(info)), info]
    body = b"".join([b"WAVE", *chunks, b"data", struct.pack("<I", len(pcm)), pcm])
    audio = decode_audio(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert audio.shape == (16_000,) and np.abs(audio).max() == pytest.approx(3000 / 32768, abs=1e-3)


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def test_truncated_flac() -> None:
    # FLAC: the cut frame fails to decode, and STREAMINFO's sample count would betray the cut anyway.
    data = (TEST_DATA / "jfk.flac").read_bytes()
    for fraction in (0.5, 0.97):
        with pytest.raises(AudioDecodeError) as error:
            decode_audio(_cut(data, fraction))
        _assert_one_line(error, "truncated")


def test_truncated_wav() -> None:
    # FFmpeg silently clamps the data chunk to the file; the header's size is checked here.
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_cut((TEST_DATA / "LJ001-0002.wav").read_bytes(), 0.5))
    _assert_one_line(error, "truncated")


def test_streamed_wav_with_placeholder_size_is_not_truncated(reference: np.ndarray) -> None:
    # Writers that cannot seek back leave 0xFFFFFFFF as the data size (FFmpeg to a pipe does): not a cut.
    data = _encode(reference[None], 16000, "wav", "pcm_s16le", target=_Pipe())
    size_at = data.index(b"data") + 4
    assert data[size_at : size_at + 4] == b"\xff\xff\xff\xff"
    assert audio_duration(decode_audio(data)) == pytest.approx(audio_duration(reference), abs=0.01)


@pytest.mark.parametrize("byte_rate", [1, 32000, 10**9], ids=["1", "half", "huge"])
def test_wav_length_comes_from_the_sample_format_not_the_byte_rate_field(reference: np.ndarray, byte_rate: int) -> None:
    """FFmpeg ignores a PCM WAV's nAvgBytesPerSec, and writers get it wrong: 11 s of stereo whose header says
    32000 (half the real rate) was refused as "truncated: 11.0 s of the 22.0 s", and with 1 as too long."""
    data = bytearray(_wav_bytes(np.stack([reference, reference], axis=1) * 3000))
    assert struct.unpack_from("<I", data, 28)[0] == 64000  # fmt's byte-rate field
    struct.pack_into("<I", data, 28, byte_rate)
    decoded = decode_audio(bytes(data), max_duration_s=60)
    assert audio_duration(decoded) == pytest.approx(audio_duration(reference), abs=0.001)
    with pytest.raises(AudioDecodeError, match=r"truncated: it holds 1\.\d s of the 2\.\d s"):
        decode_audio(_cut(bytes(data), 0.5))  # a real cut is still found


@pytest.mark.parametrize("id3_size", [0, 3000], ids=["bare", "id3v2-tag"])
def test_truncated_mp3_with_xing_header(id3_size: int) -> None:
    # LAME's Xing/Info frame holds the frame count (found past an ID3v2 tag, which may be large: cover art);
    # a cut one byte past the middle ends inside a frame.
    data = _encode(np.tile(_decode_at(SHORT_CLIP, 44100)[None], (2, 1)), 44100, "mp3", "libmp3lame")
    if id3_size:
        syncsafe = bytes((id3_size >> shift) & 0x7F for shift in (21, 14, 7, 0))
        data = b"ID3\x04\x00\x00" + syncsafe + b"\x00" * id3_size + data  # a tag of padding only
    assert audio_duration(decode_audio(data)) == pytest.approx(2.085, abs=0.01)
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(data[: len(data) // 2 + 1])
    _assert_one_line(error, "truncated")


def test_truncated_dev_mp3(dev_clips: list[dict[str, Any]]) -> None:  # dev_clips: skip without the dev set
    data = (DEV_DIR / "faster-whisper-tests" / "hotwords.mp3").read_bytes()
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(data[: len(data) // 2 + 1])
    _assert_one_line(error, "truncated")


def test_truncated_mp3_without_length_header_is_undetectable(reference: np.ndarray) -> None:
    # Without a Xing/VBRI frame nothing in an MP3 states its length (FFmpeg guesses it from the bitrate and
    # the file size), and every complete frame decodes: a cut file is just a shorter recording.
    data = _encode(_decode_at(SHORT_CLIP, 44100)[None], 44100, "mp3", "libmp3lame", options={"write_xing": "0"})
    audio = decode_audio(data[: len(data) // 2 + 1])
    assert audio_duration(audio) == pytest.approx(audio_duration(reference) / 2, abs=0.2)


@pytest.mark.parametrize(("container_format", "codec"), [("webm", "libopus"), ("adts", "aac")])
def test_truncated_webm_and_adts(container_format: str, codec: str) -> None:
    # WebM: the Segment duration; raw AAC: the cut frame fails to decode.
    rate = 48000 if codec == "libopus" else 44100
    data = _encode(_decode_at(SHORT_CLIP, rate)[None], rate, container_format, codec)
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_cut(data, 0.5))
    _assert_one_line(error, "truncated")


def test_truncated_m4a_without_its_index() -> None:
    # FFmpeg writes the moov index at the end: a cut file cannot even be opened.
    data = _encode(_decode_at(SHORT_CLIP, 44100)[None], 44100, "mp4", "aac")
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(_cut(data, 0.5))
    _assert_one_line(error, "truncated")


def test_ffconcat_upload_cannot_read_server_files(monkeypatch: pytest.MonkeyPatch) -> None:
    # An uploaded ffconcat playlist naming a file beside the server's working directory must not be followed.
    monkeypatch.chdir(TEST_DATA)
    with pytest.raises(AudioDecodeError):
        decode_audio(b"ffconcat version 1.0\nfile 'jfk.flac'\n")


def test_importing_decode_silences_ffmpeg(capfd: pytest.CaptureFixture[str]) -> None:
    # With FFmpeg's own log callback, a cut FLAC prints "[flac @ 0x...] invalid residual" lines to stderr.
    data = (TEST_DATA / "jfk.flac").read_bytes()
    av.logging.restore_default_callback()
    try:
        importlib.reload(decode_module)
        for bad in (_cut(data, 0.5), np.random.default_rng(0).bytes(5000)):
            with pytest.raises(AudioDecodeError):
                decode_module.decode_audio(bad)
        assert capfd.readouterr().err == ""
    finally:
        av.logging.set_level(None)


# --- max_duration_s -----------------------------------------------------------------------------------------


def test_too_long() -> None:
    with pytest.raises(AudioTooLong) as error:
        decode_audio(TEST_DATA / "jfk.flac", max_duration_s=5)
    _assert_one_line(error, "longer than the limit of 5 s")
    assert audio_duration(decode_audio(TEST_DATA / "jfk.flac", max_duration_s=11)) == 11.0


@pytest.mark.parametrize("seekable", [True, False], ids=["header", "pipe"])
def test_too_long_stops_early(seekable: bool) -> None:
    # 60 s of noise with a 5 s limit: refused from the header, or as soon as the decoded audio passes 5 s.
    noise = (np.random.default_rng(0).standard_normal(60 * 16000) * 3000).astype(np.int16)
    data = _wav_bytes(noise)
    reader = _CountingReader(data, seekable=seekable)
    with pytest.raises(AudioTooLong):
        decode_audio(reader, max_duration_s=5)
    assert reader.bytes_read < 0.2 * len(data)


def test_a_set_stop_event_ends_decoding_at_the_next_frame() -> None:
    """The server sets it when a request ends while its audio decodes in a worker thread."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        decode_audio(TEST_DATA / "jfk.flac", stop=stop)
    assert audio_duration(decode_audio(TEST_DATA / "jfk.flac", stop=threading.Event())) == 11.0


_PEAK_MEMORY = """
import sys, numpy as np
from halkspeech.audio.decode import decode_audio
data = open(sys.argv[1], "rb").read()
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
decode_audio(data[: len(data) // 100])  # FFmpeg's own set-up is not the audio's
before = peak()
audio = decode_audio(data)
print(audio.size, (peak() - before) / audio.nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident size from /proc")
def test_decoding_needs_little_more_memory_than_the_audio(tmp_path: Path) -> None:
    """5 minutes of 20 ms Opus frames (what browsers record), decoded in a fresh process: the peak grows by
    ~1.3x the float32 samples. Keeping every decoded frame alive and concatenating them took 3.7x."""
    path = long_opus(tmp_path / "five_minutes.ogg", 5 * 60)
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path)], capture_output=True, text=True, check=True)
    samples, growth = run.stdout.split()
    assert int(samples) == pytest.approx(5 * 60 * 16000, abs=16000)
    assert float(growth) < 1.6


# --- decode_pcm16 -------------------------------------------------------------------------------------------


def test_pcm16_round_trip() -> None:
    pcm = np.array([0, 1, -1, 16384, -16384, 32767, -32768], dtype="<i2")
    audio = decode_pcm16(pcm.tobytes())
    assert audio.dtype == np.float32
    np.testing.assert_array_equal(audio, pcm / 32768.0)
    assert decode_pcm16(b"").shape == (0,)


def test_pcm16_odd_length() -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_pcm16(b"\x00\x01\x02")
    _assert_one_line(error, "even number of bytes")


@pytest.mark.parametrize("rate", [4000, 200_000])
def test_pcm16_bad_rate(rate: int) -> None:
    with pytest.raises(AudioDecodeError) as error:
        decode_pcm16(b"\x00\x00" * 100, sample_rate=rate)
    _assert_one_line(error, "8000 to 192000")


def test_pcm16_resamples_48k(reference: np.ndarray) -> None:
    pcm = np.round(_decode_at(SHORT_CLIP, 48000) * 32767).astype("<i2")
    audio = decode_pcm16(pcm.tobytes(), sample_rate=48000)
    assert audio_duration(audio) == pytest.approx(pcm.size / 48000, abs=0.005)
    assert _best_correlation(audio, reference) > 0.99
