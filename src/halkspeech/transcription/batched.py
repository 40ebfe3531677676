"""Batched long-form transcription: voice activity detection cuts the file into chunks of at most 30 s at
pauses, and every chunk goes to the engine at once, so one long file fills many decoder slots and finishes
in about the time of its slowest chunk (faster-whisper's BatchedInferencePipeline, through the shared engine).

Chunks are decoded without the previous text (it is not known yet; an initial prompt conditions every chunk),
each with its own temperature fallback, no-speech skip and per-segment repetition guard. When the model stops
at an unfinished segment with speech left in the chunk, the rest is decoded again from there (as the seek loop
does); so is speech the VAD heard after a pause that a segment's time span swallowed (swallowed.py) or that
came after the window's last segment. Segments come back in order with absolute times, monotonic and inside
the chunk.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from halkspeech.audio.features import log_mel_windows
from halkspeech.audio.vad import SpeechDetector, VadOptions
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import Overloaded
from halkspeech.model.dims import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    INPUT_STRIDE,
    N_SAMPLES,
    SAMPLE_RATE,
    TIME_PRECISION,
)
from halkspeech.transcription.alignment import TimedSpan
from halkspeech.transcription.chunking import Chunk, make_chunks
from halkspeech.transcription.guards import is_repetitive
from halkspeech.transcription.segments import RawSegment, split_window
from halkspeech.transcription.stitching import Stitcher
from halkspeech.transcription.swallowed import (
    UNHEARD_MIN_S,
    Heard,
    cut_at_pause,
    find_suspect,
    hear,
    heard_anew,
    unheard,
)
from halkspeech.transcription.types import Segment, Timings, TranscribeOptions, Transcript, Word
from halkspeech.transcription.window import Progress, WindowDecoder, WindowResult
from halkspeech.transcription.word_workers import WindowWords, time_window_words, word_executor

MEL_BATCH = 32  # chunks per log-mel call: bounds the STFT's memory (~150 MB of complex64 per 32 chunks)
RETRY_S = 0.02  # wait before resubmitting a chunk the full engine queue refused
MAX_ROUNDS = 4  # windows per chunk at most: the first, then resumed after unfinished segments


@dataclass
class _Stages:
    """Wall milliseconds per stage (Timings' batched-mode fields)."""

    vad: float = 0.0
    features: float = 0.0
    engine: float = 0.0
    words: float = 0.0
    stitch: float = 0.0


class BatchedTranscription:
    """One file: VAD → chunks → all chunks through the engine together → segments in order."""

    def __init__(
        self,
        model: ModelEngine,
        audio: np.ndarray,
        options: TranscribeOptions,
        progress: Progress | None = None,
        on_segment: Callable[[Segment], None] | None = None,
        *,
        vad: VadOptions = VadOptions(),
        detector: SpeechDetector | None = None,
    ) -> None:
        self.model = model
        self.audio = audio
        self.options = options
        self.progress = progress
        self.on_segment = on_segment
        self.vad = vad
        self.detector = detector or SpeechDetector()  # cheap: the network is loaded once per device
        self.decoder = WindowDecoder(model, options)
        self.tokenizer = model.tokenizer
        self.duration = len(audio) / SAMPLE_RATE
        self.language = self.decoder.language()
        self.language_probs: dict[str, float] | None = None
        # every chunk sees the initial prompt (the text before it is not known yet)
        prompt = options.initial_prompt
        self.previous = self.tokenizer.encode_prompt(prompt) if prompt else []
        self.stages = _Stages()
        # chunks of one file in flight at once: a long file must not fill the whole engine queue by itself
        self.max_in_flight = max(1, model.engine.scheduler.max_queue // 4)
        self.in_flight = 0
        # the VAD's probabilities and speech regions (set by _chunks)
        self.heard = Heard(np.zeros(0, dtype=np.float32), [], self.vad.threshold, self.vad.pad_s)
        self.device_audio: torch.Tensor | None = None
        self.chunks: list[Chunk] = []  # set by run(), for callers that report on them

    async def run(self) -> Transcript:
        started = time.perf_counter()
        if self.options.word_timestamps:  # its workers start now, while VAD and the decoding run
            word_executor(self.model.word_processes)
        self.chunks = chunks = await self._chunks()
        mels = await self._features(chunks)
        if chunks and self.language is None:
            self.language, self.language_probs = await self.decoder.detect_language(mels[0])
        stitcher = Stitcher(self._shares(chunks), self.duration, self.progress, self.on_segment)
        gate = asyncio.Semaphore(self.max_in_flight)
        engine_started = time.perf_counter()
        async with asyncio.TaskGroup() as group:  # one failure cancels the other chunks (and their engine work)
            for chunk, mel in zip(chunks, mels, strict=True):
                previous_end = chunks[chunk.index - 1].end if chunk.index else 0.0
                group.create_task(self._run_chunk(chunk, mel, previous_end, gate, stitcher))
        self.device_audio = None
        self.stages.engine = (time.perf_counter() - engine_started) * 1000
        if not chunks and self.progress:
            self.progress(self.duration, self.duration)  # nothing but silence: done at once
        return self._transcript(stitcher, started)

    # --- stages ----------------------------------------------------------------------------------------
    async def _chunks(self) -> list[Chunk]:
        """Speech probabilities on the model's device (in a worker thread: the event loop stays free)."""
        started = time.perf_counter()
        self.heard = await asyncio.to_thread(hear, self.audio, self.model.device, self.vad, self.detector)
        self.stages.vad = (time.perf_counter() - started) * 1000
        return make_chunks(self.heard.regions, self.heard.probs)

    async def _features(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        started = time.perf_counter()
        mels = await asyncio.to_thread(self._log_mel, [(c.start, c.end) for c in chunks])
        self.stages.features = (time.perf_counter() - started) * 1000
        return mels

    @torch.inference_mode()
    def _log_mel(self, spans: list[tuple[float, float]]) -> list[torch.Tensor]:
        """Each span's samples zero-padded to 30 s → log-mel [n_mels, 3000] normalised per window, computed
        MEL_BATCH spans at a time on the model's device."""
        if not spans:
            return []
        if self.device_audio is None:
            samples = np.ascontiguousarray(self.audio, dtype=np.float32)
            self.device_audio = torch.from_numpy(samples).to(self.model.device)
        out: list[torch.Tensor] = []
        for first in range(0, len(spans), MEL_BATCH):
            rows = []
            for start, end in spans[first : first + MEL_BATCH]:
                piece = self.device_audio[_sample(start) : _sample(end)][:N_SAMPLES]
                rows.append(F.pad(piece, (0, N_SAMPLES - piece.numel())))
            out.extend(log_mel_windows(torch.stack(rows), self.model.dims.n_mels).unbind(0))  # [B, n_mels, 3000]
        if self.device_audio.is_cuda:  # the stage's time is its kernels' (this worker thread waits, not the loop)
            torch.cuda.current_stream(self.device_audio.device).synchronize()
        return out

    def _shares(self, chunks: list[Chunk]) -> list[float]:
        """Chunk i accounts for the file from the previous chunk's end to its own (the last one to the end)."""
        if not chunks:
            return []
        ends = [c.end for c in chunks[:-1]] + [self.duration]
        return [end - (chunks[i - 1].end if i else 0.0) for i, end in enumerate(ends)]

    # --- one chunk -------------------------------------------------------------------------------------
    async def _run_chunk(
        self,
        chunk: Chunk,
        mel: torch.Tensor,
        previous_end: float,
        gate: asyncio.Semaphore,
        stitcher: Stitcher,
    ) -> None:
        """Decode the chunk; when the model stops at an unfinished segment (a timestamp pair, then nothing)
        with speech left after it, decode the rest of the chunk again from there, as the seek loop would; and
        likewise when a segment's span swallowed a pause and the speech after it (`_swallowed`), or the model
        ended the window early, before speech the VAD heard (`_unheard`)."""
        segments: list[Segment] = []
        start, last_speech = chunk.start, previous_end
        probe: WindowResult | None = None  # the next window, when `_swallowed` already decoded it
        for round_ in range(MAX_ROUNDS):
            if probe is None:
                async with gate:
                    window = await self._decode(chunk, mel, start)
            else:
                window, probe = probe, None
            forced = bool(self.options.force_tokens_per_second)
            if self.decoder.is_silence(window) and not forced:
                break  # the no-speech skip
            raw, resume = self._split(window, start, chunk.end, final=forced or round_ == MAX_ROUNDS - 1)
            if resume is not None and not self._has_speech(resume, chunk.end):
                raw, resume = self._split(window, start, chunk.end, final=True)
            if not forced and round_ < MAX_ROUNDS - 1:
                cut = await self._swallowed(chunk, raw, gate)
                if cut is not None:
                    raw, resume, probe = cut
                elif resume is None:
                    resume = self._unheard(raw, chunk.end)
            timed = await self._time_words(chunk, raw, window, start, last_speech)
            fresh = self._segments(chunk, raw, window, timed)
            segments.extend(fresh)
            last_speech = fresh[-1].end if fresh else last_speech
            if resume is None:
                break
            start = resume
            if probe is None:
                mel = (await asyncio.to_thread(self._log_mel, [(start, chunk.end)]))[0]
        stitcher.finish(chunk.index, segments)

    async def _decode(self, chunk: Chunk, mel: torch.Tensor, start: float) -> WindowResult:
        """The window from `start` to the chunk's end through the window decoder (fallback, repetition
        guard). A full engine queue is waited out while other chunks of this file are in flight (they free
        room); with none, Overloaded stands."""
        rate = self.options.force_tokens_per_second
        limit = self.model.dims.n_text_ctx // 2
        forced = max(1, min(limit, math.ceil(chunk.speech * rate))) if rate else None

        def rejects(w: WindowResult) -> bool:
            raw, _ = self._split(w, 0.0, N_SAMPLES / SAMPLE_RATE, final=True)
            return bool(self._looping(raw))

        while True:
            self.in_flight += 1
            try:
                return await self.decoder.decode(
                    mel,
                    self.language,
                    self.previous,
                    forced=forced,
                    rejects=rejects,
                    align_frames=max(1, self._frames(start, chunk.end) // INPUT_STRIDE),
                )
            except Overloaded:
                if self.in_flight <= 1:
                    raise
            finally:
                self.in_flight -= 1
            await asyncio.sleep(RETRY_S)

    def _split(
        self, window: WindowResult, start: float, end: float, *, final: bool
    ) -> tuple[list[RawSegment], float | None]:
        """A window's tokens cut at timestamp pairs (absolute times), and where to resume when the last
        segment is unfinished (None: the window is done). A final window keeps an unfinished segment whole."""
        tokens, tb = window.result.tokens, self.tokenizer.timestamp_begin
        frames = self._frames(start, end)
        raw, advance = split_window(tokens, timestamp_begin=tb, time_offset=start, segment_frames=frames)
        if advance >= frames or not tokens:
            return raw, None
        if not final and advance > 0:
            return raw, start + advance / FRAMES_PER_SECOND
        rest = tokens[sum(len(r.tokens) for r in raw) :]
        if any(t < tb for t in rest):
            begin = start + (rest[0] - tb) * TIME_PRECISION if rest[0] >= tb else (raw[-1].end if raw else start)
            raw.append(RawSegment(begin, end, rest))
        return raw, None

    @staticmethod
    def _frames(start: float, end: float) -> int:
        """Mel frames of audio in a window from `start` to `end` (seconds; at most a whole window)."""
        return min(N_SAMPLES, _sample(end) - _sample(start)) // HOP_LENGTH

    def _has_speech(self, start: float, end: float, at_least_s: float = 0.1) -> bool:
        """Whether the VAD heard speech in [start, end) (at least `at_least_s` of it)."""
        return self.heard.has_speech(start, end, at_least_s)

    async def _swallowed(
        self, chunk: Chunk, raw: list[RawSegment], gate: asyncio.Semaphore
    ) -> tuple[list[RawSegment], float, WindowResult] | None:
        """When a segment's span holds a pause and then speech the VAD heard, and a probe window decoded from
        that speech finds words the window did not say (swallowed.py): the segments up to that one, ending at
        the pause; where to resume; and the probe, which is the next window. None: nothing swallowed."""
        regions = self.heard.regions_in(chunk.start, chunk.end)
        suspect = find_suspect(raw, regions, self._has_speech, UNHEARD_MIN_S)
        if suspect is None:
            return None
        mel = (await asyncio.to_thread(self._log_mel, [(suspect.resume, chunk.end)]))[0]
        async with gate:
            probe = await self._decode(chunk, mel, suspect.resume)
        if self.decoder.is_silence(probe):
            return None
        # the words the window gave the audio the probe decodes again (the suspect's and those after it, up to
        # the window's last segment's end) against the probe's words for that audio
        tail = raw[suspect.index :]
        heard, _ = self._split(probe, suspect.resume, chunk.end, final=True)
        said = "".join(r.text(self.tokenizer) for r in tail)
        probed = "".join(r.text(self.tokenizer) for r in heard if r.start < tail[-1].end)
        if not heard_anew(self.tokenizer, said, probed):
            return None
        return cut_at_pause(raw, suspect), suspect.resume, probe

    def _unheard(self, raw: list[RawSegment], end: float) -> float | None:
        """Where to decode a finished window again when the VAD heard over a second of speech after its last
        segment (swallowed.unheard). None: no such speech, or no segment."""
        return unheard(self.heard, raw[-1].end, end) if raw else None

    def _looping(self, raw: list[RawSegment]) -> set[int]:
        """Indexes of the segments caught by the repetition guard."""
        if self.options.force_tokens_per_second or self.options.force_decode_tokens:
            return set()
        return {i for i, r in enumerate(raw) if is_repetitive(self.tokenizer.decode(list(r.tokens)))}

    async def _time_words(
        self, chunk: Chunk, raw: list[RawSegment], window: WindowResult, start: float, last_speech: float
    ) -> list[TimedSpan] | None:
        """The raw segments' times and words (None: no word timing asked or possible), by the word-timing
        workers (word_workers.py): off the event loop, and on a GPU out of the engine's process."""
        alignment = window.result.alignment
        if not (self.options.word_timestamps and alignment is not None and raw):
            return None
        eot = self.tokenizer.eot
        job = WindowWords.of(
            alignment,
            self.tokenizer,
            self.language,
            [(r.start, r.end, sum(t < eot for t in r.tokens)) for r in raw],
            num_frames=self._frames(start, chunk.end),
            time_offset=start,
            last_speech=last_speech,
        )
        timed, words_ms = await time_window_words(job, self.model.word_processes)
        self.stages.words += words_ms
        return timed

    def _segments(
        self, chunk: Chunk, raw: list[RawSegment], window: WindowResult, timed: list[TimedSpan] | None
    ) -> list[Segment]:
        """Raw segments of one window → Segments (with words when `timed`), clamped into the chunk."""
        looping = self._looping(raw)
        out = []
        for i, piece in enumerate(raw):
            text = piece.text(self.tokenizer)
            times = (timed[i].start, timed[i].end) if timed else (piece.start, piece.end)
            if i in looping or not text.strip() or times[0] >= min(chunk.end, self.duration):
                continue  # a repetition loop that survived every temperature; text over the padding past the chunk
            out.append(self._segment(chunk, piece, window, text, times, timed[i].words if timed else None))
        return out

    def _segment(
        self,
        chunk: Chunk,
        piece: RawSegment,
        window: WindowResult,
        text: str,
        times: tuple[float, float],
        words: tuple[Word, ...] | None,
    ) -> Segment:
        """Times clamped into the chunk (a timestamp in the padding past its end means its end)."""
        lo, hi = chunk.start, min(chunk.end, self.duration)
        start = min(max(times[0], lo), hi)
        end = min(max(times[1], start), hi)
        if words is not None:
            words = tuple(w.clamped(lo, hi) for w in words)
        return Segment(
            id=0,
            seek=round(chunk.start * FRAMES_PER_SECOND),
            start=round(start, 3),
            end=round(end, 3),
            text=text,
            tokens=piece.tokens,
            temperature=window.result.temperature,
            avg_logprob=window.result.avg_logprob,
            compression_ratio=window.compression_ratio,
            no_speech_prob=window.result.no_speech_prob,
            words=words,
        )

    # --- the whole file --------------------------------------------------------------------------------
    def _transcript(self, stitcher: Stitcher, started: float) -> Transcript:
        stitch_started = time.perf_counter()
        assert stitcher.complete
        segments = stitcher.segments
        tokens = [t for s in segments for t in s.tokens]
        t, st = self.decoder.timer, self.stages
        st.stitch = (time.perf_counter() - stitch_started) * 1000
        return Transcript(
            text=self.tokenizer.decode(tokens),
            language=self.language or "en",
            duration=self.duration,
            segments=tuple(segments),
            language_probs=self.language_probs,
            timings=Timings(
                t.queue,
                t.encoder,
                t.decoder,
                (time.perf_counter() - started) * 1000,
                vad=st.vad,
                features=st.features,
                engine=st.engine,
                words=st.words,
                stitch=st.stitch,
            ),
            tokens=tuple(tokens),
        )


def _sample(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)
