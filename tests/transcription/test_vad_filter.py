"""vad_filter in sequential mode: the time map between the joined speech and the file (pure), then the real
tiny.en on jfk.flac cut in two with silence before and between the halves, silence and noise alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from conftest import JFK_CUT_S, JFK_TEXT, TEST_DATA, jfk_with_pauses
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import Segment, TranscribeOptions, Transcript, Word
from halkspeech.transcription.vad_filter import FILTER_VAD, SpeechMap

SR = 16_000


def segment(start: float, end: float, words: tuple[Word, ...] | None = None, seek: int = 0) -> Segment:
    return Segment(0, seek, start, end, " x", (1,), 0.0, -0.1, 1.0, 0.01, words)


# Two chunks: the file's 10-13 s and 21-29 s; joined, 0-3 s and 3-11 s.
MAP = SpeechMap.from_regions([(10.0, 13.0), (21.0, 29.0)], 29 * SR)


# --- the time map (no model) ---------------------------------------------------------------------------------


def test_regions_become_sample_spans_inside_the_file() -> None:
    assert MAP.spans == ((160_000, 208_000), (336_000, 464_000)) and MAP.kept_s == 11.0
    # clipped to the file; empty spans dropped; nothing heard: nothing kept
    assert SpeechMap.from_regions([(-1.0, 0.5), (2.0, 2.0), (3.0, 9.0)], 4 * SR).spans == ((0, 8000), (48_000, 64_000))
    assert SpeechMap.from_regions([], SR).spans == () and SpeechMap(()).kept_s == 0.0


def test_join_is_the_chunks_end_to_end() -> None:
    audio = np.arange(29 * SR, dtype=np.float32)
    joined = MAP.join(audio)
    assert joined.dtype == np.float32 and len(joined) == 11 * SR
    assert joined[0] == 160_000 and joined[3 * SR - 1] == 208_000 - 1 and joined[3 * SR] == 336_000
    assert len(SpeechMap(()).join(audio)) == 0


def test_times_move_by_the_silence_removed_before_their_chunk() -> None:
    assert MAP.time(0.0) == 10.0 and MAP.time(2.5) == 12.5
    assert MAP.time(4.0) == 22.0 and MAP.time(11.0, end=True) == 29.0
    # at the cut (joined 3 s) a start is the second chunk's start, an end the first chunk's end
    assert MAP.time(3.0) == 21.0 and MAP.time(3.0, end=True) == 13.0
    assert MAP.time(12.0) == 29.0  # past the joined audio (a window's padding): the last chunk's end


def test_a_word_maps_whole_through_its_midpoint_and_stays_in_its_chunk() -> None:
    assert MAP.word(Word("a", 1.0, 2.0, 0.9)) == Word("a", 11.0, 12.0, 0.9)
    # 2.8-3.4 s straddles the cut; its middle (3.1) is in the second chunk: it starts where that chunk does
    assert MAP.word(Word("b", 2.8, 3.4, 0.9)) == Word("b", 21.0, 21.4, 0.9)
    assert MAP.word(Word("c", 2.6, 3.2, 0.9)) == Word("c", 12.6, 13.0, 0.9)  # middle 2.9: the first chunk


def test_segments_follow_their_words_else_their_own_times() -> None:
    words = (Word(" And", 0.5, 1.0, 0.9), Word(" so", 3.5, 4.0, 0.8))
    mapped = MAP.segment(segment(0.4, 4.2, words, seek=0))
    assert (mapped.start, mapped.end, mapped.seek) == (10.5, 22.0, 1000)
    assert [(w.start, w.end) for w in mapped.words or ()] == [(10.5, 11.0), (21.5, 22.0)]
    # no words: start and end on their own; one spanning the cut spans the silence removed there
    plain = MAP.segment(segment(2.0, 3.0, seek=300))
    assert (plain.start, plain.end, plain.seek) == (12.0, 13.0, 2100)
    assert (MAP.segment(segment(1.0, 5.0)).start, MAP.segment(segment(1.0, 5.0)).end) == (11.0, 23.0)
    assert MAP.segment(segment(3.0, 3.0)).end >= MAP.segment(segment(3.0, 3.0)).start


def test_filter_options_are_faster_whispers_defaults() -> None:
    # faster_whisper/vad.py VadOptions: threshold 0.5, min_speech_duration_ms 0, min_silence_duration_ms 2000,
    # speech_pad_ms 400 (max_speech_duration_s inf: speech_regions has no maximum)
    fw = pytest.importorskip("faster_whisper.vad").VadOptions()
    assert FILTER_VAD.threshold == fw.threshold and FILTER_VAD.neg_threshold == fw.neg_threshold
    assert FILTER_VAD.min_speech_s * 1000 == fw.min_speech_duration_ms
    assert FILTER_VAD.min_silence_s * 1000 == fw.min_silence_duration_ms
    assert FILTER_VAD.pad_s * 1000 == fw.speech_pad_ms


# --- the real model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spaced() -> np.ndarray:
    return jfk_with_pauses()  # speech at 10-12.77 s and 20.77-29 s


def run(
    model: ModelEngine, audio: np.ndarray, options: TranscribeOptions
) -> tuple[Transcript, list[Segment], list[tuple[float, float]]]:
    """The transcript, the segments `on_segment` saw, and the progress reports."""
    seen: list[Segment] = []
    reports: list[tuple[float, float]] = []
    transcript = asyncio.run(
        Transcriber(model).transcribe(
            audio, options, on_segment=seen.append, progress=lambda done, total: reports.append((done, total))
        )
    )
    return transcript, seen, reports


def words_of(text: str) -> list[str]:
    return [w.strip(",.").lower() for w in text.split()]


@pytest.mark.parametrize("word_timestamps", [False, True])
def test_times_are_the_files_and_fall_in_its_speech(
    tiny_en_engine: ModelEngine, spaced: np.ndarray, word_timestamps: bool
) -> None:
    options = TranscribeOptions(vad_filter=True, word_timestamps=word_timestamps)
    result, seen, reports = run(tiny_en_engine, spaced, options)
    assert words_of(result.text) == words_of(JFK_TEXT)  # without the filter tiny.en writes "And so am I fellow"
    assert result.duration == 29.0 and result.language == "en"
    pad = FILTER_VAD.pad_s  # the VAD's regions reach this far into the silence beside the speech
    speech = [(10 - pad, 10 + JFK_CUT_S + pad), (18 + JFK_CUT_S - pad, 29.0)]
    spans = [(s.start, s.end) for s in result.segments] + [(w.start, w.end) for w in result.words]
    assert result.segments[0].start >= 9.5
    assert all(a <= b for a, b in spans)
    assert all(any(lo <= a <= hi for lo, hi in speech) for a, _ in spans), spans
    assert all(any(lo <= b <= hi for lo, hi in speech) for _, b in spans), spans
    assert result.segments[0].seek >= 950  # the window's start, in the file's 10 ms frames
    if word_timestamps:
        ask = next(w for w in result.words if w.word.strip().lower() == "ask")
        assert ask.start >= 18 + JFK_CUT_S - pad  # the second half's first word, after the 8 s pause
        assert [w.start for w in result.words] == sorted(w.start for w in result.words)
    assert seen == list(result.segments)  # streaming listeners see the mapped segments
    assert reports and reports[-1] == (29.0, 29.0)
    assert result.timings.vad > 0


def test_silence_and_noise_alone_give_an_empty_transcript(tiny_en_engine: ModelEngine) -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(20 * SR) * 3e-3).astype(np.float32)  # -50 dBFS of hiss (raised for the VAD)
    for audio in (np.zeros(20 * SR, np.float32), noise, np.zeros(100, np.float32), noise[:300]):
        result, seen, reports = run(tiny_en_engine, audio, TranscribeOptions(vad_filter=True))
        assert (result.text, result.segments, seen) == ("", (), [])
        assert result.language == "en" and result.duration == len(audio) / SR
        assert reports == [(result.duration, result.duration)]


def test_no_speech_keeps_the_language_asked_for(base_engine: ModelEngine) -> None:
    silence = np.zeros(5 * SR, np.float32)
    asked = run(base_engine, silence, TranscribeOptions(vad_filter=True, language="de"))[0]
    assert (asked.language, asked.text) == ("de", "")
    assert run(base_engine, silence, TranscribeOptions(vad_filter=True))[0].language == "en"  # nothing to detect


def test_language_is_detected_from_the_speech(base_engine: ModelEngine) -> None:
    german = decode_audio(TEST_DATA / "test_de.wav")
    audio = np.concatenate([np.zeros(40 * SR, np.float32), german])  # the first 30 s are silence
    result = run(base_engine, audio, TranscribeOptions(vad_filter=True))[0]
    assert result.language == "de" and "Portal" in result.text, result.text
    assert result.segments[0].start >= 39.5 and result.duration == len(audio) / SR


def test_batched_mode_is_unchanged(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    audio = decode_audio(jfk_path)
    plain = run(tiny_en_engine, audio, TranscribeOptions(mode="batched"))[0]
    filtered = run(tiny_en_engine, audio, TranscribeOptions(mode="batched", vad_filter=True))[0]
    assert (filtered.text, filtered.segments) == (plain.text, plain.segments)


def test_off_by_default() -> None:
    assert TranscribeOptions().vad_filter is False  # tests/test_parity.py: sequential output as the reference's
