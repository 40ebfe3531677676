"""Any audio or video FFmpeg reads -> mono float32 at 16 kHz, with one-line errors a user can act on.

PyAV runs FFmpeg's demuxers, decoders and swresample in-process, so the samples match what openai-whisper
gets from `ffmpeg -i x -ac 1 -ar 16000 -f s16le -` up to 16-bit rounding, with no ffmpeg binary or subprocess.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import av
import av.logging
import numpy as np
from av.container import InputContainer
from av.error import FFmpegError

from halkspeech.errors import AudioDecodeError, AudioTooLong, Cancelled
from halkspeech.model.dims import SAMPLE_RATE

AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
ReadAt = Callable[[int, int], bytes]  # (offset, size) -> the input's raw bytes there; short past the end

# PyAV >= 13 already drops FFmpeg's log lines; set it explicitly so that a library which reinstalled FFmpeg's
# default callback cannot make every bad upload print "Invalid data found when processing input" to stderr.
av.logging.set_level(None)

# FFmpeg only normalises its downmix matrix for integer output: `ffmpeg -ac 1 -f s16le` (openai-whisper) mixes
# stereo as (L+R)/2, float output as (L+R)/sqrt(2): 3 dB louder, over 1.0 on loud input. Cap it likewise.
_SWR_OPTIONS = {"rematrix_maxval": "1.0"}
# Nested opens are how an uploaded ffconcat/HLS playlist would read files or URLs on the server: allow none.
_CONTAINER_OPTIONS = {"protocol_whitelist": "none"}
# Tags that are not UTF-8 (a Latin-1 title) must not stop a decode. PyAV up to 18 decodes them strictly unless
# told to ignore errors; PyAV 19 (Python 3.12 and later) has no such argument, and passing it failed every open.
_STRICT_TAGS = int(av.__version__.split(".")[0]) < 19

# A file is "truncated" when it decodes to under 90% of the length its header declares and to more than 0.1 s
# less; codec delay and padding (AAC priming, Opus pre-skip: < 0.05 s) stay well inside that.
_MIN_FRACTION = 0.9
_SLACK_S = 0.1
MIN_SAMPLE_RATE = 1000  # Hz: speech needs more (telephone audio is 8000), and swresample's filter needs some
_WAV_PLACEHOLDER = 0x7F00_0000  # sizes near 2**31 or 2**32: what streaming writers put before they know

# (offset, signature, name) to name what FFmpeg could not open; only for the message.
_AUDIO_MAGIC = (
    (0, b"RIFF", "WAV"),
    (0, b"fLaC", "FLAC"),
    (0, b"OggS", "Ogg"),
    (0, b"ID3", "MP3"),
    (4, b"ftyp", "MP4/M4A"),
    (0, b"\x1aE\xdf\xa3", "WebM/Matroska"),
    (0, b"FORM", "AIFF"),
)
_OTHER_MAGIC = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
)


def decode_audio(
    source: AudioSource,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Decode the first audio stream of a path, bytes or binary file to mono float32 at `sample_rate`: [n].
    Once `stop` is set (by whoever waits for this thread), decoding ends at the next frame with Cancelled."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    with _input(source) as (file, read_at), _open_container(file, read_at) as container:
        stream = _audio_stream(container, read_at)
        declared = _declared_seconds(container, stream, read_at)
        if max_duration_s is not None and declared is not None and declared > max_duration_s + _SLACK_S:
            raise AudioTooLong(_too_long(max_duration_s))  # refused from the header, before any decoding
        errors: list[FFmpegError] = []
        audio = _decode(_frames(container, stream, errors), sample_rate, max_duration_s, stop)
    _check_complete(len(audio) / sample_rate, declared, errors)
    return _as_pcm_range(audio)


def decode_pcm16(data: bytes, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Raw 16-bit little-endian mono PCM -> float32 in [-1, 1) at 16 kHz: [n]."""
    if len(data) % 2:
        raise AudioDecodeError(f"16-bit PCM needs an even number of bytes, got {len(data)}")
    if not 8_000 <= sample_rate <= 192_000:
        raise AudioDecodeError(f"the PCM sample rate must be 8000 to 192000 Hz, got {sample_rate}")
    pcm = np.frombuffer(data, dtype="<i2")  # [n]
    if sample_rate == SAMPLE_RATE or pcm.size == 0:
        return pcm.astype(np.float32) / 32768.0
    frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16)[None, :], format="s16", layout="mono")
    frame.sample_rate = sample_rate
    return _decode(iter([frame]), SAMPLE_RATE, None)


