"""The one entry point above the engine: audio samples + options → Transcript, in the requested mode.

Callers (CLI, HTTP routes, WebSocket sessions) use `Transcriber.transcribe`; nothing above this layer builds
decode requests or touches tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import AudioDecodeError
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.transcription.sequential import Progress, SequentialTranscription
from halkspeech.transcription.types import Segment, Timings, TranscribeOptions, Transcript
from halkspeech.transcription.vad_filter import find_speech

SegmentListener = Callable[[Segment], None]


class Transcriber:
    """Transcribes with one loaded model; safe to share between concurrent callers."""

    def __init__(self, model: ModelEngine) -> None:
        self.model = model

    async def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        progress: Progress | None = None,
        on_segment: SegmentListener | None = None,
    ) -> Transcript:
        """Transcribe 16 kHz mono float32 samples. `on_segment` sees each segment as soon as it is final."""
        if audio.ndim != 1 or audio.size == 0:
            raise AudioDecodeError("the audio has no samples")
        if options.mode == "batched":  # it decodes only what the VAD hears anyway: vad_filter changes nothing
            from halkspeech.transcription.batched import BatchedTranscription

            return await BatchedTranscription(self.model, audio, options, progress, on_segment).run()
        if options.vad_filter:
            return await self._speech_only(audio, options, progress, on_segment)
        return await SequentialTranscription(self.model, audio, options, progress, on_segment).run()

    async def _speech_only(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        progress: Progress | None,
        on_segment: SegmentListener | None,
    ) -> Transcript:
        """vad_filter (vad_filter.py): the speech regions joined end to end, transcribed sequentially, every time
        (segments, words, listeners' segments, progress) mapped back onto the file's timeline."""
        started = time.perf_counter()
        duration = len(audio) / SAMPLE_RATE
        speech = await find_speech(audio, self.model.device)
        vad_ms = (time.perf_counter() - started) * 1000
        if not speech.spans:
            return self._nothing_heard(options, duration, vad_ms, progress)

        def report(done: float, total: float) -> None:  # joined seconds → the file's
            assert progress is not None
            progress(duration if done >= total else speech.time(done, end=True), duration)

        def listen(segment: Segment) -> None:
            assert on_segment is not None
            on_segment(speech.segment(segment))

        inner = SequentialTranscription(
            self.model,
            speech.join(audio),
            options,
            report if progress else None,
            listen if on_segment else None,
        )
        joined = await inner.run()
        return dataclasses.replace(
            joined,
            duration=duration,
            segments=tuple(speech.segment(s) for s in joined.segments),
            timings=dataclasses.replace(
                joined.timings, vad=joined.timings.vad + vad_ms, total=(time.perf_counter() - started) * 1000
            ),
        )

    def _nothing_heard(
        self, options: TranscribeOptions, duration: float, vad_ms: float, progress: Progress | None
    ) -> Transcript:
        """No speech anywhere: an empty transcript, as batched mode gives, in the language asked for (an
        English-only model's "en"); undetected, "en" (detecting it from silence would only guess)."""
        if progress:
            progress(duration, duration)
        language = self.model.tokenizer.language(options.language) or "en"
        return Transcript(
            text="", language=language, duration=duration, segments=(), timings=Timings(vad=vad_ms, total=vad_ms)
        )
