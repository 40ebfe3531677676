"""One transcription for a route: admission, the model, the audio decoded (in a worker thread, unless it is a
small 16 kHz WAV: wav.small_pcm_wav), the transcription;
cancelled when the client disconnects or the request timeout passes. (sse.py streams one as it goes.)

Cancelling the transcription task cancels its engine work (the engine frees the slots at its next step) and
leaves the admission queue, so a client that goes away leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from starlette.types import Receive

from halkspeech.api.deps import AppState
from halkspeech.api.stopping import STOPPED, StopSignal
from halkspeech.audio.decode import AudioSource
from halkspeech.audio.wav import decode_upload, small_pcm_wav
from halkspeech.config import ServerSettings
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import AudioTooLong, Cancelled, EngineStopped, InvalidRequest, RequestTimeout
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.languages import normalize_language
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import Segment, TranscribeOptions, Transcript
from halkspeech.transcription.window import WindowDecoder

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """What to transcribe (an upload, a URL to fetch, or audio already decoded) with which model and options."""

    options: TranscribeOptions
    model: str | None = None
    audio: AudioSource | None = None
    url: str | None = None
    samples: np.ndarray | None = None  # 16 kHz mono float32 [n], as the Triton API sends it


@dataclass(frozen=True)
class Outcome:
    transcript: Transcript
    model: str
    decode_ms: float  # audio decoding (and the URL fetch, if any)
    processing_s: float  # the whole job, admission wait included
    queue_s: float  # the admission wait (in processing_s)


def with_server_policy(options: TranscribeOptions, server: ServerSettings) -> TranscribeOptions:
    """Apply server-wide overrides: `force_decode_tokens` (benchmarks only) decodes exactly that many tokens
    per window without timestamps, as `halkspeech bench engine` does."""
    if server.force_decode_tokens is None:
        return options
    return dataclasses.replace(options, force_decode_tokens=server.force_decode_tokens, without_timestamps=True)


def check_options(model: ModelEngine, options: TranscribeOptions) -> None:
    """Refuse what this model cannot do before any work starts (so a stream never starts only to fail)."""
    if options.task == "translate" and not model.tokenizer.multilingual:
        raise InvalidRequest(f"model {model.name} is English-only and cannot translate; use a multilingual model")
    window = WindowDecoder(model, options)
    window.language()  # a language outside the model's vocabulary (an English-only model takes any, as the CLI)
    needed = window.largest_group()
    limit = model.engine.max_group_size
    if needed > limit:
        raise InvalidRequest(
            f"beam_size or best_of {needed} needs {needed} decoder slots at once; this server allows {limit}"
        )


async def run_job(
    state: AppState,
    job: Job,
    *,
    on_segment: Callable[[Segment], None] | None = None,
    ready: asyncio.Future[None] | None = None,
) -> Outcome:
    """The whole job under the request timeout. `ready` is set once the audio is decoded and decoding starts."""
    started = time.perf_counter()
    server = state.settings.server
    # Cheap refusals first (unknown model or language), then the audio, and only then a model load.
    state.pool.check(job.model)
    normalize_language(job.options.language)
    try:
        async with asyncio.timeout(server.request_timeout_s), state.gate.admit():
            decode_started = time.perf_counter()
            if job.samples is not None:
                audio = job.samples
                if len(audio) > server.max_audio_s * SAMPLE_RATE:
                    raise AudioTooLong(f"the audio is longer than the limit of {server.max_audio_s:g} s")
            else:
                source = job.audio if job.url is None else (await state.fetcher.fetch(job.url)).data
                if source is None:
                    raise InvalidRequest("no audio was given")
                audio = await decode(source, server.max_audio_s)
            decode_ms = (time.perf_counter() - decode_started) * 1000
            async with state.pool.use(job.model) as model:
                check_options(model, job.options)
                if ready is not None and not ready.done():
                    ready.set_result(None)
                transcript = await Transcriber(model).transcribe(audio, job.options, on_segment=on_segment)
    except TimeoutError:
        raise RequestTimeout(
            f"the transcription did not finish within {server.request_timeout_s:g} s (server.request_timeout_s)"
        ) from None
    name = state.pool.key(job.model)
    state.metrics.audio_seconds.labels(name).inc(transcript.duration)
    outcome = Outcome(transcript, name, decode_ms, time.perf_counter() - started, decode_started - started)
    decode_s, stages = decode_ms / 1000, state.metrics.stages
    stages.labels("admission").observe(outcome.queue_s)
    stages.labels("decode").observe(decode_s)
    stages.labels("transcribe").observe(outcome.processing_s - outcome.queue_s - decode_s)
    return outcome


async def decode(source: AudioSource, max_duration_s: float) -> np.ndarray:
    """The samples of an upload or a fetched file: a small 16 kHz WAV read here, on the event loop (~0.3 ms
    for 30 s; handing it to a worker thread costs more, tens of ms under load), anything else decoded in a
    worker thread."""
    samples = small_pcm_wav(source, max_duration_s=max_duration_s)
    return samples if samples is not None else await decode_in_thread(source, max_duration_s)


async def decode_in_thread(source: AudioSource, max_duration_s: float) -> np.ndarray:
    """`decode_upload` in a worker thread. If the request ends first (client gone, timeout), the thread is told
    to stop and waited for: a thread cannot be cancelled, and one left decoding hours of audio would hold a
    core and gigabytes outside the admission limit that this task's slot stands for."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(decode_upload, source, max_duration_s=max_duration_s, stop=stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({work})  # within a frame of decoding; the slot is released after
        if not work.cancelled():
            work.exception()  # retrieved (Cancelled, or whatever ended it): nobody wants it now
        raise


async def transcribe(request: Request, state: AppState, job: Job) -> Outcome:
    """Run a job to its end; Cancelled if the client disconnects first, EngineStopped if the server's shutdown
    cannot wait for it (either way its work is cancelled)."""
    return await until_disconnect(request.receive, run_job(state, job), state.stopping)


# --- disconnects ----------------------------------------------------------------------------------------------
async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (ASGI http.disconnect); reads and drops any unread body."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T], stop: StopSignal | None = None) -> T:
    """Run `work`, cancelling it (and waiting until it has cleaned up) if the client disconnects first
    (Cancelled) or `stop` is set first (EngineStopped: the server's shutdown cannot wait any longer)."""
    task = asyncio.ensure_future(work)
    watchers = [asyncio.ensure_future(wait_for_disconnect(receive))]
    if stop is not None:
        watchers.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            await cancel(task)
    if task.cancelled():
        if stop is not None and stop.is_set:
            raise EngineStopped(STOPPED)
        raise Cancelled("the client disconnected; its transcription was cancelled")
    return task.result()


async def cancel(task: asyncio.Future[Any]) -> None:
    """Cancel a task and wait until it has unwound (released its admission slot, cancelled its engine work)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
