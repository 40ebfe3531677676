"""One 30 s window through the engine, with the reference's temperature fallback: shared by the sequential
and the batched modes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.request import DecodeRequest, DecodeResult, SamplingOptions
from halkspeech.transcription.segments import compression_ratio
from halkspeech.transcription.types import TranscribeOptions

Progress = Callable[[float, float], None]  # (seconds done, seconds total)


@dataclass
class WindowResult:
    """One window's accepted decode, after temperature fallback."""

    result: DecodeResult
    text: str
    compression_ratio: float
    language: str | None = None  # set when this decode detected it
    language_probs: dict[str, float] | None = None


@dataclass
class StageTimer:
    """Engine milliseconds summed over a transcription's decodes (each attempt counts)."""

    queue: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0

    def add(self, result: DecodeResult) -> None:
        self.queue += result.queue_ms
        self.encoder += result.encode_ms
        self.decoder += result.decode_ms


Rejects = Callable[[WindowResult], bool]  # an extra guard: True sends the window to the next temperature


@dataclass
class WindowDecoder:
    """Builds a window's requests and applies the temperature-fallback guards."""

    model: ModelEngine
    options: TranscribeOptions
    timer: StageTimer = field(default_factory=StageTimer)

    def language(self) -> str | None:
        """The language to decode in (None: detect it): `Tokenizer.language` of the one asked for."""
        return self.model.tokenizer.language(self.options.language)

    def sampling(self, temperature: float, forced: int | None = None) -> SamplingOptions:
        """`forced`: decode exactly this many tokens (benchmarks); defaults to options.force_decode_tokens."""
        o, tokenizer = self.options, self.model.tokenizer
        greedy = temperature == 0
        forced = forced if forced is not None else o.force_decode_tokens
        limit = self.model.dims.n_text_ctx // 2  # the reference's sample_len
        return SamplingOptions(
            temperature=temperature,
            beam_size=o.beam_size if greedy else 1,
            patience=o.patience if greedy else 1.0,
            best_of=1 if greedy else o.best_of,
            length_penalty=o.length_penalty,
            max_new_tokens=forced if forced is not None else min(o.max_new_tokens or limit, limit),
            suppress_blank=o.suppress_blank,
            suppress_tokens=tokenizer.suppress_tokens(o.suppress_tokens) if o.suppress_tokens else (),
            timestamps=not o.without_timestamps,
            max_initial_timestamp_index=(round(o.max_initial_timestamp / 0.02) if o.max_initial_timestamp else None),
            force_length=forced is not None,
        )

    def largest_group(self) -> int:
        """Decoder slots the widest request of the fallback takes at once: beams at temperature 0, samples
        above (what the engine will be sent); the engine refuses a group larger than its max_group_size."""
        return max(self.sampling(t).group_size for t in self.options.temperatures)

    def alignment_prompt(self, language: str | None) -> tuple[int, ...] | None:
        """The tokens word timing aligns after (the reference's sot sequence + <|notimestamps|>), if wanted."""
        if not self.options.word_timestamps:
            return None
        return self.model.tokenizer.decoder_prompt(language or "en", self.options.task, timestamps=False)[0]

    async def detect_language(self, mel: torch.Tensor) -> tuple[str, dict[str, float] | None]:
        """Language of a window from <|startoftranscript|> alone (a detection-only request, no decoding)."""
        tokenizer = self.model.tokenizer
        if not tokenizer.multilingual:
            return "en", None
        prompt, sot_index = tokenizer.decoder_prompt(None, self.options.task, timestamps=False)
        request = DecodeRequest(
            mel,
            prompt,
            sot_index,
            SamplingOptions(max_new_tokens=0),
            detect_language=True,
            priority=self.options.priority,
        )
        result = await self.model.engine.decode(request)
        self.timer.add(result)
        return result.language or "en", result.language_probs

    async def decode(
        self,
        mel: torch.Tensor,
        language: str | None,
        previous: list[int],
        *,
        detect: bool = False,
        forced: int | None = None,
        rejects: Rejects | None = None,
        align_frames: int | None = None,
    ) -> WindowResult:
        """Decode a window at each temperature in turn until one passes the guards (and `rejects`).
        `align_frames` (encoder positions of audio): word timing's cost matrix is made on the device (see
        DecodeRequest.alignment_frames), for callers that time the whole text."""
        o, tokenizer = self.options, self.model.tokenizer
        prefix = tokenizer.encode(" " + o.prefix.strip()) if o.prefix else []
        previous = self.with_hotwords(previous) if o.hotwords and not prefix else previous
        probs = None
        if detect and o.word_timestamps and tokenizer.multilingual:
            # the alignment prompt names the language, so it must be known before the request is built
            language, probs = await self.detect_language(mel)
            detect = False
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
                options=self.sampling(temperature, forced),
                detect_language=detect,
                language_index=sot_index + 1 if detect else None,
                alignment_prompt=self.alignment_prompt(language),
                alignment_frames=align_frames if o.word_timestamps else None,
                priority=o.priority,
            )
            result = await self.model.engine.decode(request)
            self.timer.add(result)
            if detect and result.language is not None:
                language, probs, detect = result.language, result.language_probs, False
            text = tokenizer.decode(list(result.tokens)).strip()
            chosen = WindowResult(result, text, compression_ratio(text), language, probs)
            if forced is not None or o.force_decode_tokens:
                break  # benchmarks: one pass, whatever came out
            if not self._needs_fallback(chosen) and not (rejects is not None and rejects(chosen)):
                break
        assert chosen is not None
        return chosen

    def with_hotwords(self, previous: list[int]) -> list[int]:
        """The prompt's text part with the hotwords first: `hotwords… previous…`, within the n_text_ctx/2 - 1
        tokens a prompt may hold (hotwords keep at most that; the text so far, its latest tokens in the rest)."""
        room = self.model.dims.n_text_ctx // 2 - 1
        hot = self._hotword_tokens[:room]
        return hot + (previous[-(room - len(hot)) :] if room > len(hot) else [])

    @cached_property
    def _hotword_tokens(self) -> list[int]:
        """The hotwords' tokens, once per transcription: windows are decoded on the event loop, and tokenizing
        1 MB of hotwords took it 0.1-0.25 s, for every window of a long file."""
        return self.model.tokenizer.encode(" " + (self.options.hotwords or "").strip())

    def _needs_fallback(self, w: WindowResult) -> bool:
        o = self.options
        too_repetitive = (
            o.compression_ratio_threshold is not None and w.compression_ratio > o.compression_ratio_threshold
        )
        too_unlikely = o.logprob_threshold is not None and w.result.avg_logprob < o.logprob_threshold
        silence = o.no_speech_threshold is not None and w.result.no_speech_prob > o.no_speech_threshold and too_unlikely
        return (too_repetitive or too_unlikely) and not silence

    def is_silence(self, w: WindowResult) -> bool:
        """No-speech skip: likely silence, unless the text is confident anyway."""
        o = self.options
        if o.no_speech_threshold is None or w.result.no_speech_prob <= o.no_speech_threshold:
            return False
        return not (o.logprob_threshold is not None and w.result.avg_logprob > o.logprob_threshold)