def audio_duration(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Seconds of mono audio [n] at `sample_rate`."""
    return samples.shape[-1] / sample_rate


# --- input --------------------------------------------------------------------------------------------------


@contextmanager
def _input(source: AudioSource) -> Iterator[tuple[BinaryIO, ReadAt | None]]:
    """A binary file for PyAV and random access to the raw bytes (None for a pipe); refuses empty input."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = source if isinstance(source, bytes) else bytes(source)
        if not data:
            raise AudioDecodeError("the audio is empty (0 bytes)")
        yield io.BytesIO(data), lambda offset, size: data[offset : offset + size]
    elif isinstance(source, str | os.PathLike):
        # Opened here, not by FFmpeg: a path is then only ever a local file, never a URL or FFmpeg protocol.
        try:
            file = open(source, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError as e:
            raise AudioDecodeError(f"cannot open the audio file {os.fspath(source)!r}: {e.strerror}") from e
        with file:
            yield from _checked_file(file)
    else:
        yield from _checked_file(source)


def _checked_file(file: BinaryIO) -> Iterator[tuple[BinaryIO, ReadAt | None]]:
    seekable = getattr(file, "seekable", None)
    if not (callable(seekable) and seekable()):
        yield file, None  # a pipe: FFmpeg reads it once; header checks are skipped
        return
    file.seek(0)  # FFmpeg seeks to absolute offsets, so the audio must start at offset 0

    def read_at(offset: int, size: int) -> bytes:
        position = file.tell()
        try:
            file.seek(offset)
            return file.read(size)
        finally:
            file.seek(position)

    if not read_at(0, 1):
        raise AudioDecodeError("the audio is empty (0 bytes)")
    yield file, read_at


@contextmanager
def _open_container(file: BinaryIO, read_at: ReadAt | None) -> Iterator[InputContainer]:
    try:
        if _STRICT_TAGS:
            container = av.open(file, "r", container_options=_CONTAINER_OPTIONS, metadata_errors="ignore")
        else:
            container = av.open(file, "r", container_options=_CONTAINER_OPTIONS)
    except (FFmpegError, ValueError, OSError) as e:
        raise AudioDecodeError(_unreadable(read_at)) from e
    with container:
        yield container


def _audio_stream(container: InputContainer, read_at: ReadAt | None) -> av.AudioStream:
    if container.streams.audio:
        return container.streams.audio[0]
    what = _sniff(read_at, _OTHER_MAGIC)
    if what is not None:
        raise AudioDecodeError(f"the input is {what}, not audio")
    found = " (it has only video)" if container.streams.video else ""
    raise AudioDecodeError(f"the input has no audio track{found}")


def _unreadable(read_at: ReadAt | None) -> str:
    """One line for input FFmpeg could not open: what it looks like, if anything."""
    if (what := _sniff(read_at, _OTHER_MAGIC)) is not None:
        return f"the input is {what}, not audio"
    if (kind := _sniff(read_at, _AUDIO_MAGIC)) is not None:
        return f"the {kind} file is corrupt or truncated: its header cannot be read"
    head = read_at(0, 512) if read_at else b""
    if head and re.fullmatch(rb"[\t\n\r\x20-\x7e]*", head):
        return "the input is text, not audio"
    return "the input is not audio in a format FFmpeg can read"


def _sniff(read_at: ReadAt | None, table: tuple[tuple[int, bytes, str], ...]) -> str | None:
    head = read_at(0, 16) if read_at else b""
    return next((name for offset, magic, name in table if head[offset:].startswith(magic)), None)


# --- decoding -----------------------------------------------------------------------------------------------


def _frames(container: InputContainer, stream: av.AudioStream, errors: list[FFmpegError]) -> Iterator[av.AudioFrame]:
    """The stream's frames up to the first decoder error, kept in `errors` (a corrupt or cut packet)."""
    try:
        yield from container.decode(stream)
    except FFmpegError as e:
        errors.append(e)


def _decode(
    frames: Iterator[av.AudioFrame],
    sample_rate: int,
    max_duration_s: float | None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """Resample and downmix frames to mono float32 [n]; stops as soon as the audio passes `max_duration_s`.

    Each chunk is copied into one buffer that grows by a quarter as it fills (resized in place: realloc, mremap
    for large ones) and is cut to size at the end. Keeping the chunks instead kept every output frame alive,
    ~1.5 KB of buffer and objects per 20 ms of Opus, then concatenated them: 3.7x the audio's bytes at the peak."""
    limit = math.inf if max_duration_s is None else max_duration_s * sample_rate
    audio = np.empty(sample_rate, dtype=np.float32)  # 1 s to start: a live 20 ms frame comes through here too
    total = 0
    for chunk in _resampled(frames, sample_rate):
        if stop is not None and stop.is_set():
            raise Cancelled("decoding was stopped: its request has ended")
        end = total + chunk.size
        if end > limit:
            raise AudioTooLong(_too_long(max_duration_s))
        if end > audio.size:
            audio.resize(max(end, audio.size * 5 // 4), refcheck=False)  # no view of it exists: chunks are copied
        audio[total:end] = chunk
        total = end
    audio.resize(total, refcheck=False)
    return audio


def _resampled(frames: Iterator[av.AudioFrame], sample_rate: int) -> Iterator[np.ndarray]:
    """Mono float32 chunks [n_i]; a new resampler if the input format changes (PyAV's refuses)."""
    resampler: av.AudioResampler | None = None
    setup: tuple[str, str, int] | None = None
    try:
        for frame in frames:
            if resampler is None or (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
                if frame.sample_rate < MIN_SAMPLE_RATE:  # else "truncated", once the resampler's delay ate it all
                    raise AudioDecodeError(
                        f"the audio's sample rate is {frame.sample_rate} Hz: too low to hold speech "
                        f"(at least {MIN_SAMPLE_RATE} Hz)"
                    )
                if resampler is not None:
                    yield from _mono(resampler.resample(None))  # flush the old one's delay line
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate, options=_SWR_OPTIONS)
                setup = (frame.format.name, frame.layout.name, frame.sample_rate)
            yield from _mono(resampler.resample(frame))
        if resampler is not None:
            yield from _mono(resampler.resample(None))
    except FFmpegError as e:  # e.g. 9+ channels with no layout to downmix by, or a rate of 2**31 Hz
        layout, rate = (setup[1], setup[2]) if setup else ("?", 0)
        raise AudioDecodeError(
            f"FFmpeg cannot convert this audio ({layout}, {rate} Hz) to 16 kHz mono: {e.strerror or e}"
        ) from e


def _as_pcm_range(audio: np.ndarray) -> np.ndarray:
    """Float samples as a 16-bit conversion leaves them (openai-whisper decodes through s16): within [-1, 1],
    NaN as 0. Unbounded float WAV samples would otherwise make the log-mel infinite or NaN, and every
    temperature of the fallback would decode garbage from it."""
    for start in range(0, audio.size, _BLOCK):  # in blocks: nan_to_num's masks would be 1.25x the audio's bytes
        block = audio[start : start + _BLOCK]
        np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(block, -1.0, 1.0, out=block)
    return audio


_BLOCK = 1 << 20  # samples


def _mono(frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
    for frame in frames:
        # Packed flt mono: one plane of [n] floats plus padding. A view, not to_ndarray's vstack copy:
        # 60 s of 44.1 kHz stereo mp3 decodes in 0.19 s instead of 0.26 s.
        yield np.frombuffer(memoryview(frame.planes[0]), dtype=np.float32, count=frame.samples)


def _too_long(max_duration_s: float | None) -> str:
    return f"the audio is longer than the limit of {max_duration_s:g} s"


# --- completeness -------------------------------------------------------------------------------------------


def _check_complete(seconds: float, declared: float | None, errors: list[FFmpegError]) -> None:
    """Refuse audio that stopped short: a decoder error before the declared end, or a cut header."""
    complete = declared is not None and declared - seconds <= _SLACK_S
    if errors and not complete:  # after a complete stream, an error is trailing junk: FFmpeg ignores it too
        if seconds == 0:
            raise AudioDecodeError("the audio cannot be decoded: it is corrupt or in an unsupported codec")
        raise AudioDecodeError(f"the audio is corrupt or truncated: decoding failed after {seconds:.1f} s")
    if declared is not None and seconds < _MIN_FRACTION * declared and declared - seconds > _SLACK_S:
        raise AudioDecodeError(
            f"the audio file is truncated: it holds {seconds:.1f} s of the {declared:.1f} s its header says"
        )
    if seconds == 0:
        raise AudioDecodeError("the audio has no samples (zero length)")


def _declared_seconds(container: InputContainer, stream: av.AudioStream, read_at: ReadAt | None) -> float | None:
    """The length the header promises, only where exact (a frame or sample count, not a bitrate guess)."""
    names = set(container.format.name.split(","))  # e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    if "wav" in names:  # FFmpeg clamps the declared WAV size to the file's, so read the header here
        return _wav_seconds(read_at) if read_at else None
    if "mp3" in names and not (read_at and _mp3_has_frame_count(read_at)):
        return None  # without a Xing/Info/VBRI frame FFmpeg estimates from the bitrate, wrong for VBR
    if names & {"flac", "mp3", "mov"} and stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)  # STREAMINFO samples, Xing frames, MP4 sample table
    audio_only = all(s.type == "audio" for s in container.streams)  # else the Segment may be the video's
    if names & {"matroska", "webm"} and container.duration and audio_only:
        return container.duration / av.time_base
    return None  # Ogg's length comes from its last page, so it cannot betray a cut; raw AAC etc. are guesses


def _wav_seconds(read_at: ReadAt) -> float | None:
    """Seconds the RIFF data chunk declares, for sample formats whose length is exact (PCM, float, G.711):
    size / (channels x bytes a sample x sample rate), as FFmpeg reads them; not the header's byte-rate field,
    which FFmpeg ignores and writers get wrong. None for other codecs, placeholders, RF64 or no chunk."""
    if read_at(0, 4) != b"RIFF" or read_at(8, 4) != b"WAVE":
        return None
    offset, bytes_per_second = 12, 0
    for _ in range(64):  # LIST, bext, JUNK ... chunks may come before data
        header = read_at(offset, 8)
        if len(header) < 8:
            return None
        chunk, size = header[:4], int.from_bytes(header[4:], "little")
        if chunk == b"fmt ":
            bytes_per_second = _wav_frame_bytes_per_second(read_at(offset + 8, min(size, 40)))
        elif chunk == b"data":
            return size / bytes_per_second if 0 < size < _WAV_PLACEHOLDER and bytes_per_second else None
        offset += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None


_WAV_EXACT_FORMATS = {1, 3, 6, 7}  # PCM, IEEE float, A-law, mu-law: a fixed number of bytes per sample frame
_WAV_EXTENSIBLE = 0xFFFE


def _wav_frame_bytes_per_second(fmt: bytes) -> int:
    """The data rate of a WAVEFORMAT(EXTENSIBLE) body in bytes a second, or 0 where it is not fixed."""
    if len(fmt) < 16:
        return 0
    tag = int.from_bytes(fmt[0:2], "little")
    if tag == _WAV_EXTENSIBLE:  # the real format is the first two bytes of the SubFormat GUID
        tag = int.from_bytes(fmt[24:26], "little") if len(fmt) >= 26 else 0
    if tag not in _WAV_EXACT_FORMATS:
        return 0
    channels, rate, bits = (int.from_bytes(fmt[a:b], "little") for a, b in ((2, 4), (4, 8), (14, 16)))
    return channels * ((bits + 7) // 8) * rate  # as FFmpeg's PCM decoders step: whole bytes per sample


def _mp3_has_frame_count(read_at: ReadAt) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info header with a frame count, or a VBRI header."""
    head = read_at(0, 10)
    start = 0
    if head[:3] == b"ID3" and len(head) == 10:  # skip an ID3v2 tag: syncsafe size, optional 10-byte footer
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        start = 10 + size + (10 if head[5] & 0x10 else 0)
    data = read_at(start, 2048)
    sync = re.search(rb"\xff[\xe0-\xff]", data)
    if sync is None:
        return False
    at = sync.start()
    # Header (4 bytes) + side info: 9 (MPEG-2 mono), 17 (MPEG-2 stereo, MPEG-1 mono), 32 (MPEG-1 stereo).
    for tag_at in (at + 13, at + 21, at + 36):
        tag = data[tag_at : tag_at + 8]
        if tag[:4] in (b"Xing", b"Info") and len(tag) == 8 and int.from_bytes(tag[4:], "big") & 1:
            return True
    return data[at + 36 : at + 40] == b"VBRI"
