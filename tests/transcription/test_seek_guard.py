"""The sequential seek guard's decision, without a model: where the seek goes when the reference's rule would
skip speech the VAD heard, that the VAD runs only where the rule could skip that much, and when it is off."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from halkspeech.audio.vad import FRAME_S, SpeechDetector
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.seek_guard import SeekGuard, guarded, text_before
from halkspeech.transcription.segments import RawSegment
from halkspeech.transcription.swallowed import Heard, Suspect, unheard
from halkspeech.transcription.types import TranscribeOptions

TOKENIZER = Tokenizer(multilingual=False, num_languages=99)


class FakeDetector(SpeechDetector):
    """Speech probability 0.9 inside the given spans (seconds), 0.05 elsewhere; counts its calls."""

    def __init__(self, speech: list[tuple[float, float]]) -> None:
        super().__init__()
        self.speech, self.calls = speech, 0

    def probabilities(self, audio: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
        self.calls += 1
        times = np.arange(int(np.ceil(len(audio) / 512))) * FRAME_S
        probs = np.full(len(times), 0.05, np.float32)
        for a, b in self.speech:
            probs[(times >= a) & (times < b)] = 0.9
        return probs


def guard(seconds: float, speech: list[tuple[float, float]]) -> tuple[SeekGuard, FakeDetector]:
    detector = FakeDetector(speech)
    return SeekGuard(np.zeros(int(seconds * 16_000), np.float32), torch.device("cpu"), detector=detector), detector


def segment(start: float, end: float) -> RawSegment:
    return RawSegment(start, end, (1, 2, 3))


def test_speech_after_the_last_segment_stops_the_seek_where_it_begins() -> None:
    # the failing example: `<|0.00|> He could wait no longer.<|2.00|>`, the rule moves to 14.08 s; jfk at 3.4 s
    g, detector = guard(14.1, [(0.1, 2.0), (3.4, 13.9)])
    resume = asyncio.run(g.after_end([segment(0.0, 2.0)], 14.08))
    assert resume == pytest.approx(3.4 - 0.2, abs=FRAME_S)  # where the speech begins, less the VAD's padding
    assert detector.calls == 1


@pytest.mark.parametrize(
    ("speech", "last_end", "target"),
    [
        ([(0.1, 2.0), (3.4, 4.2)], 2.0, 14.08),  # under a second of speech after the segment
        ([(0.1, 2.0), (13.5, 14.1)], 2.0, 13.6),  # the speech lies past where the rule moves
        ([(0.1, 2.3)], 2.0, 14.08),  # only the end of the segment's own speech, inside the margin
    ],
)
def test_no_speech_skipped_keeps_the_rule(speech: list[tuple[float, float]], last_end: float, target: float) -> None:
    g, _ = guard(14.1, speech)
    assert asyncio.run(g.after_end([segment(0.0, last_end)], target)) is None


def test_the_vad_runs_only_where_the_rule_could_skip_a_second_of_speech() -> None:
    g, detector = guard(30.0, [(0.0, 30.0)])
    assert not SeekGuard.skips([segment(0.0, 5.0)], 6.49) and SeekGuard.skips([segment(0.0, 5.0)], 6.5)
    # the rule moves to the last segment's end (an unfinished segment follows) or 1.4 s past it: no VAD
    assert asyncio.run(g.after_end([segment(0.0, 5.0)], 5.0)) is None
    assert asyncio.run(g.after_end([segment(0.0, 5.0)], 6.4)) is None
    # segments too short to hold a 1 s pause and a second of speech: no VAD
    assert asyncio.run(g.suspect([segment(0.0, 1.9), segment(1.9, 3.8)])) is None
    assert detector.calls == 0 and g.vad_ms == 0.0
    # the first window that needs it runs the VAD over the file, once
    asyncio.run(g.after_end([segment(0.0, 5.0)], 30.0))
    asyncio.run(g.suspect([segment(0.0, 10.0)]))
    assert detector.calls == 1 and g.vad_ms > 0.0


def test_a_segment_over_a_pause_and_later_speech_is_a_suspect() -> None:
    # `<|0.00|> in being comparatively modern.<|17.52|>` over LJ001-0002 (1.9 s), 5 s of silence and jfk
    g, _ = guard(18.0, [(0.1, 1.9), (7.2, 17.6)])
    suspect = asyncio.run(g.suspect([segment(0.0, 17.52)]))
    assert suspect == Suspect(0, pytest.approx(1.9 + 0.2, abs=FRAME_S), pytest.approx(7.2 - 0.2, abs=FRAME_S))


def test_unheard_is_batched_modes_rule() -> None:
    probs = np.where((np.arange(400) * FRAME_S >= 5.0) & (np.arange(400) * FRAME_S < 9.0), 0.9, 0.1)
    heard = Heard(probs.astype(np.float32), [(4.8, 9.2)], threshold=0.5, pad_s=0.2)
    assert unheard(heard, 2.0, 12.0) == pytest.approx(4.8, abs=FRAME_S)
    assert unheard(heard, 2.0, 5.5) is None  # under a second of it before `end`
    assert unheard(heard, 8.5, 12.0) is None  # past the margin, 0.5 s of speech is left
    assert heard.regions_in(0.0, 4.0) == [] and heard.regions_in(4.0, 5.0) == [(4.8, 9.2)]


def test_off_under_forced_decoding_and_without_timestamps() -> None:
    assert guarded(TranscribeOptions())
    assert guarded(TranscribeOptions(word_timestamps=True))
    assert not guarded(TranscribeOptions(force_decode_tokens=20))
    assert not guarded(TranscribeOptions(without_timestamps=True))


def test_text_before_stops_at_the_first_timestamp_past_the_time() -> None:
    tb = TOKENIZER.timestamp_begin
    hello, world = TOKENIZER.encode(" hello"), TOKENIZER.encode(" world")
    tokens = (tb, *hello, tb + 50, tb + 50, *world, tb + 100, TOKENIZER.eot)  # 0.0 hello 1.0 | 1.0 world 2.0
    # the segments that start before the time, whole (as batched mode compares a probe's)
    assert text_before(TOKENIZER, tokens, 10.0, 11.5) == " hello world"
    assert text_before(TOKENIZER, tokens, 10.0, 10.9) == " hello"  # the first ends at 11.0, past it: the end
    assert text_before(TOKENIZER, tokens, 10.0, 10.0) == ""


def test_a_segment_that_starts_in_the_padding_before_a_pause_is_no_suspect() -> None:
    # tiny.en: `<|10.20|> He could wait no longer.<|13.20|>`, the speech before the pause ending at 10.21 s: the
    # segment's start came early and it says the sentence after the pause; probing it found nothing, 34 times
    g, _ = guard(27.0, [(0.6, 10.21), (12.0, 13.2), (15.6, 26.1)])
    assert asyncio.run(g.suspect([segment(7.56, 10.2), segment(10.2, 13.2)])) is None
    # with half a second of the segment's own speech before the pause it is one
    suspect = asyncio.run(g.suspect([segment(7.56, 9.0), segment(9.0, 13.2)]))
    assert suspect is not None and suspect.index == 1
