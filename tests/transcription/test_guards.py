"""The per-segment repetition (hallucination) guard: it flags loops, spares normal speech, and batched mode
drops a looping segment that survives every temperature. Either mode drops text written over the padding
after the audio."""

from __future__ import annotations

import numpy as np
import pytest

from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.request import DecodeResult
from halkspeech.transcription.batched import BatchedTranscription
from halkspeech.transcription.chunking import Chunk
from halkspeech.transcription.guards import is_repetitive, longest_repeat
from halkspeech.transcription.segments import RawSegment
from halkspeech.transcription.sequential import SequentialTranscription
from halkspeech.transcription.types import TranscribeOptions
from halkspeech.transcription.window import WindowResult

LOOP = "Thank you for watching. Thank you for watching. Thank you for watching. Thank you for watching."


def test_longest_repeat_finds_the_loop() -> None:
    assert longest_repeat(["a", "b", "a", "b", "a", "b", "c"]) == (2, 3)
    assert longest_repeat(["one", "two", "three"]) == (1, 1)
    assert longest_repeat([]) == (1, 0)


@pytest.mark.parametrize(
    "text",
    [
        LOOP,
        "the the the the the the the the the",
        "I'm going to go. " * 5,
        "la " * 60,  # caught by the compression ratio too
        "İYİ İYİ İYİ İYİ iyi iyi iyi iyi",  # Turkish capitals fold as English ones do ("İ".lower() is "i̇")
        "IŞIK IŞIK IŞIK IŞIK ışık ışık ışık ışık",
    ],
)
def test_loops_are_flagged(text: str) -> None:
    assert is_repetitive(text)


@pytest.mark.parametrize(
    "text",
    [
        "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.",
        "No, no, no, no.",  # short emphatic repeats are speech
        "Printing, in the only sense with which we are at present concerned, differs from most if not from all "
        "the arts and crafts represented in the Exhibition in being comparatively modern.",
        "",
    ],
)
def test_speech_is_not_flagged(text: str) -> None:
    assert not is_repetitive(text)


def test_batched_mode_drops_a_looping_segment(tiny_en_engine: ModelEngine) -> None:
    tok, ts = tiny_en_engine.tokenizer, tiny_en_engine.tokenizer.timestamp_begin
    audio = np.zeros(16000 * 10, dtype=np.float32)
    job = BatchedTranscription(tiny_en_engine, audio, TranscribeOptions(language="en"))
    raw = [
        RawSegment(0.0, 2.0, (ts, *tok.encode(" Hello there."), ts + 100)),
        RawSegment(2.0, 9.0, (ts + 100, *tok.encode(" " + LOOP), ts + 450)),
        RawSegment(9.0, 10.0, (ts + 450, *tok.encode(" Bye."), ts + 500)),
    ]
    assert job._looping(raw) == {1}
    tokens = tuple(t for r in raw for t in r.tokens)
    result = DecodeResult(tokens, -5.0, -0.1, 0.01, 1.0, "eot")  # the last temperature: the loop stayed
    window = WindowResult(result, tok.decode(list(tokens)), 1.5)
    segments = job._segments(Chunk(0, 0.0, 10.0, 10.0), raw, window, None)
    assert [s.text for s in segments] == [" Hello there.", " Bye."]
    # benchmarks force lengths on random weights: nothing is judged there
    forced = BatchedTranscription(tiny_en_engine, audio, TranscribeOptions(force_tokens_per_second=4.0))
    assert forced._looping(raw) == set()


def test_text_that_starts_after_the_audio_is_dropped(tiny_en_engine: ModelEngine) -> None:
    """3 minutes of tones ended in " 1.5%" twice at 180.0-180.0 s (timestamps in the padding after the audio,
    clamped to its end) and became four stacked 1 ms subtitles. Text starting at or after the audio's end (in
    batched mode, its chunk's end) is dropped; a segment that only ends past it is kept, ending at the end."""
    tok, ts = tiny_en_engine.tokenizer, tiny_en_engine.tokenizer.timestamp_begin
    audio = np.zeros(16000 * 10, dtype=np.float32)
    raw = [
        RawSegment(8.0, 10.5, (ts + 400, *tok.encode(" Said."), ts + 525)),
        RawSegment(10.5, 11.0, (ts + 525, *tok.encode(" 1.5%"), ts + 550)),
    ]
    tokens = tuple(t for r in raw for t in r.tokens)
    window = WindowResult(DecodeResult(tokens, -5.0, -0.1, 0.01, 0.0, "eot"), tok.decode(list(tokens)), 1.5)
    job = SequentialTranscription(tiny_en_engine, audio, TranscribeOptions(language="en"))
    kept = [job._segment(i, 0, r, window) for i, r in enumerate(raw)]
    assert [(s.text, s.start, s.end) for s in kept] == [(" Said.", 8.0, 10.0), ("", 10.0, 10.0)]
    batched = BatchedTranscription(tiny_en_engine, audio, TranscribeOptions(language="en"))
    segments = batched._segments(Chunk(0, 0.0, 10.0, 10.0), raw, window, None)
    assert [(s.text, s.start, s.end) for s in segments] == [(" Said.", 8.0, 10.0)]
