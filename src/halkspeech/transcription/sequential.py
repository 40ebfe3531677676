"""Sequential long-form transcription: seek through the audio one 30 s window at a time, each window
conditioned on the text before it (the reference implementation's `transcribe`, through the engine).

Windows of one file run one after another, but many files (and requests) run at once and share every
engine step; batched.py is the mode that also parallelises within a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from halkspeech.audio.features import log_mel_spectrogram, pad_or_trim
from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.request import DecodeRequest, DecodeResult, SamplingOptions
from halkspeech.model.dims import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from halkspeech.model.languages import normalize_language
from halkspeech.transcription.segments import RawSegment, compression_ratio, split_window
from halkspeech.transcription.types import Segment, Timings, TranscribeOptions, Transcript

Progress = Callable[[float, float], None]  # (seconds done, seconds total)


@dataclass
class WindowResult:
    """One window's accepted decode, after temperature fallback."""

    result: DecodeResult
    text: str
    compression_ratio: float


@dataclass
class _Timer:
    queue: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0

    def add(self, result: DecodeResult) -> None:
        self.queue += result.queue_ms
        self.encoder += result.encode_ms
        self.decoder += result.decode_ms


@dataclass
class WindowDecoder:
    """Builds a window's requests and applies the temperature-fallback guards (shared by both modes)."""

    model: ModelEngine
    options: TranscribeOptions
    timer: _Timer = field(default_factory=_Timer)

    def sampling(self, temperature: float) -> SamplingOptions:
        o, tokenizer = self.options, self.model.tokenizer
        greedy = temperature == 0
        forced = o.force_decode_tokens
        return SamplingOptions(
            temperature=temperature,
            beam_size=o.beam_size if greedy else 1,
            patience=o.patience if greedy else 1.0,
            best_of=1 if greedy else o.best_of,
            length_penalty=o.length_penalty,
            max_new_tokens=forced if forced else self.model.dims.n_text_ctx // 2,
            suppress_blank=o.suppress_blank,
            suppress_tokens=tokenizer.suppress_tokens(o.suppress_tokens) if o.suppress_tokens else (),
            timestamps=not o.without_timestamps,
            max_initial_timestamp_index=(
                round(o.max_initial_timestamp / 0.02) if o.max_initial_timestamp else None
            ),
            force_length=forced is not None,
        )

    async def decode(
        self, mel: torch.Tensor, language: str | None, previous: list[int], *, detect: bool = False
    ) -> WindowResult:
        """Decode a window at each temperature in turn until one passes the guards."""
        o, tokenizer = self.options, self.model.tokenizer
        prefix = tokenizer.encode(" " + o.prefix.strip()) if o.prefix else []
        chosen: WindowResult | None = None
        for temperature in o.temperatures:
            prompt, sot_index = tokenizer.decoder_prompt(
                language or "en",
                o.task,
                timestamps=not o.without_timestamps,
                previous=previous,
                prefix=prefix,
                n_text_ctx=self.model.dims.n_text_ctx,
            )
            request = DecodeRequest(
                features=mel,
                prompt=prompt,
                sot_index=sot_index,
                options=self.sampling(temperature),
                detect_language=detect,
                language_index=sot_index + 1 if detect else None,
            )
            result = await self.model.engine.decode(request)
            self.timer.add(result)
            if detect and result.language is not None:
                language, detect = result.language, False
            text = tokenizer.decode(list(result.tokens)).strip()
            chosen = WindowResult(result, text, compression_ratio(text))
            if not self._needs_fallback(chosen):
                break
        assert chosen is not None
        return chosen

    def _needs_fallback(self, w: WindowResult) -> bool:
        o = self.options
        if o.force_decode_tokens:
            return False
        too_repetitive = (
            o.compression_ratio_threshold is not None and w.compression_ratio > o.compression_ratio_threshold
        )
        too_unlikely = o.logprob_threshold is not None and w.result.avg_logprob < o.logprob_threshold
        silence = (
            o.no_speech_threshold is not None
            and w.result.no_speech_prob > o.no_speech_threshold
            and too_unlikely
        )
        return (too_repetitive or too_unlikely) and not silence

    def is_silence(self, w: WindowResult) -> bool:
        """No-speech skip: likely silence, unless the text is confident anyway."""
        o = self.options
        if o.no_speech_threshold is None or w.result.no_speech_prob <= o.no_speech_threshold:
            return False
        return not (o.logprob_threshold is not None and w.result.avg_logprob > o.logprob_threshold)


