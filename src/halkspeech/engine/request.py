"""What goes into the engine and what comes out: frozen option and result objects, passed whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from halkspeech.errors import InvalidRequest
from halkspeech.model.dims import INPUT_STRIDE, N_FRAMES

FinishReason = Literal["eot", "length", "cancelled", "detected"]


@dataclass(frozen=True)
class SamplingOptions:
    """How one window is decoded (the reference's DecodingOptions, minus what the prompt already says)."""

    temperature: float = 0.0
    beam_size: int = 1  # > 1: beam search (temperature must be 0)
    patience: float = 1.0  # beam search stops after beam_size × patience finished candidates
    length_penalty: float | None = None  # None: rank by logprob / length; else Google NMT's alpha
    best_of: int = 1  # independent samples when temperature > 0; the most likely one wins
    max_new_tokens: int = 224  # the reference's sample_len: n_text_ctx // 2
    suppress_blank: bool = True  # no blank or end-of-text as the first sampled token
    suppress_tokens: tuple[int, ...] = ()  # token ids never sampled (resolved by the tokenizer)
    timestamps: bool = True  # apply the timestamp rules (pairs, monotonic, initial bound)
    max_initial_timestamp_index: int | None = 50  # 1.0 s / 0.02 s
    #: Benchmarking only: never end at end-of-text, always decode exactly max_new_tokens.
    force_length: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 10.0) or math.isnan(self.temperature):
            raise InvalidRequest(f"temperature must be between 0 and 10, got {self.temperature}")
        if self.beam_size < 1 or self.best_of < 1:
            raise InvalidRequest("beam_size and best_of must be at least 1")
        if self.beam_size > 1 and self.temperature > 0:
            raise InvalidRequest("beam search needs temperature 0")
        if self.beam_size > 1 and self.best_of > 1:
            raise InvalidRequest("beam_size and best_of cannot be used together")
        if self.patience <= 0:
            raise InvalidRequest("patience must be positive")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise InvalidRequest("length_penalty must be between 0 and 1")
        if self.max_new_tokens < 0:
            raise InvalidRequest("max_new_tokens must not be negative")

    @property
    def group_size(self) -> int:
        """Decoder slots this request occupies."""
        return self.beam_size if self.beam_size > 1 else (self.best_of if self.temperature > 0 else 1)


@dataclass(frozen=True, eq=False)
class DecodeRequest:
    """One 30 s window to decode.

    features:  [n_mels, 3000] log-mel (any device; the runner moves it)
    prompt:    initial tokens, e.g. <|startofprev|> previous-text <|startoftranscript|><|en|><|transcribe|>
    sot_index: position of <|startoftranscript|> in `prompt` (its logits give the no-speech probability)
    language_index: position of the language token in `prompt` to fill by detection, when detect_language
    """

    features: torch.Tensor
    prompt: tuple[int, ...]
    sot_index: int
    options: SamplingOptions = field(default_factory=SamplingOptions)
    detect_language: bool = False
    language_index: int | None = None
    #: Word timings: after decoding, run `alignment_prompt` + the text tokens + end-of-text through the
    #: decoder once more and return the alignment heads' cross-attention scores (None: no alignment).
    alignment_prompt: tuple[int, ...] | None = None
    #: Encoder positions (of 1500) the window's audio fills. When given, the engine reduces the scores to
    #: DTW's cost matrix on the device (engine/align.py) and returns that instead: a sixth of the bytes, and
    #: no softmax or median filter on the host. The matrix is normalised over the whole text, so it is for
    #: callers that time all of it (batched long-form); sequential mode times a prefix and sends None.
    alignment_frames: int | None = None
    priority: int = 0  # lower runs first among waiting requests (live sessions use -1)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise InvalidRequest("empty prompt")
        if not 0 <= self.sot_index < len(self.prompt):
            raise InvalidRequest("sot_index outside the prompt")
        if self.detect_language and self.language_index is None and self.options.max_new_tokens > 0:
            raise InvalidRequest("language detection before decoding needs language_index")
        if self.language_index is not None and not 0 <= self.language_index < len(self.prompt):
            raise InvalidRequest("language_index outside the prompt")
        if self.alignment_frames is not None and not 1 <= self.alignment_frames <= N_FRAMES // INPUT_STRIDE:
            raise InvalidRequest(f"alignment_frames must be 1..{N_FRAMES // INPUT_STRIDE}")


@dataclass(frozen=True)
class Alignment:
    """What word timing needs from the decoder, for tokens = alignment_prompt + text + [end-of-text].

    scores:      [heads, len(tokens), 1500] float16 scaled cross-attention scores q·k/√Dh (CPU), or None
                 when the engine reduced them to `matrix`
    matrix:      [len(text) + 1, frames] float32 (CPU): DTW's cost matrix, negated (engine/align.py), when
                 the request gave alignment_frames
    text_probs:  probability of each text token given the ones before it (softmax over text tokens only)
    text_tokens: the text tokens aligned (the result's tokens without timestamps)
    """

    scores: torch.Tensor | None
    text_probs: tuple[float, ...]
    text_tokens: tuple[int, ...]
    prompt_len: int
    matrix: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeResult:
    """The chosen sequence of one window."""

    tokens: tuple[int, ...]  # sampled tokens, without the prompt and without the final end-of-text
    sum_logprob: float
    avg_logprob: float  # sum_logprob / (len(tokens) + 1), as the reference
    no_speech_prob: float
    temperature: float
    finish_reason: FinishReason
    language_probs: dict[str, float] | None = None
    alignment: Alignment | None = None
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def language(self) -> str | None:
        if not self.language_probs:
            return None
        return max(self.language_probs, key=self.language_probs.__getitem__)
