"""Live speech: push-to-talk turns streamed as 16-bit PCM, with partial results and pause segmentation.

A `LiveSession` is one client connection: turns one after another (the next may start while the last one's
final is computed). A `LiveTurn` is one press of the key:

    start ─▶ feed(pcm) … ─▶ end ─▶ Final       (Partial and SegmentReady events may come in between)

It buffers the audio (int16, 16 kHz, at most `max_turn_s`), feeds the streaming VAD when segments or VAD
gating are asked for, re-transcribes the growing audio for partials (greedy, one in flight,
cancelled at `end` so it never delays the final), transcribes each segment as soon as its pause is heard,
and at `end` transcribes only what is left. Finals and segments run at engine priority -1 (before file work,
without the admission wait). Events go out through an async `emit`; nothing here knows about WebSockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import numpy as np

from halkspeech.audio.streaming import FRAME, PCMStream, StreamingVAD, VADStream, pcm16_to_float
from halkspeech.audio.vad import vad_gain
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import AudioTooLong, HalkSpeechError, InvalidRequest, Overloaded
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.transcription.live import (
    Final,
    LiveEvent,
    Partial,
    Piece,
    Segmenter,
    SegmentReady,
    SpeechStarted,
    SpeechStopped,
    StablePrefix,
    StreamError,
    StreamLimits,
    StreamOptions,
    TurnBuffer,
    TurnStarted,
    VadEvent,
)
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import Timings, TranscribeOptions, Transcript

log = logging.getLogger(__name__)

Emit = Callable[[LiveEvent], Awaitable[None]]
#: Model name (None: the default) → the engine, held (never unloaded) until the context exits.
ModelSource = Callable[[str | None], AbstractAsyncContextManager[ModelEngine]]
#: Refuses (InvalidRequest) what a model cannot do with a turn's options, before the turn opens. The server
#: passes the same check its file requests use (api.jobs.check_options), so both paths refuse alike.
OptionsCheck = Callable[[ModelEngine, TranscribeOptions], None]

FINAL_PRIORITY = -1  # finals and segments: ahead of file work, admitted without waiting for a batch

# Without a `language`, partials keep the first one a partial detected from at least this much of the turn's
# audio with at least this probability, instead of detecting it again each time: detection is one more encoder
# pass and engine round trip, 1.6× a 6 s partial's time with base on the CPU, and the language no longer flips
# between partials. Shorter audio misled base with confidence (1.0 s of Italian: "en" at 0.83; 1.5 s of
# Spanish: "ar" at 0.81); from 3 s, 13 of 13 dev clips in 8 languages were right at 0.91 or more. Segments and
# finals still detect from their own audio, as file transcription does.
PIN_LANGUAGE_S = 3.0
PIN_LANGUAGE_PROBABILITY = 0.9
PARTIAL_PRIORITY = 0  # partials: like file work, so they never queue ahead of anyone's final
LIVE_VAD_MAX_GAIN = 10.0  # +20 dB at most for a quiet microphone: -50 dBFS speech reaches -30, which silero hears
# A message longer than this is resampled and cut into VAD frames on a worker thread. libswresample takes ~0.5 ms
# a second of 24 kHz audio on one core, so a 15 MiB realtime append (11 MiB of PCM, 4 minutes) held the event
# loop, and every other live connection, for 0.1-0.2 s (with the VAD's share). 256 KiB is 5.5 s at 24 kHz
# (~3 ms), and a thread hand-off ~0.1 ms.
OFF_LOOP_BYTES = 256 * 1024


class NoTurn(InvalidRequest):
    """Audio or `end` arrived while no turn is open."""

    code = "no_turn"


class TurnActive(InvalidRequest):
    """`start` arrived while a turn is open."""

    code = "turn_active"


def _transcribe_options(
    language: str | None, options: StreamOptions, limits: StreamLimits
) -> tuple[TranscribeOptions, TranscribeOptions]:
    """(finals and segments: the file defaults; partials: greedy, one temperature, with timestamps as the final,
    so that a window goes on after a pause: decoded without them, tiny.en ended a partial at the first pause
    in 24 s of speech and never showed the 10 s after it)."""
    forced = limits.force_decode_tokens
    final = TranscribeOptions(
        language=language,
        task=options.task,
        priority=FINAL_PRIORITY,
        force_decode_tokens=forced,
        without_timestamps=forced is not None,  # benchmarks: as the server's file requests then do
        hotwords=options.hotwords,
        initial_prompt=options.prompt,
    )
    partial = TranscribeOptions(
        language=language,
        task=options.task,
        temperatures=(0.0,),
        without_timestamps=forced is not None,
        condition_on_previous_text=False,
        priority=PARTIAL_PRIORITY,
        force_decode_tokens=forced,
        hotwords=options.hotwords,
        initial_prompt=options.prompt,
    )
    return final, partial


class LiveTurn:
    """One push-to-talk turn: audio in, events out. Await `feed` from the event loop (one message at a time), then
    `finish` once."""

    def __init__(
        self,
        turn: int,
        model: ModelEngine,
        options: StreamOptions,
        limits: StreamLimits,
        emit: Emit,
        vad: StreamingVAD | None = None,
        hold: contextlib.AsyncExitStack | None = None,
    ) -> None:
        language = model.tokenizer.language(options.language)  # as over HTTP: English-only models take any
        if options.uses_vad and vad is None:
            raise InvalidRequest("this server has no VAD for segments or VAD gating")
        self.turn, self.model, self.options, self.limits, self.emit = turn, model, options, limits, emit
        self.started = time.monotonic()
        self._hold = hold or contextlib.AsyncExitStack()  # releases the model when the turn is over
        self.transcriber = Transcriber(model)
        self.pcm = PCMStream(options.sample_rate)
        self.buffer = TurnBuffer(int(limits.max_turn_s * SAMPLE_RATE))
        self._final_options, self._partial_options = _transcribe_options(language, options, limits)
        # Where the piece being spoken starts (None: waiting for speech) and where the last segment ended.
        self.piece_start: int | None = None if options.uses_vad else 0
        self.last_cut = 0
        self._voiced_from = 0  # the VAD's speech start of the piece being spoken (piece_start less the preroll)
        self._min_speech = int(limits.min_speech_s * SAMPLE_RATE)
        self.pieces: list[asyncio.Task[Piece]] = []  # segments cut at pauses, in order
        self._rest: asyncio.Task[Piece] | None = None  # at the end: the audio after the last segment
        self._partial: asyncio.Task[None] | None = None
        self._partial_mark = 0  # buffer size when the last partial started
        self._stable = StablePrefix()
        self._generation = 0  # bumped at each cut: partials of an earlier piece are dropped
        self._finishing = False
        self._cancelled = False
        self._pushing: asyncio.Future[None] | None = None  # the last message converted on a worker thread
        self._drop_rest = False  # finish(drop_rest=True): the audio after the last segment is not transcribed
        self._vad = vad
        self._vad_state = VADStream()
        self._vad_tail = np.zeros(0, dtype=np.float32)  # samples short of a whole VAD frame
        self._vad_peaks = (0.0, 0.0)  # the two loudest 32 ms frames' peaks the VAD has had from this turn
        self._vad_queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        silence = options.segment_silence_ms
        pause_frames = None if silence is None else max(1, round(silence * SAMPLE_RATE / 1000 / FRAME))
        self.segmenter = Segmenter.at(pause_frames, options.vad_threshold)
        preroll_s = limits.preroll_s if options.preroll_ms is None else options.preroll_ms / 1000
        self._preroll = int(preroll_s * SAMPLE_RATE)
        self._hangover = int(min(limits.hangover_s, (silence or 1e9) / 2000) * SAMPLE_RATE)
        self._vad_task = asyncio.create_task(self._run_vad()) if options.uses_vad else None

    @property
    def duration(self) -> float:
        """Seconds of audio fed, with what the resampler has yet to give out (PCMStream.held)."""
        return (self.buffer.size + self.pcm.held) / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        """A piece is being spoken: with the VAD on, speech started and no pause has cut it yet."""
        return self.piece_start is not None

    @property
    def piece(self) -> int:
        """The index of the piece being spoken, or of the next one: how many segments were cut so far."""
        return self._generation

    @property
    def uncut_s(self) -> float:
        """Seconds of the turn's audio after the last segment cut, with what the resampler has yet to give out
        (up to RESAMPLE_BLOCK_S, and its filter's delay: 100 ms of 24 kHz audio is 100 ms, not 99)."""
        return self.duration - self.last_cut / SAMPLE_RATE

    # --- audio in --------------------------------------------------------------------------------------
    async def feed(self, data: bytes) -> None:
        """One message of 16-bit PCM. Raises AudioDecodeError (odd length: the message is refused whole) or
        AudioTooLong (the turn is full; what fitted was kept). Over OFF_LOOP_BYTES, the resampling and the
        VAD's share run on a worker thread."""
        if len(data) <= OFF_LOOP_BYTES:
            self._take(*self._convert(data))
            return
        # The worker owns the resampler and the VAD's tail and peaks until it returns: the final waits for it
        # (`_final`). Shielded, so that a reader cancelled meanwhile (the client left, the server stops) loses
        # none of the message's audio.
        self._pushing = asyncio.ensure_future(self._convert_off_loop(data))
        await asyncio.shield(self._pushing)

    async def _convert_off_loop(self, data: bytes) -> None:
        converted = await asyncio.to_thread(self._convert, data)
        if not self._cancelled:
            self._take(*converted)

    def _convert(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """PCM bytes → (int16 samples at 16 kHz [n], the VAD's frames of those that fit the turn [f, FRAME] or
        None). Touches only the resampler and the VAD's tail and peaks: the buffer does not change meanwhile
        (feeds come one at a time, and the final waits for this one)."""
        samples = self.pcm.push(data)
        return samples, self._vad_frames(samples[: self.buffer.limit - self.buffer.size])

    def _take(self, samples: np.ndarray, vad_frames: np.ndarray | None) -> None:
        """On the event loop: the samples into the buffer, their frames to the VAD, and a partial if one is due."""
        taken = self.buffer.append(samples)
        if vad_frames is not None:
            self._vad_queue.put_nowait(vad_frames)
        if self.options.partials:
            self._maybe_partial()
        if taken < len(samples):
            raise AudioTooLong(f"the turn reached the limit of {self.limits.max_turn_s:g} s of audio; it was ended")

    def _vad_frames(self, samples: np.ndarray) -> np.ndarray | None:
        """The whole 32 ms frames the VAD can hear now, gained [f, FRAME] float32; None without a VAD or a frame."""
        if self._vad_task is None or samples.size == 0:
            return None
        pending = np.concatenate([self._vad_tail, pcm16_to_float(samples)])
        whole = len(pending) // FRAME * FRAME
        self._vad_tail = pending[whole:]
        if not whole:
            return None
        # A quiet microphone raised for the VAD by the gain of the loudest audio so far (at most +20 dB: it is
        # set before the speech comes, and the background must stay below what silero calls speech), the
        # loudest frame but one: a click or a bump early in the turn kept quiet speech after it unraised.
        frames = pending[:whole].reshape(-1, FRAME)
        self._vad_peaks = _two_loudest(self._vad_peaks, np.abs(frames).max(axis=1))
        return frames * np.float32(self._vad_gain())

    def _vad_gain(self) -> float:
        return vad_gain(self._vad_peaks[1], LIVE_VAD_MAX_GAIN)  # the second-loudest frame's peak

    async def _run_vad(self) -> None:
        assert self._vad is not None
        while (frames := await self._vad_queue.get()) is not None:
            try:
                probs = await self._vad.probabilities(self._vad_state, frames)
                for event in self.segmenter.push(probs):
                    await self._on_vad(event)
            finally:
                self._vad_queue.task_done()  # heard_all() waits for every put to be done

    async def heard_all(self) -> None:
        """Wait until the VAD has heard every whole frame fed so far, so that in_speech is up to date (it lags
        the audio by the VAD's queue: a client sending faster than real time is ahead of it)."""
        if self._vad_task is None or self._vad_task.done():
            return
        heard = asyncio.ensure_future(self._vad_queue.join())
        await asyncio.wait([heard, self._vad_task], return_when=asyncio.FIRST_COMPLETED)  # not if the VAD died
        heard.cancel()

    async def _on_vad(self, event: VadEvent) -> None:
        """A speech start opens a piece; a pause cuts it and starts its transcription. The state changes before
        the speech events are emitted (feed() may run meanwhile), and a cut piece's task is made after its
        SpeechStopped is out, so SpeechStopped always precedes its SegmentReady."""
        announce = self.options.speech_events
        if event.kind == "speech":
            if self.piece_start is None:
                self.piece_start = max(self.last_cut, event.sample - self._preroll)
                self._voiced_from = event.sample
                self._partial_mark = self.piece_start
                if announce:
                    await self.emit(SpeechStarted(self.turn, self._generation, self.piece_start / SAMPLE_RATE))
            return
        if self.options.segment_silence_ms is None or self.piece_start is None or self._finishing:
            return
        cut = min(self.buffer.size, event.sample + self._hangover)
        index, start = self._generation, self.piece_start
        self.piece_start, self.last_cut = None, cut
        self._new_piece()
        if announce:
            await self.emit(SpeechStopped(self.turn, index, cut / SAMPLE_RATE))
        previous = self.pieces[-1] if self.pieces else None
        heard = self._heard(event.sample)
        self.pieces.append(asyncio.create_task(self._segment(index, start, cut, previous, heard)))

    async def _segment(
        self, index: int, start: int, stop: int, previous: asyncio.Task[Piece] | None, heard: bool
    ) -> Piece:
        """Transcribe a piece cut at a pause and send it as the next segment. One with too little speech to be
        heard is sent with no text, so that every SpeechStopped still has its SegmentReady."""
        piece = await self._transcribe(start, stop) if heard else self._unheard(start, stop)
        if previous is not None:
            await asyncio.wait([previous])  # segment messages go out in order; a failed one is reported by finish
        await self.emit(SegmentReady(self.turn, index, piece))
        return piece

    async def _transcribe(self, start: int, stop: int) -> Piece:
        transcript = await self.transcriber.transcribe(self.buffer.floats(start, stop), self._final_options)
        return Piece.of(transcript, start / SAMPLE_RATE, stop / SAMPLE_RATE)

    def _heard(self, voiced_end: int) -> bool:
        """Whether the piece being spoken has StreamLimits.min_speech_s of speech by `voiced_end` (a sample)."""
        return voiced_end - self._voiced_from >= self._min_speech

    def _unheard(self, start: int, stop: int) -> Piece:
        """A piece with less speech than StreamLimits.min_speech_s: no text (its language is the turn's, if set)."""
        return Piece(start / SAMPLE_RATE, stop / SAMPLE_RATE, "", self._final_options.language or "", ())

    # --- partials --------------------------------------------------------------------------------------
    def _maybe_partial(self) -> None:
        start, size, limits = self.piece_start, self.buffer.size, self.limits
        if self._partial is not None or self._finishing or start is None:
            return
        if size - self._partial_mark < limits.partial_interval_s * SAMPLE_RATE:
            return
        if size - start < limits.min_partial_s * SAMPLE_RATE:
            return
        self._partial_mark = size
        task = asyncio.create_task(self._run_partial(self._generation, start, size))
        self._partial = task
        task.add_done_callback(self._partial_done)

    def _partial_done(self, task: asyncio.Task[None]) -> None:
        if self._partial is task:
            self._partial = None
        if not task.cancelled() and task.exception() is not None:
            log.debug("partial failed: %s", task.exception())

    async def _run_partial(self, generation: int, start: int, stop: int) -> None:
        try:
            transcript = await self.transcriber.transcribe(self.buffer.floats(start, stop), self._partial_options)
        except HalkSpeechError as exc:  # e.g. Overloaded: a partial is an extra, the final still comes
            log.debug("partial skipped: %s", exc)
            return
        self._pin_language(transcript, (stop - start) / SAMPLE_RATE)
        if generation != self._generation or self._finishing or not transcript.text.strip():
            return  # a stale piece, the turn is ending, or nothing heard yet (not worth a message)
        text, stable = self._stable.update(transcript.text, transcript.language, stop / SAMPLE_RATE)
        await self.emit(Partial(self.turn, text, stable, stop / SAMPLE_RATE, generation))

    def _pin_language(self, transcript: Transcript, seconds: float) -> None:
        """Later partials decode in the language this one detected, when it was sure enough (PIN_LANGUAGE_*)."""
        options = self._partial_options
        probability = (transcript.language_probs or {}).get(transcript.language, 0.0)
        if options.language is None and seconds >= PIN_LANGUAGE_S and probability >= PIN_LANGUAGE_PROBABILITY:
            self._partial_options = dataclasses.replace(options, language=transcript.language)

    def _new_piece(self) -> None:
        """A segment was cut: partials start over for the next piece."""
        self._generation += 1
        self._stable = StablePrefix()
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None

    # --- the end ---------------------------------------------------------------------------------------
    async def finish(self, ended: float | None = None, *, drop_rest: bool = False) -> None:
        """Transcribe what is left and emit the Final (or one StreamError for the turn). `drop_rest`: the audio
        after the last segment is dropped, not transcribed (OpenAI's input_audio_buffer.clear)."""
        ended = time.perf_counter() if ended is None else ended
        self.close_input(drop_rest)
        if self._partial is not None:
            self._partial.cancel()  # frees its engine slot now; the final must not wait behind it
        try:
            final = await self._final(ended)
        except HalkSpeechError as exc:
            await self.emit(StreamError(exc.code, str(exc), self.turn, ends_turn=True))
            return
        except Exception:  # a bug must not leave the client waiting for this turn forever
            log.exception("live turn %d failed", self.turn)
            await self.emit(StreamError("internal_error", "the turn could not be transcribed", self.turn, True))
            return
        finally:
            await self.cancel()
        await self.emit(final)

    def close_input(self, drop_rest: bool = False) -> None:
        """No more pieces are cut (finish() does this first; LiveSession.end at once, so that no pause the VAD
        hears before finish() runs cuts a piece after the client's end)."""
        self._finishing = True
        self._drop_rest = self._drop_rest or drop_rest

    async def _final(self, ended: float) -> Final:
        if self._pushing is not None:  # the last message may still be with its worker: it belongs to the turn
            await asyncio.wait([self._pushing])  # not awaited directly: its AudioTooLong is the feeder's to tell
        self.buffer.append(self.pcm.flush())
        await self._drain_vad()
        start, stop = self._unsegmented()
        rest = self._rest = asyncio.create_task(self._transcribe(start, stop)) if stop > start else None
        pieces = [await task for task in self.pieces]
        if rest is not None:
            pieces.append(await rest)
        timings = pieces[-1].timings if rest is not None else Timings()
        language = next((p.language for p in pieces if p.text), pieces[0].language if pieces else "")
        language = language or self._final_options.language or ("" if self.model.tokenizer.multilingual else "en")
        elapsed = (time.perf_counter() - ended) * 1000
        return Final(self.turn, tuple(pieces), self.duration, language, timings, elapsed, self.model.name)

    async def _drain_vad(self) -> None:
        if self._vad_task is None:
            return
        if self._vad_tail.size:  # the last partial frame, padded with silence
            tail = np.pad(self._vad_tail, (0, FRAME - self._vad_tail.size))[None]
            self._vad_queue.put_nowait(tail * np.float32(self._vad_gain()))
            self._vad_tail = self._vad_tail[:0]
        self._vad_queue.put_nowait(None)
        await self._vad_task

    def _unsegmented(self) -> tuple[int, int]:
        """The audio after the last segment that still needs transcribing: [start, stop) samples."""
        if self.piece_start is None or self._drop_rest:
            return 0, 0  # VAD on, and no speech since the last cut
        stop = self.buffer.size
        if self.options.uses_vad:
            if not self._heard(self.segmenter.voiced_end):
                return 0, 0  # too little speech to be heard (StreamLimits.min_speech_s)
            stop = min(stop, self.segmenter.voiced_end + self._hangover)
        return self.piece_start, stop

    async def cancel(self) -> None:
        """Stop every task of the turn (their engine work is cancelled with them) and drop the audio."""
        tasks = [t for t in (self._partial, self._vad_task, self._rest, *self.pieces) if t is not None]
        running = [t for t in tasks if not t.done()]
        self._cancelled = True  # a message still being resampled is dropped when its worker returns
        for task in running:
            task.cancel()  # a cancelled task cancels its engine requests as it unwinds, awaited or not
        self.buffer = TurnBuffer(0)
        try:
            if running:
                await asyncio.wait(running)  # not gather: it would re-raise their CancelledErrors as ours
        finally:
            for task in tasks:  # a segment that failed before the turn ended (the client left): retrieved, so
                if task.done() and not task.cancelled():  # asyncio logs no "exception was never retrieved"
                    task.exception()
            await self._hold.aclose()


def _two_loudest(best: tuple[float, float], peaks: np.ndarray) -> tuple[float, float]:
    """The two largest of `best` (loudest first) and the new frames' `peaks`."""
    top = sorted([*best, *np.sort(peaks)[-2:].tolist()], reverse=True)
    return top[0], top[1]


class LiveSession:
    """One client connection: its turns, their limits, and clean-up when the client goes away."""

    def __init__(
        self,
        models: ModelSource,
        limits: StreamLimits,
        emit: Emit,
        vad: StreamingVAD | None = None,
        check: OptionsCheck | None = None,
    ) -> None:
        self.models, self.limits, self.emit, self.vad, self.check = models, limits, emit, vad, check
        self.turn: LiveTurn | None = None
        self.finishing: dict[asyncio.Task[None], int] = {}  # the ended turns still being transcribed → turn
        self.turns = 0
        self._discarding = False  # after a refused start or a full turn: drop audio quietly until start/end

    @property
    def busy(self) -> bool:
        """A turn is open or a final is still being computed."""
        return self.turn is not None or bool(self.finishing)

    async def start(self, options: StreamOptions, model: str | None = None) -> None:
        if self.turn is not None:
            raise TurnActive(f"turn {self.turn.turn} is still open: send end first")
        self._discarding = True  # until this start succeeds
        if len(self.finishing) >= self.limits.max_pending_finals:
            raise Overloaded(f"{len(self.finishing)} turns of this session are still being transcribed")
        hold = contextlib.AsyncExitStack()
        try:
            engine = await hold.enter_async_context(self.models(model))
            self._check(engine, options)
            self.turn = LiveTurn(self.turns + 1, engine, options, self.limits, self.emit, self.vad, hold)
        except BaseException:
            await hold.aclose()
            raise
        self.turns += 1
        self._discarding = False
        await self.emit(TurnStarted(self.turns, engine.name, options.sample_rate))

    def refuse_start(self) -> None:
        """A start message was refused before `start` (bad fields): with no turn open, the audio that follows
        is dropped quietly until the next start or end, as after any refused start (the refusal was its error)."""
        if self.turn is None:
            self._discarding = True

    def _check(self, engine: ModelEngine, options: StreamOptions) -> None:
        """Refuse options the model cannot honour (translate on an English-only model) before the turn opens,
        so a client never streams audio into a turn that could only fail at its end."""
        if self.check is not None:
            final, _ = _transcribe_options(options.language, options, self.limits)
            self.check(engine, final)

    async def feed(self, data: bytes) -> None:
        """One message of audio for the open turn (one at a time: the caller awaits each)."""
        turn = self.turn
        if turn is None:
            if self._discarding:
                return
            self._discarding = True  # one error, not one per 20 ms frame
            raise NoTurn("audio arrived before start: send a start message first")
        try:
            await turn.feed(data)
        except AudioTooLong:
            if self.turn is turn:  # not already ended meanwhile (expire)
                self.end()
                self._discarding = True
            raise

    def end(self, *, drop_rest: bool = False) -> None:
        """Close the open turn; its final is computed in the background (`drop_rest`: see LiveTurn.finish)."""
        if self.turn is None:
            if self._discarding:
                self._discarding = False
                return
            raise NoTurn("end arrived with no open turn")
        turn, self.turn = self.turn, None
        turn.close_input(drop_rest)
        task = asyncio.create_task(turn.finish(time.perf_counter(), drop_rest=drop_rest))
        self.finishing[task] = turn.turn
        task.add_done_callback(lambda done: self.finishing.pop(done, None))

    async def expire(self, now: float | None = None) -> None:
        """End a turn that has been open longer than max_turn_s (wall time); called by the caller's watchdog."""
        now = time.monotonic() if now is None else now
        if self.turn is not None and now - self.turn.started > self.limits.max_turn_s:
            turn = self.turn.turn
            self.end()
            self._discarding = True
            message = f"the turn was open longer than {self.limits.max_turn_s:g} s; it was ended"
            await self.emit(StreamError("turn_timeout", message, turn))

    async def end_all(self) -> None:
        """End the open turn as if `end` had come, then wait until every ended turn has emitted its final (or its
        error): when the server closes a connection itself, what the client sent is still transcribed first."""
        if self.turn is not None:
            self.end()
        if self.finishing:
            await asyncio.wait(list(self.finishing))  # not gather: finish() reports its own failures

    async def cut(self, message: str) -> None:
        """The server cannot wait any longer (its shutdown's deadline): the open turn and every final still being
        computed are cancelled, and each such turn gets `engine_stopped` instead of its final."""
        turns = sorted({*self.finishing.values(), *([self.turn.turn] if self.turn is not None else [])})
        await self.close()
        for turn in turns:
            await self.emit(StreamError("engine_stopped", message, turn, ends_turn=True))

    async def close(self) -> None:
        """The client is gone: cancel the open turn and every final in progress, freeing engine slots."""
        turn, self.turn = self.turn, None
        tasks = list(self.finishing)
        for task in tasks:
            task.cancel()
        if turn is not None:
            await turn.cancel()
        if tasks:
            await asyncio.wait(tasks)
