"""The pieces of a live turn that need no model: its options, the events it emits, its audio buffer, pause
segmentation from VAD probabilities, and the stable prefix of partial results. `streaming.py` wires them."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from typing import Any, Literal

import numpy as np

from halkspeech.audio.streaming import FRAME, MAX_RATE, MIN_RATE, pcm16_to_float
from halkspeech.errors import InvalidRequest
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.languages import NO_SPACE_LANGUAGES, language_key
from halkspeech.model.tokenizer import Task
from halkspeech.transcription.types import Segment, Timings, Transcript


@dataclass(frozen=True)
class StreamOptions:
    """What a client chooses for one turn (the `start` message)."""

    language: str | None = None  # None: detect
    task: Task = "transcribe"
    sample_rate: int = SAMPLE_RATE  # of the PCM the client sends; resampled to 16 kHz
    partials: bool = False
    #: A pause this long (server VAD) ends a segment, transcribed at once; None: one piece per turn.
    segment_silence_ms: int | None = None
    #: Skip audio the VAD finds no speech in (segmented turns always do).
    vad: bool = False
    #: Names and terms to favour in partials, segments and the final (TranscribeOptions.hotwords).
    hotwords: str | None = None
    #: Text that precedes the audio, for every partial, segment and final (TranscribeOptions.initial_prompt).
    prompt: str | None = None
    #: Speech probability at which the VAD hears speech start (None: silero's 0.5); it goes on while frames stay
    #: above this less 0.15, silero's own hysteresis.
    vad_threshold: float | None = None
    #: Audio kept before the VAD's speech start (None: StreamLimits.preroll_s).
    preroll_ms: int | None = None
    #: Emit SpeechStarted and SpeechStopped as the VAD hears them (the OpenAI Realtime adapter's speech events).
    speech_events: bool = False

    def __post_init__(self) -> None:
        if self.task not in ("transcribe", "translate"):
            raise InvalidRequest(f"task must be 'transcribe' or 'translate', got {self.task!r}")
        if not MIN_RATE <= self.sample_rate <= MAX_RATE:
            raise InvalidRequest(f"sample_rate must be {MIN_RATE} to {MAX_RATE} Hz, got {self.sample_rate}")
        if self.segment_silence_ms is not None and not 100 <= self.segment_silence_ms <= 30_000:
            raise InvalidRequest(f"segment_silence_ms must be 100 to 30000, got {self.segment_silence_ms}")
        if self.vad_threshold is not None and not 0.0 <= self.vad_threshold <= 1.0:
            raise InvalidRequest(f"the VAD threshold must be 0.0 to 1.0, got {self.vad_threshold}")
        if self.preroll_ms is not None and not 0 <= self.preroll_ms <= 30_000:
            raise InvalidRequest(f"the VAD's prefix padding must be 0 to 30000 ms, got {self.preroll_ms}")

    @property
    def uses_vad(self) -> bool:
        return self.vad or self.segment_silence_ms is not None


@dataclass(frozen=True)
class StreamLimits:
    """Server-side bounds and pacing for live sessions (from ServerSettings, plus tuning defaults)."""

    max_turn_s: float = 300.0  # audio (and wall time) of one turn; bounds its buffer
    max_pending_finals: int = 4  # turns of one session still being transcribed after their `end`
    partial_interval_s: float = 0.4  # new audio between two partials (at most one in flight)
    min_partial_s: float = 0.5  # no partial for less audio than this (Whisper guesses wildly on less)
    preroll_s: float = 0.3  # audio kept before the VAD's speech start, so first sounds are not cut
    hangover_s: float = 0.3  # audio kept after the last voiced frame (at most half the pause)
    #: A piece whose speech (VAD start to last voiced frame) is shorter is not transcribed, as files drop such
    #: regions (VadOptions.min_speech_s): Whisper given 0.26 s around three voiced frames at jfk.flac's end
    #: wrote "Thank you." (no-speech probability 0.83, too confident for the no-speech rule).
    min_speech_s: float = 0.25
    force_decode_tokens: int | None = None  # benchmarks only (random weights)


# -- events: what a session tells its client ------------------------------------------------------------


def segment_dict(segment: Segment, offset_s: float = 0.0, index: int | None = None) -> dict[str, Any]:
    """A transcript segment as the protocol sends it: times from the start of the turn."""
    return {
        "id": segment.id if index is None else index,
        "start": round(segment.start + offset_s, 3),
        "end": round(segment.end + offset_s, 3),
        "text": segment.text,
        "avg_logprob": segment.avg_logprob,
        "no_speech_prob": segment.no_speech_prob,
        "temperature": segment.temperature,
        "compression_ratio": segment.compression_ratio,
    }


@dataclass(frozen=True)
class TurnStarted:
    turn: int
    model: str
    sample_rate: int

    def as_message(self) -> dict[str, Any]:
        return {"type": "started", "turn": self.turn, "model": self.model, "sample_rate": self.sample_rate}


@dataclass(frozen=True)
class Partial:
    turn: int
    text: str
    stable_text: str  # only grows within a piece of the turn (see StablePrefix)
    audio_s: float  # the partial covers the turn's audio up to here (seconds from the turn's start)
    piece: int = 0  # the piece it describes: 0, then one more after each segment cut (not in the /ws message)

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "partial",
            "turn": self.turn,
            "text": self.text,
            "stable_text": self.stable_text,
            "audio_s": round(self.audio_s, 3),
        }


@dataclass(frozen=True)
class Piece:
    """A transcribed stretch of the turn: [start, end) seconds from the turn's start."""

    start: float
    end: float
    text: str
    language: str
    segments: tuple[Segment, ...]  # times already from the turn's start
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def of(cls, transcript: Transcript, start: float, end: float) -> Piece:
        """A transcript of audio that began `start` seconds into the turn."""
        moved = tuple(replace(s, start=s.start + start, end=s.end + start) for s in transcript.segments)
        return cls(start, end, transcript.text.strip(), transcript.language, moved, transcript.timings)


