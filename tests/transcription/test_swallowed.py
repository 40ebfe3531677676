"""Suspect segments (a pause and later speech inside their span) and the probe's verdict, without a model."""

from __future__ import annotations

import pytest

from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.segments import RawSegment
from halkspeech.transcription.swallowed import Suspect, cut_at_pause, find_suspect, heard_anew

TOKENIZER = Tokenizer(multilingual=True, num_languages=99)


def heard_everywhere(start: float, end: float, at_least: float) -> bool:
    return end - start >= at_least


def segment(start: float, end: float) -> RawSegment:
    return RawSegment(start, end, (1, 2, 3))


def test_a_segment_over_a_pause_and_later_speech_is_a_suspect() -> None:
    # the case bench/lost_speech.py found: `<|0.00|> has never been surpassed.<|14.40|>` over two regions
    regions = [(0.0, 1.96), (10.04, 14.6)]
    assert find_suspect([segment(0.0, 14.4)], regions, heard_everywhere, 1.0) == Suspect(0, 1.96, 10.04)
    # a later segment is found too, after a clean one
    raw = [segment(0.0, 1.9), segment(10.0, 24.0)]
    regions = [(0.0, 1.96), (10.04, 14.6), (17.0, 23.0)]
    assert find_suspect(raw, regions, heard_everywhere, 1.0) == Suspect(1, 14.6, 17.0)


@pytest.mark.parametrize(
    ("raw", "regions"),
    [
        ([segment(0.0, 1.9), segment(10.0, 14.4)], [(0.0, 1.96), (10.04, 14.6)]),  # segments end at the pause
        ([segment(0.0, 14.4)], [(0.0, 1.96), (2.8, 14.6)]),  # a pause under SWALLOW_GAP_S
        ([segment(0.0, 10.8)], [(0.0, 1.96), (10.04, 14.6)]),  # under 1 s of speech left inside the span
        ([segment(3.0, 14.4)], [(0.0, 1.96), (10.04, 14.6)]),  # starts in the pause: nothing before it
    ],
)
def test_no_suspect(raw: list[RawSegment], regions: list[tuple[float, float]]) -> None:
    assert find_suspect(raw, regions, heard_everywhere, 1.0) is None


def test_the_vad_must_hear_the_later_speech() -> None:
    assert find_suspect([segment(0.0, 14.4)], [(0.0, 1.96), (10.04, 14.6)], lambda *_: False, 1.0) is None


def test_the_probe_hears_new_words_only_when_most_are_not_said() -> None:
    said = " has never been surpassed."
    assert heard_anew(TOKENIZER, said, " Yet these thoughts affected Hester Prynne less with hope than apprehension.")
    # the segment said it already (its end timestamp was right, or its start came early): keep it
    both = " has never been surpassed. Yet these thoughts affected Hester less with hope."
    assert not heard_anew(TOKENIZER, both, " yet these thoughts affected Hester Prynne, less with hope")
    # base's segment began early, at the end of one sentence, and said the next one's first words: kept
    said_later = " stuffed it into you. His belly counseled him."
    assert not heard_anew(TOKENIZER, said_later, " Stuff it into you, his belly counseled him.")
    assert not heard_anew(TOKENIZER, said, " ...")  # nothing heard
    assert heard_anew(TOKENIZER, "客観的実在の判断", " 그는 이리저리 피하면서")
    assert not heard_anew(TOKENIZER, "客観的実在の判断的知識が成立する", " 判断的知識が成立する")


def test_the_cut_ends_the_suspect_at_the_pause_and_drops_what_followed() -> None:
    raw = [segment(0.0, 1.0), RawSegment(1.2, 14.4, (7, 8)), segment(14.4, 20.0)]
    assert cut_at_pause(raw, Suspect(1, 3.0, 10.0)) == [raw[0], RawSegment(1.2, 3.0, (7, 8))]


def test_speech_before_the_pause_can_be_required() -> None:
    # batched mode asks for none (0); sequential mode's seek guard for SPOKEN_BEFORE_S of it
    regions = [(0.0, 10.41), (11.8, 13.42)]
    heard = [(0.2, 10.21), (12.0, 13.22)]  # the VAD's frames at or above its threshold

    def has_speech(start: float, end: float, at_least: float) -> bool:
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in heard) >= at_least

    raw = [segment(10.2, 13.2)]
    assert find_suspect(raw, regions, has_speech, 1.0) == Suspect(0, 10.41, 11.8)
    assert find_suspect(raw, regions, has_speech, 1.0, spoken_s=0.5) is None
    assert find_suspect([segment(9.0, 13.2)], regions, has_speech, 1.0, spoken_s=0.5) == Suspect(0, 10.41, 11.8)