class SequentialTranscription:
    """The seek loop over one file."""

    def __init__(
        self,
        model: ModelEngine,
        audio: np.ndarray,
        options: TranscribeOptions,
        progress: Progress | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.progress = progress
        self.on_segment = on_segment
        self.decoder = WindowDecoder(model, options)
        self.tokenizer = model.tokenizer
        # Whole-file log-mel with 30 s of silence appended, normalised over the whole file (as the reference).
        self.mel = log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES, device=model.device)
        self.content_frames = self.mel.shape[-1] - N_FRAMES
        self.duration = self.content_frames * HOP_LENGTH / SAMPLE_RATE
        self.language = normalize_language(options.language, self.tokenizer.num_languages)
        if not self.tokenizer.multilingual:
            self.language = "en"

    def _window(self, seek: int) -> tuple[torch.Tensor, int]:
        size = min(N_FRAMES, self.content_frames - seek)
        return pad_or_trim(self.mel[:, seek : seek + size], N_FRAMES), size

    async def run(self) -> Transcript:
        started = time.perf_counter()
        o, tok = self.options, self.tokenizer
        initial = tok.encode(" " + o.initial_prompt.strip()) if o.initial_prompt else []
        all_tokens: list[int] = list(initial)
        segments: list[Segment] = []
        prompt_reset = 0
        language_probs = None
        seek = 0
        while seek < self.content_frames:
            mel, size = self._window(seek)
            detect = self.language is None
            window = await self.decoder.decode(mel, self.language, all_tokens[prompt_reset:], detect=detect)
            if detect:
                language_probs = window.result.language_probs
                self.language = window.result.language or "en"
            previous_seek = seek
            if self.decoder.is_silence(window):
                seek += size
            else:
                time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
                raw, advance = split_window(
                    window.result.tokens,
                    timestamp_begin=tok.timestamp_begin,
                    time_offset=time_offset,
                    segment_frames=size,
                )
                seek += advance
                for piece in raw:
                    segment = self._segment(len(segments), previous_seek, piece, window)
                    segments.append(segment)
                    all_tokens.extend(segment.tokens)
                    if self.on_segment and segment.text:
                        self.on_segment(segment)
                if not o.condition_on_previous_text or window.result.temperature > 0.5:
                    prompt_reset = len(all_tokens)
            if self.progress:
                self.progress(min(seek, self.content_frames) * HOP_LENGTH / SAMPLE_RATE, self.duration)
        return self._transcript(segments, all_tokens[len(initial) :], language_probs, started)

    def _segment(self, index: int, seek: int, raw: RawSegment, window: WindowResult) -> Segment:
        text_tokens = [t for t in raw.tokens if t < self.tokenizer.eot]
        text = self.tokenizer.decode(text_tokens)
        empty = raw.start == raw.end or not text.strip()
        return Segment(
            id=index,
            seek=seek,
            start=raw.start,
            end=raw.end,
            text="" if empty else text,
            tokens=() if empty else raw.tokens,
            temperature=window.result.temperature,
            avg_logprob=window.result.avg_logprob,
            compression_ratio=window.compression_ratio,
            no_speech_prob=window.result.no_speech_prob,
        )

    def _transcript(
        self,
        segments: list[Segment],
        tokens: list[int],
        language_probs: dict[str, float] | None,
        started: float,
    ) -> Transcript:
        t = self.decoder.timer
        return Transcript(
            text=self.tokenizer.decode(tokens),
            language=self.language or "en",
            duration=self.duration,
            segments=tuple(s for s in segments if s.text),
            language_probs=language_probs,
            timings=Timings(t.queue, t.encoder, t.decoder, (time.perf_counter() - started) * 1000),
            tokens=tuple(tokens),
        )
