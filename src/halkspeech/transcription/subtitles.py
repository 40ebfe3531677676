"""Subtitle cues from a transcript: line width, lines per cue, cue duration, and karaoke-style word highlighting.

With word timings, words flow into cues at word boundaries (across segments) until a limit would break: the
line is full (a new line), the cue has its lines or would last too long, or the speaker paused (a new cue).
Without word timings each segment is laid out alone: its text is cut at spaces (and a piece wider than a
line, as text without spaces in Japanese or Chinese is, into pieces a line wide), and each piece gets a share
of the segment's time in proportion to its characters. With no limit set, a cue is a segment, as before.
Widths count columns: a wide (CJK) character takes two, as on screen.

The writers pass `escape` for their format (VTT: `&` and `<` as character references, so text such as "<5%"
is not taken for a tag); highlighting's own `<u>` is added after it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.types import Segment, Transcript, Word

LONG_PAUSE_S = 3.0  # a pause this long starts a new cue (as openai-whisper's subtitle writer)


@dataclass(frozen=True)
class SubtitleOptions:
    """How transcript text is cut into cues. None: no limit (the defaults give one cue per segment)."""

    max_line_width: int | None = None  # columns per line (a CJK character takes two)
    max_line_count: int | None = None  # lines per cue
    max_cue_duration: float | None = None  # seconds a cue may stay on screen (a single long word may exceed it)
    highlight_words: bool = False  # one cue per word, that word wrapped in <u>…</u> (needs word timings)

    def __post_init__(self) -> None:
        if self.max_line_width is not None and not 1 <= self.max_line_width <= 1000:
            raise InvalidRequest("max_line_width must be between 1 and 1000 characters")
        if self.max_line_count is not None and not 1 <= self.max_line_count <= 100:
            raise InvalidRequest("max_line_count must be between 1 and 100")
        if self.max_cue_duration is not None and not 0.1 <= self.max_cue_duration <= 3600:
            raise InvalidRequest("max_cue_duration must be between 0.1 and 3600 seconds")

    @property
    def limited(self) -> bool:
        return (self.max_line_width, self.max_line_count, self.max_cue_duration) != (None, None, None)


#: Broadcast-style layout (two lines of 42 characters, at most 7 s on screen).
READABLE = SubtitleOptions(max_line_width=42, max_line_count=2, max_cue_duration=7.0)


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str  # lines joined by "\n"


Escape = Callable[[str], str]


def _as_is(text: str) -> str:
    return text


def subtitle_cues(
    transcript: Transcript, options: SubtitleOptions = SubtitleOptions(), escape: Escape = _as_is
) -> list[Cue]:
    """The transcript's cues in order, each at least 1 ms long (times in whole milliseconds; WebVTT requires
    an end after the start)."""
    if not options.limited and not options.highlight_words:
        plain = [Cue(s.start, s.end, escape(_clean(s.text.strip()))) for s in transcript.segments if s.text.strip()]
        return [_timed(c) for c in plain]
    timed = bool(transcript.segments) and all(s.words is not None for s in transcript.segments if s.text.strip())
    if timed and options.limited:
        groups = [_layout(transcript.words, options)]
    else:  # each segment alone: its words, or pieces of its text with proportional times
        groups = [
            _layout(list(s.words) if timed and s.words else _pseudo_words(s, options.max_line_width), options)
            for s in transcript.segments
        ]
    cues: list[Cue] = []
    for group in groups:
        for lines in group:
            if options.highlight_words and timed:
                # a word with no time of its own (its start is the next one's) is shown underlined by no cue:
                # its lines are on screen in its neighbours' cues; a cue with no such neighbour keeps 1 ms
                highlighted = [_rounded(c) for c in _highlighted(lines, escape)]
                cues.extend([c for c in highlighted if c.end > c.start] or [_timed(highlighted[0])])
            else:
                cues.append(_timed(_plain(lines, escape)))
    return [c for c in cues if c.text.strip()]


def _rounded(cue: Cue) -> Cue:
    return Cue(round(cue.start, 3), round(cue.end, 3), cue.text)


def _timed(cue: Cue) -> Cue:
    """Times in whole milliseconds, the end at least 1 ms after the start (a zero-length segment keeps its text)."""
    cue = _rounded(cue)
    return cue if cue.end > cue.start else Cue(cue.start, round(cue.start + 0.001, 3), cue.text)


def width(text: str) -> int:
    """Columns `text` takes on screen: wide and full-width characters (CJK) two, others one."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pseudo_words(segment: Segment, line_width: int | None) -> list[Word]:
    """A segment's text cut at spaces, and pieces wider than a line into pieces a line wide (text without
    spaces: Japanese, Chinese, Thai); each piece timed in proportion to its characters."""
    pieces = [piece for p in segment.text.split() for piece in _cut(" " + p, line_width)]
    total = sum(len(p) for p in pieces) or 1
    words, at = [], segment.start
    for piece in pieces:
        end = at + (segment.end - segment.start) * len(piece) / total
        words.append(Word(piece, at, end, 1.0))
        at = end
    return words


