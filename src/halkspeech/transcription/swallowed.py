"""Speech a segment swallowed: Whisper can give a segment an end timestamp that covers a long pause and the
speech after it while its text is only the speech before the pause. tiny.en and base on a 1.8 s sentence,
2-8 s of silence and a 4.8 s sentence in one chunk wrote `<|0.00|> has never been surpassed.<|14.40|>`, and
batched mode lost the second sentence (bench/lost_speech.py). Batched mode's `_unheard` looks only past the
last segment's end, so it cannot see this.

A segment is suspect when the VAD heard a pause of at least SWALLOW_GAP_S inside its span and then at least
`min_speech_s` of speech, still inside it; no segment of the dev set spans such a pause. A suspect is not
trusted on the VAD's word alone: the window from that speech on is decoded (a probe), and only when most of
the probe's words are not among those the window gave that audio (the suspect's text and its later
segments') did the suspect swallow speech; it then ends at the pause and the probe is the next window.
Where the window did have the later speech (the suspect's end timestamp was right; or its start came early:
base put "stuffed it into you." at 16.78-20.26 s, from the end of one sentence over a 2 s pause into the
next), the probe says the same words again, the window is kept as it was and the probe's decode is spent for
nothing: 6 times in bench/lost_speech.py's 208 cases with base (9 more probes found lost speech), never on
the dev set with tiny.en or base.

Speech after a window's last segment is simpler (`unheard`): the window said nothing there, so it is decoded
again from where the VAD heard it begin, unprobed. Both modes judge with these (batched.py over its chunks,
seek_guard.py where the sequential seek rule would skip audio).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import pairwise

import numpy as np
import torch

from halkspeech.audio.vad import FRAME_S, SpeechDetector, VadOptions, raised_for_vad, speech_regions
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.segments import RawSegment

#: Gap between padded VAD regions (each padded 0.2 s, so ≈ 1.4 s of silence) inside one segment that makes it
#: a suspect. Inside the dev set's segments (tiny.en) such gaps are at most 0.82 s; the lost cases' are 1.9-8.1 s.
SWALLOW_GAP_S = 1.0
#: A probe with fewer than this share of its words in what the window said for the same audio heard new speech.
SAID_ALREADY = 0.5

#: A window that ended (a closing timestamp) with this much speech heard after it, this far past its last
#: segment, is decoded again from there: Whisper can stop at a pause inside a chunk and drop what follows.
UNHEARD_MIN_S, UNHEARD_MARGIN_S = 1.0, 0.5

HasSpeech = Callable[[float, float, float], bool]  # (start, end, at least seconds) → whether the VAD heard it


@dataclass(frozen=True)
class Heard:
    """What the VAD heard in a file: speech probability per 32 ms frame from the file's start, and the padded
    speech regions (seconds, sorted) made of them."""

    probs: np.ndarray
    regions: list[tuple[float, float]]
    threshold: float  # a frame at or above this is speech
    pad_s: float  # the regions' padding

    def has_speech(self, start: float, end: float, at_least_s: float = 0.1) -> bool:
        """Whether the VAD heard speech in [start, end) (at least `at_least_s` of it)."""
        frames = self.probs[int(start / FRAME_S) : int(end / FRAME_S) + 1]
        return int((frames >= self.threshold).sum()) * FRAME_S >= at_least_s

    def regions_in(self, start: float, end: float) -> list[tuple[float, float]]:
        """The regions that overlap [start, end)."""
        first = bisect.bisect_right(self.regions, start, key=lambda r: r[1])
        return self.regions[first : bisect.bisect_left(self.regions, end, key=lambda r: r[0])]


def hear(audio: np.ndarray, device: torch.device, vad: VadOptions, detector: SpeechDetector) -> Heard:
    """The VAD over a whole file of 16 kHz samples (raised for it if quiet; a copy only then), on `device`.
    Blocking: call it in a worker thread."""
    probs = detector.probabilities(raised_for_vad(audio), device)
    return Heard(probs, speech_regions(probs, len(audio) / SAMPLE_RATE, vad), vad.threshold, vad.pad_s)


def unheard(heard: Heard, last_end: float, end: float) -> float | None:
    """Where to decode again when the VAD heard over UNHEARD_MIN_S of speech between a window's last segment
    (ending at `last_end`) and `end` (a sentence, 3 s of silence, then 11 s of speech in one chunk: tiny.en
    wrote the first sentence, closed the window, and the 11 s were lost): where that speech begins, less the
    VAD's padding, so that the new window's timestamps start at the speech. None: no such speech."""
    if not heard.has_speech(last_end + UNHEARD_MARGIN_S, end, UNHEARD_MIN_S):
        return None
    first = int((last_end + UNHEARD_MARGIN_S) / FRAME_S)
    at = first + int(np.argmax(heard.probs[first:] >= heard.threshold))
    return max(last_end, at * FRAME_S - heard.pad_s)


@dataclass(frozen=True)
class Suspect:
    """A segment (index into the window's raw segments) that may have swallowed speech after a pause."""

    index: int
    pause_start: float  # end of the (padded) speech region before the pause: where the segment should end
    resume: float  # start of the (padded) speech region after it: where the probe window starts


def find_suspect(
    raw: list[RawSegment],
    regions: list[tuple[float, float]],
    has_speech: HasSpeech,
    min_speech_s: float,
    spoken_s: float = 0.0,
) -> Suspect | None:
    """The first segment whose span holds a pause of SWALLOW_GAP_S between speech regions, followed by at
    least `min_speech_s` of speech the VAD heard before the segment's end, and preceded by at least `spoken_s`
    heard inside the segment (0: any region overlapping its start will do). `regions`: sorted, padded."""
    for index, segment in enumerate(raw):
        inside = [(a, b) for a, b in regions if b > segment.start and a < segment.end]
        for before, after in pairwise(inside):
            if after[0] - before[1] < SWALLOW_GAP_S or not has_speech(after[0], segment.end, min_speech_s):
                continue
            if spoken_s <= 0 or has_speech(max(segment.start, before[0]), before[1], spoken_s):
                return Suspect(index, before[1], after[0])
    return None


def heard_anew(tokenizer: Tokenizer, said: str, probe: str) -> bool:
    """Whether most of the probe's words are missing from what the window said for the same audio (word
    tokens of lower-cased text without punctuation, so that "And" and " and." match; any script)."""
    theirs = _word_tokens(tokenizer, probe)
    if not theirs:
        return False
    mine = _word_tokens(tokenizer, said)
    found = sum(block.size for block in SequenceMatcher(a=mine, b=theirs, autojunk=False).get_matching_blocks())
    return found < SAID_ALREADY * len(theirs)


def cut_at_pause(raw: list[RawSegment], suspect: Suspect) -> list[RawSegment]:
    """The window's segments up to the suspect, which now ends at the pause (its tokens as the model gave
    them); the segments after it are dropped: the probe window decodes that audio again."""
    segment = raw[suspect.index]
    return [*raw[: suspect.index], RawSegment(segment.start, suspect.pause_start, segment.tokens)]


def _word_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    words = re.findall(r"\w+", text.lower())
    return tokenizer.encode(" " + " ".join(words)) if words else []
