"""SRT and VTT: limits on line width, lines per cue and cue duration hold; highlighting gives one cue per word;
both formats parse back into what was laid out."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.formats import as_srt, as_vtt
from halkspeech.transcription.subtitles import READABLE, SubtitleOptions, subtitle_cues
from halkspeech.transcription.types import Segment, Transcript, Word

TEXTS = [
    " And so my fellow Americans, ask not what your country can do for you,",
    " ask what you can do for your country.",
    " Printing, in the only sense with which we are at present concerned, differs from most if not from all"
    " the arts and crafts represented in the Exhibition in being comparatively modern.",
]
SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def make_transcript(*, words: bool) -> Transcript:
    """Three segments, 0.35 s per word, a 4 s pause before the third."""
    segments, at = [], 0.0
    for i, text in enumerate(TEXTS):
        at += 4.0 if i == 2 else 0.0
        timed = [Word(" " + w, at + k * 0.35, at + k * 0.35 + 0.3, 0.9) for k, w in enumerate(text.split())]
        end = timed[-1].end
        segments.append(Segment(i, 0, at, end, text, (), 0.0, -0.2, 1.5, 0.01, tuple(timed) if words else None))
        at = end + 0.05
    return Transcript("".join(TEXTS), "en", at + 1, tuple(segments))


def seconds(match: tuple[str, ...]) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number)
        timing = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert timing, lines[1]
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:])
        cues.append((seconds(timing.groups()[:4]), seconds(timing.groups()[4:]), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    header, *blocks = text.strip().split("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in blocks:
        lines = block.split("\n")
        timing = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert timing, lines[0]
        assert len(lines) >= 2 and all(line.strip() and "-->" not in line for line in lines[1:])
        cues.append((seconds(timing.groups()[:4]), seconds(timing.groups()[4:]), "\n".join(lines[1:])))
    return cues


def plain(text: str) -> str:
    return " ".join(text.replace("<u>", "").replace("</u>", "").split())


@pytest.mark.parametrize("words", [True, False])
def test_defaults_give_one_cue_per_segment(words: bool) -> None:
    transcript = make_transcript(words=words)
    for cues in (parse_srt(as_srt(transcript)), parse_vtt(as_vtt(transcript))):
        assert [c[2] for c in cues] == [t.strip() for t in TEXTS]
        assert [(c[0], c[1]) for c in cues] == [(round(s.start, 3), round(s.end, 3)) for s in transcript.segments]


@pytest.mark.parametrize("words", [True, False])
@pytest.mark.parametrize(
    "options", [READABLE, SubtitleOptions(max_line_width=20, max_line_count=1, max_cue_duration=3)]
)
def test_limits_hold_and_no_text_is_lost(words: bool, options: SubtitleOptions) -> None:
    transcript = make_transcript(words=words)
    assert options.max_line_width and options.max_line_count and options.max_cue_duration
    for cues in (parse_srt(as_srt(transcript, options)), parse_vtt(as_vtt(transcript, options))):
        for start, end, text in cues:
            lines = text.split("\n")
            assert len(lines) <= options.max_line_count
            assert all(len(line) <= options.max_line_width for line in lines)
            assert end - start <= options.max_cue_duration + 1e-3
            assert start <= end
        assert all(a[1] <= b[0] + 1e-3 for a, b in pairwise(cues))
        assert plain(" ".join(c[2] for c in cues)) == plain(" ".join(TEXTS))


def test_words_flow_across_segments_but_not_across_long_pauses() -> None:
    transcript = make_transcript(words=True)
    cues = subtitle_cues(transcript, SubtitleOptions(max_line_width=60, max_line_count=2))
    pause_start = transcript.segments[1].end
    assert any("for you,\nask what" in c.text or "for you, ask what" in c.text for c in cues)  # flowed across
    assert all(not (c.start < pause_start + 1 < c.end) for c in cues)  # nothing spans the 4 s pause


def test_highlighting_gives_one_cue_per_word() -> None:
    transcript = make_transcript(words=True)
    for options in (SubtitleOptions(highlight_words=True), SubtitleOptions(max_line_width=42, highlight_words=True)):
        cues = parse_srt(as_srt(transcript, options))
        assert len(cues) == len(transcript.words)
        for (start, _, text), word in zip(cues, transcript.words, strict=True):
            assert re.findall(r"<u>(.*?)</u>", text) == [word.word.strip()]
            assert start == pytest.approx(word.start, abs=1e-3)
        assert len(parse_vtt(as_vtt(transcript, options))) == len(transcript.words)


def test_cue_text_cannot_break_the_format() -> None:
    segment = Segment(0, 0, 0.0, 1.0, " a --> b\n\nc", (), 0.0, 0.0, 1.0, 0.0)
    transcript = Transcript(segment.text, "en", 1.0, (segment,))
    assert parse_srt(as_srt(transcript))[0][2] == "a -> b c"
    assert parse_vtt(as_vtt(transcript))[0][2] == "a -> b c"


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        SubtitleOptions(max_line_width=0)
    with pytest.raises(InvalidRequest):
        SubtitleOptions(max_cue_duration=-1)