def _cut(piece: str, line_width: int | None) -> list[str]:
    """A piece (" 日本語…") → pieces of at most `line_width` columns (its leading space counted in the first)."""
    if line_width is None or width(piece) <= line_width:
        return [piece]
    pieces, current = [], ""
    for char in piece:
        if current.strip() and width(current + char) > line_width:
            pieces.append(current)
            current = ""
        current += char
    return [*pieces, current]


Lines = list[list[Word]]  # a cue: its lines, each a list of words


def _layout(words: list[Word], options: SubtitleOptions) -> Iterator[Lines]:
    """Greedy flow of words into lines and cues within the limits."""
    line_width, count, duration = options.max_line_width, options.max_line_count, options.max_cue_duration
    cue: Lines = []
    for word in words:
        if not word.word.strip():
            continue
        if cue:
            line = cue[-1]
            paused = word.start - line[-1].end > LONG_PAUSE_S and options.limited
            too_long = duration is not None and word.end - cue[0][0].start > duration
            if paused or too_long:
                yield cue
                cue = []
            elif line_width is not None and width(_text(line)) + width(word.word) > line_width:
                if count is not None and len(cue) >= count:
                    yield cue
                    cue = []
                else:
                    cue.append([])
        if not cue:
            cue = [[]]
        cue[-1].append(word)
    if cue:
        yield cue


def _text(line: list[Word], highlight: Word | None = None, escape: Escape = _as_is) -> str:
    """A line's words joined (leading space dropped); `highlight` wrapped in <u>…</u>, its space outside. An
    arrow that only the joining made ("--" then ">") is cleaned too."""
    parts = []
    for i, word in enumerate(line):
        text = escape(_clean(word.word))
        text = text.lstrip() if i == 0 else text
        if word is highlight:
            lead = text[: len(text) - len(text.lstrip())]
            text = f"{lead}<u>{text.strip()}</u>"
        parts.append(text)
    return _ARROW.sub("->", "".join(parts))


_ARROW = re.compile(r"-{2,}>")  # "-->" ends a cue's timing line; "--->" must not leave one behind either


def _clean(text: str) -> str:
    """No line breaks or cue-timing arrows inside a cue's text (either would break SRT/VTT parsing)."""
    cleaned = _ARROW.sub("->", text)
    lines = cleaned.splitlines()
    return " ".join(line for line in lines if line.strip()) if len(lines) > 1 else cleaned


def _plain(lines: Lines, escape: Escape = _as_is) -> Cue:
    return Cue(lines[0][0].start, lines[-1][-1].end, "\n".join(_text(line, escape=escape) for line in lines))


def _highlighted(lines: Lines, escape: Escape = _as_is) -> list[Cue]:
    """A cue per word with that word underlined, on screen until the next word starts (no flicker in
    the short gaps between words)."""
    words = [w for line in lines for w in line]
    cues = []
    for word, following in zip(words, [*words[1:], None], strict=True):
        end = following.start if following is not None and following.start > word.start else word.end
        cues.append(Cue(word.start, end, "\n".join(_text(line, word, escape) for line in lines)))
    return cues
