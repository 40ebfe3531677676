"""SRT and VTT: limits on line width, lines per cue and cue duration hold; highlighting gives one cue per word;
both formats parse back into what was laid out."""

from __future__ import annotations

import re
from dataclasses import replace
from itertools import pairwise

import pytest

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.formats import as_srt, as_vtt
from halkspeech.transcription.subtitles import READABLE, SubtitleOptions, subtitle_cues, width
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
    segment = Segment(0, 0, 0.0, 1.0, " a --> b ---> d\n\nc", (), 0.0, 0.0, 1.0, 0.0)
    transcript = Transcript(segment.text, "en", 1.0, (segment,))
    assert parse_srt(as_srt(transcript))[0][2] == "a -> b -> d c"
    assert parse_vtt(as_vtt(transcript))[0][2] == "a -> b -> d c"
    words = tuple(Word(w, i * 0.2, i * 0.2 + 0.2, 1.0) for i, w in enumerate([" a", " --->", " b"]))
    timed = Transcript(segment.text, "en", 1.0, (replace(segment, words=words),))
    for options in (READABLE, SubtitleOptions(highlight_words=True)):
        assert all("-->" not in c.text for c in subtitle_cues(timed, options))
    # an arrow that a cut at the line width, or words without spaces, put back together
    cut = Segment(0, 0, 0.0, 1.0, " " + "x" * 39 + "-->", (), 0.0, 0.0, 1.0, 0.0)
    assert "-->" not in as_vtt(Transcript(cut.text, "en", 1.0, (cut,)), READABLE).split("\n", 3)[3]
    pieces = tuple(Word(w, i * 0.2, i * 0.2 + 0.2, 1.0) for i, w in enumerate(["日本", "--", ">", "語"]))
    joined = Transcript("日本-->語", "ja", 1.0, (replace(segment, text="日本-->語", words=pieces),))
    for options in (READABLE, SubtitleOptions(highlight_words=True)):
        assert all("-->" not in c.text for c in subtitle_cues(joined, options))


def test_vtt_escapes_what_would_be_read_as_markup() -> None:
    text = " Costs fell by <5% at R&D; see x>y."
    segment = Segment(0, 0, 0.0, 2.0, text, (), 0.0, 0.0, 1.0, 0.0)
    transcript = Transcript(text, "en", 2.0, (segment,))
    assert parse_vtt(as_vtt(transcript))[0][2] == "Costs fell by &lt;5% at R&amp;D; see x>y."
    assert parse_srt(as_srt(transcript))[0][2] == text.strip()  # SRT has no character references
    words = tuple(Word(" " + w, i * 0.3, i * 0.3 + 0.3, 1.0) for i, w in enumerate(text.split()))
    timed = Transcript(text, "en", 3.0, (replace(segment, end=3.0, words=words),))
    first = parse_vtt(as_vtt(timed, SubtitleOptions(highlight_words=True)))[3][2]
    assert first == "Costs fell by <u>&lt;5%</u> at R&amp;D; see x>y."  # the markup is ours, the text escaped


def test_text_without_spaces_keeps_to_the_limits() -> None:
    """Japanese has no spaces to cut at: a long segment is cut into pieces a line wide, a wide character
    counting two columns, and the cue-duration limit holds."""
    text = "今日は晴れています。" * 8  # 80 wide characters, 160 columns, 20 s
    segment = Segment(0, 0, 0.0, 20.0, text, (), 0.0, 0.0, 1.0, 0.0)
    transcript = Transcript(text, "ja", 20.0, (segment,))
    cues = parse_srt(as_srt(transcript, READABLE))
    assert "".join(c[2].replace("\n", "") for c in cues) == text
    for start, end, cue in cues:
        assert all(width(line) <= 42 for line in cue.split("\n")) and len(cue.split("\n")) <= 2
        assert end - start <= 7.0 + 1e-3
    assert width("日本 a") == 6 and width("abc") == 3


def test_every_cue_ends_after_it_starts() -> None:
    """WebVTT requires it: a word with no time of its own gets no highlighted cue (its neighbours show its
    line), a zero-length segment keeps its text for a millisecond."""
    words = (Word(" a", 1.0, 1.5, 1.0), Word(" b", 1.5, 1.5, 1.0), Word(" c", 1.5, 2.0, 1.0))
    segments = (
        Segment(0, 0, 1.0, 2.0, " a b c", (), 0.0, 0.0, 1.0, 0.0, words),
        Segment(1, 0, 2.0, 2.0, " d", (), 0.0, 0.0, 1.0, 0.0, (Word(" d", 2.0, 2.0, 1.0),)),
    )
    transcript = Transcript(" a b c d", "en", 3.0, segments)
    for options in (SubtitleOptions(), READABLE, SubtitleOptions(highlight_words=True)):
        cues = parse_vtt(as_vtt(transcript, options))
        assert cues and all(end > start for start, end, _ in cues), (options, cues)
    plain_cues = parse_vtt(as_vtt(transcript))
    assert plain_cues[-1] == (2.0, 2.001, "d")
    highlighted = parse_vtt(as_vtt(transcript, SubtitleOptions(highlight_words=True)))
    assert highlighted[-1] == (2.0, 2.001, "<u>d</u>")  # alone in its cue: kept, not lost


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        SubtitleOptions(max_line_width=0)
    with pytest.raises(InvalidRequest):
        SubtitleOptions(max_cue_duration=-1)
