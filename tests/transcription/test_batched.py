"""Batched (VAD-chunked) long-form mode on real long recordings with tiny.en: as accurate as sequential mode,
timestamps in order and inside the audio, a timed word for every word, callbacks in order, many files at once.

tiny.en, not base, for the 8.6 min file: on 2 CPU cores base takes about twice as long (measured: tiny.en
batched ~35 s, sequential ~55 s; base roughly double), and the comparison is between modes, not models."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import jiwer
import numpy as np
import pytest
from whisper.normalizers import EnglishTextNormalizer

from conftest import DEV_DIR, TEST_DATA
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.request import DecodeRequest, DecodeResult
from halkspeech.transcription.batched import BatchedTranscription
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import Segment, TranscribeOptions, Transcript, Word

LONGFORM = DEV_DIR / "longform"
SHORT = LONGFORM / "ljspeech_LJ001-0001_0008_concat.wav"  # 52 s, reference beside it
LONG = LONGFORM / "librispeech_422-122949_chapter_noref.mp3"  # 8.6 min, no reference
normalise = EnglishTextNormalizer()


@dataclass
class Run:
    transcript: Transcript
    progress: list[tuple[float, float]] = field(default_factory=list)
    emitted: list[Segment] = field(default_factory=list)


def transcribe_modes(model: ModelEngine, audio: np.ndarray, words: bool) -> dict[str, Run]:
    """The same file in both modes at once through one engine (they share its steps)."""
    runs: dict[str, Run] = {}

    async def one(mode: str) -> None:
        seen: list[tuple[float, float]] = []
        emitted: list[Segment] = []
        options = TranscribeOptions(language="en", mode=mode, word_timestamps=words)  # type: ignore[arg-type]
        transcript = await Transcriber(model).transcribe(
            audio, options, progress=lambda d, t: seen.append((d, t)), on_segment=emitted.append
        )
        runs[mode] = Run(transcript, seen, emitted)

    async def both() -> None:
        await asyncio.gather(one("batched"), one("sequential"))

    asyncio.run(both())
    return runs


@pytest.fixture(scope="module")
def short_audio() -> np.ndarray:
    if not SHORT.exists():
        pytest.skip("dev set absent")
    return decode_audio(SHORT)


@pytest.fixture(scope="module")
def short_runs(tiny_en_engine: ModelEngine, short_audio: np.ndarray) -> dict[str, Run]:
    return transcribe_modes(tiny_en_engine, short_audio, words=False)


@pytest.fixture(scope="module")
def long_runs(tiny_en_engine: ModelEngine) -> dict[str, Run]:
    if not LONG.exists():
        pytest.skip("dev set absent")
    return transcribe_modes(tiny_en_engine, decode_audio(LONG), words=True)


def assert_ordered_inside(transcript: Transcript) -> None:
    segments = transcript.segments
    assert segments
    assert all(0 <= s.start <= s.end <= transcript.duration for s in segments)
    assert all(a.end <= b.start for a, b in pairwise(segments))
    assert [s.id for s in segments] == list(range(len(segments)))
    words = transcript.words
    assert all(0 <= w.start <= w.end <= transcript.duration for w in words)
    assert all(a.end <= b.start for a, b in pairwise(words))


def test_batched_is_as_accurate_as_sequential_on_52s(short_runs: dict[str, Run]) -> None:
    reference = normalise(SHORT.with_suffix(".txt").read_text())
    batched = jiwer.wer(reference, normalise(short_runs["batched"].transcript.text))
    sequential = jiwer.wer(reference, normalise(short_runs["sequential"].transcript.text))
    assert batched <= sequential + 1 / len(reference.split())  # no worse, within one word
    assert batched < 0.05
    assert len(short_runs["batched"].transcript.segments) >= 5
    assert_ordered_inside(short_runs["batched"].transcript)


def test_batched_matches_sequential_on_the_long_file(long_runs: dict[str, Run]) -> None:
    batched, sequential = long_runs["batched"].transcript, long_runs["sequential"].transcript
    assert batched.duration == pytest.approx(sequential.duration, abs=0.05)
    assert batched.duration > 500
    assert jiwer.wer(normalise(sequential.text), normalise(batched.text)) <= 0.03
    assert batched.segments[-1].end > batched.duration - 30  # nothing lost at the end


def test_long_file_timestamps_are_monotonic_and_inside(long_runs: dict[str, Run]) -> None:
    assert_ordered_inside(long_runs["batched"].transcript)


def test_every_word_has_a_timing(long_runs: dict[str, Run]) -> None:
    for segment in long_runs["batched"].transcript.segments:
        assert segment.words, segment
        assert "".join(w.word for w in segment.words).strip() == segment.text.strip()
        assert all(0 <= w.probability <= 1 for w in segment.words)


def test_batched_word_times_agree_with_sequential(long_runs: dict[str, Run]) -> None:
    # batched mode's words are timed from the cost matrix the engine makes on the device; sequential mode's
    # from the scores, on the host, as the reference: same words, same times, apart from where the two
    # modes cut the audio differently
    batched, sequential = long_runs["batched"].transcript.words, long_runs["sequential"].transcript.words
    theirs, ours = [w.word.strip().lower() for w in sequential], [w.word.strip().lower() for w in batched]
    pairs = [
        (sequential[block.a + k], batched[block.b + k])
        for block in difflib.SequenceMatcher(a=theirs, b=ours, autojunk=False).get_matching_blocks()
        for k in range(block.size)
    ]
    assert len(pairs) >= 0.95 * len(sequential)
    close = sum(abs(s.start - b.start) <= 0.2 and abs(s.end - b.end) <= 0.2 for s, b in pairs)
    assert close >= 0.9 * len(pairs), f"{close}/{len(pairs)} words within 0.2 s"


def test_callbacks_report_progress_and_segments_in_order(long_runs: dict[str, Run]) -> None:
    for run in long_runs.values():
        duration = run.transcript.duration
        assert run.emitted == list(run.transcript.segments)  # each once, in order, final (ids and times)
        done = [d for d, _ in run.progress]
        assert len(done) > 5 and done == sorted(done)
        assert all(t == pytest.approx(duration) for _, t in run.progress)
        assert done[-1] == pytest.approx(duration)


def test_many_files_at_once_all_get_words(tiny_en_engine: ModelEngine, dev_clips: list[dict[str, Any]]) -> None:
    paths = [c["path"] for c in dev_clips if c["language"] == "en" and c["duration"] < 12][:6]
    audios = [decode_audio(p) for p in paths]
    options = TranscribeOptions(language="en", mode="batched", word_timestamps=True)

    async def all_files() -> list[Transcript]:
        transcriber = Transcriber(tiny_en_engine)
        return list(await asyncio.gather(*(transcriber.transcribe(a, options) for a in audios)))

    before = tiny_en_engine.engine.stats.decode_batches.copy()
    transcripts = asyncio.run(all_files())
    batches = tiny_en_engine.engine.stats.decode_batches - before
    assert max(batches) > 4  # windows of several files shared decode steps
    for transcript in transcripts:
        assert transcript.segments
        assert_ordered_inside(transcript)
        for segment in transcript.segments:
            assert segment.words
            assert "".join(w.word for w in segment.words).strip() == segment.text.strip()


def test_word_timing_in_worker_processes_equals_the_thread(
    tiny_en_engine: ModelEngine, dev_clips: list[dict[str, Any]]
) -> None:
    """What a GPU server does by default (word_workers.py): the host half of word timing in spawned worker
    processes. The words must be exactly those of the in-process thread."""
    paths = [c["path"] for c in dev_clips if c["language"] == "en" and c["duration"] < 12][:2]
    audios = [decode_audio(p) for p in paths]
    options = TranscribeOptions(language="en", mode="batched", word_timestamps=True)

    def words(processes: int) -> list[tuple[Word, ...]]:
        model = dataclasses.replace(tiny_en_engine, word_processes=processes)

        async def all_files() -> list[Transcript]:
            return list(await asyncio.gather(*(Transcriber(model).transcribe(a, options) for a in audios)))

        return [s.words for t in asyncio.run(all_files()) for s in t.segments]

    in_thread, in_processes = words(0), words(2)
    assert sum(len(w) for w in in_thread) > 20
    assert in_processes == in_thread


def test_forced_tokens_per_second_decodes_exact_lengths(
    tiny_en_engine: ModelEngine, short_audio: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[DecodeRequest, DecodeResult]] = []
    decode = tiny_en_engine.engine.decode

    async def spy(request: DecodeRequest, on_tokens: Any = None) -> DecodeResult:
        result = await decode(request, on_tokens)
        seen.append((request, result))
        return result

    monkeypatch.setattr(tiny_en_engine.engine, "decode", spy)
    audio = short_audio
    options = TranscribeOptions(language="en", mode="batched", force_tokens_per_second=3.0)
    job = BatchedTranscription(tiny_en_engine, audio, options)
    asyncio.run(job.run())
    chunks = job.chunks
    assert len(seen) == len(chunks) >= 2  # one pass per chunk: no fallback, no resumed windows
    expected = sorted(min(224, math.ceil(c.speech * 3.0)) for c in chunks)
    assert sorted(r.options.max_new_tokens for r, _ in seen) == expected
    assert all(r.options.force_length and len(res.tokens) == r.options.max_new_tokens for r, res in seen)


def test_sequential_mode_reports_progress_too(tiny_en_engine: ModelEngine) -> None:
    seen: list[tuple[float, float]] = []
    emitted: list[Segment] = []
    audio = decode_audio(TEST_DATA / "jfk.flac")
    options = TranscribeOptions(language="en", word_timestamps=True)
    transcript = asyncio.run(
        Transcriber(tiny_en_engine).transcribe(
            audio, options, progress=lambda *p: seen.append(p), on_segment=emitted.append
        )
    )
    assert emitted == list(transcript.segments)
    assert seen[-1] == (pytest.approx(transcript.duration), pytest.approx(transcript.duration))
    assert all(s.words for s in transcript.segments)


def test_cancelling_stops_every_chunk(tiny_en_engine: ModelEngine, short_audio: np.ndarray) -> None:
    audio = short_audio
    engine = tiny_en_engine.engine
    cancelled_before = engine.stats.cancelled

    async def start_then_cancel() -> None:
        options = TranscribeOptions(language="en", mode="batched", word_timestamps=True)
        task = asyncio.create_task(Transcriber(tiny_en_engine).transcribe(audio, options))
        while engine.running == 0:  # until its chunks are decoding
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The engine frees the slots at its next step boundary, and counts a moment later (same thread).
        for _ in range(500):
            if engine.stats.cancelled >= cancelled_before + 2 and engine.running == 0 and engine.queue_depth == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(start_then_cancel())
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.stats.cancelled >= cancelled_before + 2  # both chunks were stopped, not finished


def test_speech_after_a_window_the_model_closed_early_is_decoded(tiny_en_engine: ModelEngine) -> None:
    """A sentence, 3 s of silence, then jfk.flac, in one VAD chunk: tiny.en writes the first sentence and
    closes the window with a timestamp; the 11 s the VAD heard after it are decoded again from where they
    begin (they were lost, while sequential mode had them), with their own times."""
    first = decode_audio(TEST_DATA / "1089-134691-0000.flac")  # HE COULD WAIT NO LONGER (2.4 s)
    audio = np.concatenate([first, np.zeros(48_000, np.float32), decode_audio(TEST_DATA / "jfk.flac")])
    transcript = asyncio.run(Transcriber(tiny_en_engine).transcribe(audio, TranscribeOptions(mode="batched")))
    text = normalise(transcript.text)
    assert text.startswith("he could wait no longer") and text.endswith("what you can do for your country")
    later = [s for s in transcript.segments if "americans" in s.text.lower()]
    assert later and later[0].start > len(first) / 16_000 + 2.0  # not at the end of the first sentence
    assert_ordered_inside(transcript)


def test_speech_a_segment_swallowed_after_a_pause_is_decoded(tiny_en_engine: ModelEngine) -> None:
    """LJ001-0002, 5 s of silence, then jfk.flac, in one VAD chunk: tiny.en wrote one segment,
    `<|0.00|> in being comparatively modern.<|17.52|>`, whose end covers the pause and all of jfk, and the
    11 s were lost (`_unheard` looks only past the last segment's end). The probe from where jfk begins hears
    new words, so the segment ends at the pause and jfk is decoded with its own times (swallowed.py)."""
    first = decode_audio(TEST_DATA / "LJ001-0002.wav")  # in being comparatively modern. (1.9 s)
    audio = np.concatenate([first, np.zeros(80_000, np.float32), decode_audio(TEST_DATA / "jfk.flac")])
    transcript = asyncio.run(Transcriber(tiny_en_engine).transcribe(audio, TranscribeOptions(mode="batched")))
    text = normalise(transcript.text)
    assert text.startswith("in being comparatively modern")
    assert text.endswith("ask not what your country can do for you ask what you can do for your country")
    later = [s for s in transcript.segments if "americans" in s.text.lower()]
    assert later and later[0].start > len(first) / 16_000 + 4.0  # at jfk, not at the first sentence's end
    assert transcript.segments[0].end < len(first) / 16_000 + 1.0  # the first no longer spans the pause
    assert_ordered_inside(transcript)