@dataclass(frozen=True)
class SegmentReady:
    turn: int
    index: int
    piece: Piece

    def as_message(self) -> dict[str, Any]:
        p = self.piece
        return {
            "type": "segment",
            "turn": self.turn,
            "id": self.index,
            "start": round(p.start, 3),
            "end": round(p.end, 3),
            "text": p.text,
            "language": p.language,
            "segments": [segment_dict(s) for s in p.segments],
        }


@dataclass(frozen=True)
class Final:
    turn: int
    pieces: tuple[Piece, ...]
    duration: float  # seconds of audio in the turn
    language: str
    timings: Timings  # of the work done after `end`
    end_to_final_ms: float
    model: str  # the turn's model (for metrics; the client had it in `started`)

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.pieces if p.text)

    def as_message(self) -> dict[str, Any]:
        segments = [s for p in self.pieces for s in p.segments]
        t = self.timings
        return {
            "type": "final",
            "turn": self.turn,
            "text": self.text,
            "language": self.language,
            "duration": round(self.duration, 3),
            "segments": [segment_dict(s, index=i) for i, s in enumerate(segments)],
            "timings_ms": {
                "queue": round(t.queue, 2),
                "encoder": round(t.encoder, 2),
                "decoder": round(t.decoder, 2),
                "transcribe": round(t.total, 2),
                "end_to_final": round(self.end_to_final_ms, 2),
            },
        }


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD heard speech start: piece `piece` of the turn begins `at_s` seconds into it (prefix padding
    included). Only with StreamOptions.speech_events."""

    turn: int
    piece: int
    at_s: float

    def as_message(self) -> dict[str, Any]:
        return {"type": "speech_started", "turn": self.turn, "piece": self.piece, "at_s": round(self.at_s, 3)}


@dataclass(frozen=True)
class SpeechStopped:
    """The VAD heard a pause long enough to cut piece `piece` at `at_s` seconds; its SegmentReady follows once
    transcribed. Only with StreamOptions.speech_events and segment_silence_ms."""

    turn: int
    piece: int
    at_s: float

    def as_message(self) -> dict[str, Any]:
        return {"type": "speech_stopped", "turn": self.turn, "piece": self.piece, "at_s": round(self.at_s, 3)}


@dataclass(frozen=True)
class StreamError:
    code: str
    message: str
    turn: int | None = None
    ends_turn: bool = False  # sent in place of the turn's Final: nothing more comes for `turn`

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.turn is not None:
            message["turn"] = self.turn
        return message


LiveEvent = TurnStarted | Partial | SpeechStarted | SpeechStopped | SegmentReady | Final | StreamError


# -- audio buffer ---------------------------------------------------------------------------------------


class TurnBuffer:
    """A turn's audio as int16 at 16 kHz, grown by doubling up to `limit` samples (2 bytes each)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = np.zeros(min(limit, SAMPLE_RATE * 8), dtype=np.int16)
        self.size = 0

    def append(self, samples: np.ndarray) -> int:
        """Append what fits; returns how many samples were taken."""
        take = min(len(samples), self.limit - self.size)
        if self.size + take > len(self._data):
            grown = np.zeros(min(self.limit, max(2 * len(self._data), self.size + take)), dtype=np.int16)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : self.size + take] = samples[:take]
        self.size += take
        return take

    def floats(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start] copy, for the transcriber."""
        return pcm16_to_float(self._data[start:stop])


# -- pause segmentation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["speech", "pause"]
    sample: int  # speech: the first voiced frame's start; pause: the last voiced frame's end


@dataclass
class Segmenter:
    """Frame probabilities → speech starts and pauses, with silero's hysteresis: speech starts at a frame ≥
    `threshold`, continues while frames are ≥ `neg_threshold`, and ends after `pause_frames` quieter frames."""

    pause_frames: int | None  # None: speech never ends (VAD gating only tracks where the speech was)
    threshold: float = 0.5
    neg_threshold: float = 0.35

    @classmethod
    def at(cls, pause_frames: int | None, threshold: float | None) -> Segmenter:
        """With a start threshold (None: 0.5) and silero's hysteresis below it (threshold - 0.15)."""
        if threshold is None:
            return cls(pause_frames)
        return cls(pause_frames, threshold, max(0.0, threshold - 0.15))

    in_speech: bool = False
    heard: bool = False  # any speech so far
    voiced_end: int = 0  # sample just after the last voiced frame
    _frame: int = 0

    def push(self, probs: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        for p in probs.tolist():
            end = (self._frame + 1) * FRAME
            if self.in_speech:
                if p >= self.neg_threshold:
                    self.voiced_end = end
                elif self.pause_frames is not None and end - self.voiced_end >= self.pause_frames * FRAME:
                    self.in_speech = False
                    events.append(VadEvent("pause", self.voiced_end))
            elif p >= self.threshold:
                self.in_speech = self.heard = True
                self.voiced_end = end
                events.append(VadEvent("speech", self._frame * FRAME))
            self._frame += 1
        return events


# -- stable prefix of partials --------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w']+")


def _norm(word: str) -> str:
    return _PUNCTUATION.sub("", language_key(word))


#: How much audio the hypotheses that agree on a word must have grown by before it is committed. Partials come
#: every 0.4 s on a GPU, so a word needs three of them; on a CPU, where one takes longer, two may span it. With
#: two hypotheses 0.4 s apart (LocalAgreement-2 as such), bench/realtime_deltas.py measured the streamed text of
#: the 23 English dev clips at WER 4.9% (tiny.en and base) against the finals' 3.7%: early guesses from a second
#: or two of audio agreed once and stuck. With 0.8 s: 4.1% and 3.4%, and 93–94% of the words were still sent
#: before the final (94% with 0.4 s).
AGREE_SPAN_S = 0.8


class StablePrefix:
    """Local agreement (Macháček et al. 2023, whisper_streaming's LocalAgreement-n): the words that every
    hypothesis of the last AGREE_SPAN_S of audio growth agrees on are committed, except the newest one's last
    word (it may be cut off by the end of the audio). Without audio times, the previous hypothesis is that
    span. Committed words are never retracted: a later hypothesis that revises them is shown as the committed
    words followed by its own words after them."""

    def __init__(self) -> None:
        self.stable: list[str] = []
        self._history: list[tuple[float | None, list[str]]] = []  # earlier (audio_s, words), oldest first

    def update(self, hypothesis: str, language: str | None = None, audio_s: float | None = None) -> tuple[str, str]:
        """A new hypothesis for the same audio grown to `audio_s` seconds → (text, stable_text); text starts with
        stable_text. In a language written without spaces (Japanese, Chinese, Thai …) the units are characters,
        not words."""
        spaced = language not in NO_SPACE_LANGUAGES
        units = hypothesis.split() if spaced else list(hypothesis.strip())
        n = len(self.stable)
        cut, tail = _covered(units, self.stable) if spaced else (n, "")
        words = self.stable + units[cut:]  # ours replace a revision
        if tail:  # the hypothesis joined the last committed word to the next: it grows in place, committed
            words[n - 1] += tail
        earlier = self._agreeing(audio_s)
        agreed = n
        limit = min([len(w) for w in earlier] + [len(words) - 1]) if earlier else n
        while agreed < limit and all(_agree(w[agreed], words[agreed], spaced) for w in earlier):
            agreed += 1
        self.stable = words[:agreed]
        self._history.append((audio_s, words))
        while len(self._history) > 1 and _apart(self._history[1][0], audio_s):
            del self._history[0]  # the next hypothesis (later audio) needs none before the newest old enough
        joiner = " " if spaced else ""
        return joiner.join(words), joiner.join(self.stable)

    def _agreeing(self, audio_s: float | None) -> list[list[str]]:
        """The earlier hypotheses a word must agree with: each back to the newest one AGREE_SPAN_S older (none
        while no hypothesis is that old), or the previous one without audio times."""
        if audio_s is None:
            return [self._history[-1][1]] if self._history else []
        window = []
        for seen_s, words in reversed(self._history):
            window.append(words)
            if _apart(seen_s, audio_s):
                return window
        return []


def _apart(earlier_s: float | None, now_s: float | None) -> bool:
    """Two hypotheses' audio grew by AGREE_SPAN_S between them (or a time is not known: counted as apart)."""
    return earlier_s is None or now_s is None or now_s - earlier_s >= AGREE_SPAN_S - 1e-6


ALIGN_MAX_LETTERS = 600  # a revision from further back than this is cut by word count


def _covered(units: list[str], stable: list[str]) -> tuple[int, str]:
    """How many of a hypothesis's words stand for the committed words, and what to glue onto the last committed
    word. Their letters are aligned with the committed ones (matches of 3 or more letters, so that a stray letter
    far on does not count): the cut is the word boundary nearest to where the committed letters end. Cut by word
    count instead, a revision that split, joined or reworded a committed word ("stuffered into you" for "stuff
    it into you") repeated or dropped the words after it. With no such match, the count. Words equal from the
    start are matched first, so that the alignment (quadratic) sees only the revised end: 22 ms for 400 words on
    the event loop otherwise.

    Where the committed letters end inside a hypothesis word that begins with the last committed word (the
    hypothesis joined it to the next: "flower" committed, then "flower-fattened"), that word counts as covered
    and the rest of it ("-fattened") is returned to be glued on: cut before it, the word came out twice ("flower
    flower-fattened"); cut after it, its end was lost."""
    said_words, heard_words = [_norm(w) for w in stable], [_norm(u) for u in units]
    same = next((i for i, (w, u) in enumerate(zip(said_words, heard_words, strict=False)) if w != u), None)
    if same is None:
        return len(stable), ""
    said, heard = "".join(said_words[same:]), "".join(heard_words[same:])  # the revised end only
    if len(said) > ALIGN_MAX_LETTERS:
        return len(stable), ""
    blocks = [b for b in SequenceMatcher(None, said, heard, autojunk=False).get_matching_blocks() if b.size >= 3]
    if not blocks:
        return len(stable), ""
    last = blocks[-1]
    end = last.b + len(said) - last.a  # the committed letters after the last match follow it in the hypothesis
    lengths = [0, *itertools.accumulate(len(u) for u in heard_words[same:])]
    inside = next((j for j in range(len(lengths) - 1) if lengths[j] < end < lengths[j + 1]), None)
    if inside is not None and stable and len(units[same + inside]) > len(stable[-1]):
        word = units[same + inside]
        if word.startswith(stable[-1]):
            return same + inside + 1, word[len(stable[-1]) :]
    n = len(stable) - same
    return same + min(range(len(lengths)), key=lambda k: (abs(lengths[k] - end), abs(k - n))), ""


def _agree(before: str, now: str, spaced: bool) -> bool:
    """Two hypotheses' units at one place agree: words by their letters (case and punctuation aside), characters
    as they are."""
    return _norm(before) == _norm(now) != "" if spaced else before == now


# -- append-only text (the OpenAI Realtime adapter's transcription deltas) -------------------------------


class AppendOnlyText:
    """One piece's text streamed as appended fragments, none ever taken back: `grow` gives what a partial's
    stable_text adds, `finish` the rest of the final and the whole text, which starts with every fragment sent.

    stable_text only grows, so the fragments before the final are its growth. The final (decoded with
    temperature fallback from all the audio) usually starts with them too; where it does not (it revised a word
    two partials agreed on, or put a comma inside the streamed words), the whole text keeps what was sent and
    goes on with the final's words after the ones that stand for it, found as StablePrefix finds a revision's."""

    def __init__(self) -> None:
        self.sent = ""

    def grow(self, stable_text: str) -> str:
        """The part of `stable_text` not sent yet ("" when it adds nothing)."""
        if len(stable_text) <= len(self.sent) or not stable_text.startswith(self.sent):
            return ""
        fragment = stable_text[len(self.sent) :]
        self.sent = stable_text
        return fragment

    def finish(self, final: str, language: str | None = None) -> tuple[str, str]:
        """(the last fragment, the whole text) for the piece's final text."""
        whole = final if final.startswith(self.sent) else _continued(self.sent, final, language)
        fragment, self.sent = whole[len(self.sent) :], whole
        return fragment, whole


def _continued(sent: str, final: str, language: str | None) -> str:
    """`sent` followed by the words of `final` after those that stand for it (characters, in a language
    written without spaces)."""
    if language in NO_SPACE_LANGUAGES:
        return sent + final.strip()[len(sent) :]
    units = final.split()
    cut, tail = _covered(units, sent.split())
    rest, head = units[cut:], sent + tail
    return " ".join([head, *rest]) if rest and head else head or " ".join(rest)
