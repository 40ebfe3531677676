"""Transcription options and results: frozen, passed whole, serialisable to the API's JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from halkspeech.errors import InvalidRequest
from halkspeech.model.tokenizer import Task

Mode = Literal["sequential", "batched"]
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class TranscribeOptions:
    """Everything a caller may choose for one file (the reference's `transcribe` keyword arguments)."""

    language: str | None = None  # None: detect from the first 30 s
    task: Task = "transcribe"
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # tried in order while a window fails the guards
    beam_size: int = 1
    best_of: int = 1
    patience: float = 1.0
    length_penalty: float | None = None
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    #: Words or phrases to favour (faster-whisper's `hotwords`): they lead every window's prompt, before the
    #: text so far; ignored with a `prefix`, as there.
    hotwords: str | None = None
    prefix: str | None = None
    #: Tokens a window may decode at most (None: the model's n_text_ctx // 2, 224, as the reference).
    max_new_tokens: int | None = None
    suppress_tokens: tuple[int, ...] = (-1,)
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    word_timestamps: bool = False
    mode: Mode = "sequential"
    #: faster-whisper's `vad_filter`: transcribe only the speech the VAD hears (its regions joined end to end),
    #: times mapped back to the file's (vad_filter.py). Sequential mode only: batched mode always uses the VAD.
    vad_filter: bool = False
    #: Benchmarking only: decode exactly this many tokens per window, never stopping at end-of-text.
    force_decode_tokens: int | None = None
    #: Benchmarking only (batched mode): each chunk decodes exactly ceil(speech seconds × this) tokens, ≤ 224.
    force_tokens_per_second: float | None = None
    #: Engine queue priority of this transcription's windows: lower runs first; live sessions use -1.
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise InvalidRequest("at least one temperature is needed")
        for t in self.temperatures:
            if not 0 <= t <= 10 or math.isnan(t):
                raise InvalidRequest(f"temperature must be between 0 and 10, got {t}")
        if self.task not in ("transcribe", "translate"):
            raise InvalidRequest(f"task must be 'transcribe' or 'translate', got {self.task!r}")
        if not 1 <= self.beam_size <= 16:
            raise InvalidRequest("beam_size must be between 1 and 16")
        if not 1 <= self.best_of <= 16:
            raise InvalidRequest("best_of must be between 1 and 16")
        if not 0 < self.patience <= 100:  # NaN fails too; beams stop after beam_size × patience candidates
            raise InvalidRequest(f"patience must be above 0 and at most 100, got {self.patience}")
        for name in ("length_penalty", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:  # as the engine's check, up front
            raise InvalidRequest(f"length_penalty must be between 0 and 1, got {self.length_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_initial_timestamp is not None and not 0 <= self.max_initial_timestamp <= 30:
            raise InvalidRequest(f"max_initial_timestamp must be 0 to 30 s, got {self.max_initial_timestamp}")
        if self.mode not in ("sequential", "batched"):
            raise InvalidRequest(f"mode must be 'sequential' or 'batched', got {self.mode!r}")
        rate = self.force_tokens_per_second
        if rate is not None and not (0 < rate <= 100):
            raise InvalidRequest("force_tokens_per_second must be in (0, 100]")


def _to_the_millisecond(span: Word | Segment) -> None:
    # times are sums of 0.02 s steps and offsets: 7.6000000000000005 in every output format otherwise
    object.__setattr__(span, "start", round(span.start, 3))
    object.__setattr__(span, "end", round(span.end, 3))


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float

    def __post_init__(self) -> None:
        _to_the_millisecond(self)

    def clamped(self, lo: float, hi: float) -> Word:
        """Its times moved into [lo, hi] (a timestamp in a window's padding, past the audio, means its end)."""
        start = min(max(self.start, lo), hi)
        return replace(self, start=start, end=min(max(self.end, start), hi))


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] | None = None

    def __post_init__(self) -> None:
        _to_the_millisecond(self)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        if self.words is None:
            data.pop("words")
        else:
            data["words"] = [asdict(w) for w in self.words]
        return data


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage of one transcription. queue/encoder/decoder are summed over its windows:
    encoder each window's share of the encoder run it was in, queue and decoder each window's own wait and
    decoding, which overlap when its windows run together (batched mode: their sum can exceed `total`); the
    rest are wall times of batched mode's stages."""

    queue: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0
    total: float = 0.0
    vad: float = 0.0  # speech detection
    features: float = 0.0  # log-mel of the chunks
    engine: float = 0.0  # first chunk submitted → last chunk decoded
    words: float = 0.0  # word timing (DTW etc.), summed over chunks
    stitch: float = 0.0  # segments assembled after the last chunk


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    language_probs: dict[str, float] | None = None
    timings: Timings = field(default_factory=Timings)
    tokens: tuple[int, ...] = ()  # every text token, for tests and parity checks

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in (s.words or ())]
