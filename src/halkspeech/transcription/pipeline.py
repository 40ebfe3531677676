"""The one entry point above the engine: audio samples + options → Transcript, in the requested mode.

Callers (CLI, HTTP routes, WebSocket sessions) use `Transcriber.transcribe`; nothing above this layer builds
decode requests or touches tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import AudioDecodeError
from halkspeech.transcription.sequential import Progress, SequentialTranscription
from halkspeech.transcription.types import Segment, TranscribeOptions, Transcript

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
        if options.mode == "batched":
            from halkspeech.transcription.batched import BatchedTranscription

            return await BatchedTranscription(self.model, audio, options, progress, on_segment).run()
        return await SequentialTranscription(self.model, audio, options, progress, on_segment).run()
