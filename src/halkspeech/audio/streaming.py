"""Audio that arrives in pieces (live sessions): 16-bit PCM chunks → 16 kHz samples, and frame-by-frame VAD
over many streams at once.

`StreamingVAD` runs Silero VAD's streaming network (the `silero-vad` package's JIT model, whose state we hold
per stream) one 32 ms frame at a time per stream, and batches the frames of every live stream into one call
on its own thread: measured on a 2-core CPU, one frame costs 0.43 ms alone and 0.06 ms in a
batch of 64 (silero's JIT model, one thread), so 200 talking users need a third of a core, not three cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import warnings
from dataclasses import dataclass, field

import av
import numpy as np
import torch

from halkspeech.audio.decode import decode_pcm16
from halkspeech.audio.vad import silero_jit_path
from halkspeech.errors import AudioDecodeError, EngineStopped
from halkspeech.model.dims import SAMPLE_RATE

log = logging.getLogger(__name__)

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms), as silero's streaming model reads them
CONTEXT = 64  # samples of the previous frame each frame also sees
JOB_FRAMES = 32  # frames (1 s) a stream hands the VAD thread at a time, so that every stream's jobs interleave

MIN_RATE, MAX_RATE = 8_000, 192_000


#: Audio at another rate is resampled at least this much at a time (at its rate): libswresample's per-call
#: cost (~23 µs) on every 20 ms append made resampling half of the event loop's time for 100 realtime users
#: at 24 kHz. Chunks this long or longer go through at once; shorter ones wait at most this long.
RESAMPLE_BLOCK_S = 0.1


class PCMStream:
    """16-bit little-endian mono PCM chunks at `sample_rate` → int16 samples at 16 kHz, one resampler for the
    whole stream so chunk edges leave no clicks. Odd-length chunks are refused whole (nothing half-used)."""

    def __init__(self, sample_rate: int) -> None:
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise AudioDecodeError(f"sample_rate must be {MIN_RATE} to {MAX_RATE} Hz, got {sample_rate}")
        self.sample_rate = sample_rate
        self._resampler = (
            None if sample_rate == SAMPLE_RATE else av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        )
        self._block = round(RESAMPLE_BLOCK_S * sample_rate)
        self._pending: list[np.ndarray] = []  # chunks waiting to make a block, at sample_rate
        self._in = 0  # samples in, at sample_rate (pending ones too)
        self._pts = 0  # samples given to the resampler
        self._out = 0  # samples out, at 16 kHz

    @property
    def held(self) -> int:
        """Samples at 16 kHz not given out yet: those of chunks waiting to make a block, and the ones the resampler
        holds back until more audio or `flush` (its filter's delay: 16 of 24 kHz audio)."""
        return max(0, round(self._in * SAMPLE_RATE / self.sample_rate) - self._out) if self._resampler else 0

    def push(self, data: bytes) -> np.ndarray:
        """One chunk → int16 samples at 16 kHz [n]; with a resampler, nothing until a block's worth has come, and
        a few samples are held back until `flush`."""
        if len(data) % 2:
            raise AudioDecodeError(f"16-bit PCM frames need an even number of bytes, got {len(data)}")
        pcm = np.frombuffer(data, dtype="<i2")  # [n]
        if self._resampler is None or pcm.size == 0:
            return pcm.astype(np.int16)
        self._pending.append(pcm)
        self._in += pcm.size
        if self._in - self._pts < self._block:
            return _EMPTY
        return self._resample(False)

    def flush(self) -> np.ndarray:
        """The samples still waiting or held: [n] int16."""
        if self._resampler is None:
            return _EMPTY
        return self._resample(True)

    def _resample(self, last: bool) -> np.ndarray:
        assert self._resampler is not None
        frames = []
        if self._pending:
            pcm = np.concatenate(self._pending).astype(np.int16)
            self._pending.clear()
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, self._pts
            self._pts += pcm.size
            frames += self._resampler.resample(frame)
        if last:
            frames += self._resampler.resample(None)
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        samples = np.concatenate(parts).astype(np.int16) if parts else _EMPTY
        self._out += samples.size
        return samples


_EMPTY = np.zeros(0, dtype=np.int16)
_EMPTY.flags.writeable = False


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 [n] → float32 in [-1, 1) [n], as `decode_pcm16` does for whole buffers."""
    return decode_pcm16(samples.astype("<i2").tobytes())


@dataclass(eq=False)
class VADStream:
    """One stream's recurrent state; only the VAD thread touches it."""

    state: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, 128))  # LSTM (h, c): [2, 1, 128]
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, dtype=np.float32))  # last samples


@dataclass(eq=False)
class _Job:
    stream: VADStream
    frames: np.ndarray  # [k, FRAME] float32
    future: concurrent.futures.Future[np.ndarray] = field(default_factory=concurrent.futures.Future)


def _load_silero() -> torch.jit.ScriptModule:
    """Silero's JIT network without its wrapper state: `net(x [B, 576], state [2, B, 128]) -> ([B, 1], state)`.

    Loaded from the file (vad.silero_jit_path), never by importing `silero_vad`: that import sets torch's thread
    count to 1 for the importing thread and for all threads started after it. This module's VAD thread sets
    nothing global (torch.set_num_threads in any thread also lowers every thread started after it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: the format silero ships
        wrapper = torch.jit.load(str(silero_jit_path()), map_location="cpu").eval()
    return wrapper._model


class StreamingVAD:
    """Speech probability of each new 512-sample frame of many streams, batched on one thread.

    A stream must await one call before making the next (its state advances in order)."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._net: torch.jit.ScriptModule | None = None

    async def probabilities(self, stream: VADStream, frames: np.ndarray) -> np.ndarray:
        """frames [k, 512] float32 at 16 kHz → speech probabilities [k], in jobs of at most JOB_FRAMES: a batch
        runs until its longest job is done, so one stream's minutes of audio in one job would hold up every
        other stream's next frame (a 300 s frame held another client's first segment 1.4 → 10 s)."""
        frames = frames.reshape(-1, FRAME)
        parts = [
            await asyncio.wrap_future(self.submit(stream, frames[i : i + JOB_FRAMES]))
            for i in range(0, len(frames), JOB_FRAMES)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def submit(self, stream: VADStream, frames: np.ndarray) -> concurrent.futures.Future[np.ndarray]:
        job = _Job(stream, np.ascontiguousarray(frames, dtype=np.float32).reshape(-1, FRAME))
        with self._lock:
            if self._closed:
                raise EngineStopped("the VAD has been shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="halkspeech-vad", daemon=True)
                self._thread.start()
        self._inbox.put(job)
        return job.future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._inbox.put(None)
            thread.join(5.0)

    def _loop(self) -> None:
        while True:
            jobs = [self._inbox.get()]
            while not self._inbox.empty():
                jobs.append(self._inbox.get_nowait())
            live = [j for j in jobs if j is not None and j.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if None in jobs:
                return

    def _run(self, jobs: list[_Job]) -> None:
        try:
            probs = self._infer(jobs)
        except Exception as exc:  # a failed batch fails its callers, never the thread
            log.exception("streaming VAD failed")
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, p in zip(jobs, probs, strict=True):
            job.future.set_result(p)

    @torch.inference_mode()
    def _infer(self, jobs: list[_Job]) -> list[np.ndarray]:
        if self._net is None:
            self._net = _load_silero()
        rows = [_with_context(job) for job in jobs]  # each [k_j, CONTEXT + FRAME]
        out = [np.zeros(len(r), dtype=np.float32) for r in rows]
        # Frame t of every stream that has one runs in one call; streams rarely send more than one at a time.
        for t in range(max(len(r) for r in rows)):
            active = [i for i, r in enumerate(rows) if len(r) > t]
            x = torch.from_numpy(np.stack([rows[i][t] for i in active]))  # [b, 576]
            state = torch.cat([jobs[i].stream.state for i in active], dim=1)  # [2, b, 128]
            p, state = self._net(x, state)  # [b, 1], [2, b, 128]
            for k, (i, value) in enumerate(zip(active, p[:, 0].tolist(), strict=True)):
                jobs[i].stream.state = state[:, k : k + 1]
                out[i][t] = value
        return out


def _with_context(job: _Job) -> np.ndarray:
    """[k, FRAME] → [k, CONTEXT + FRAME]: each frame behind the last CONTEXT samples before it."""
    flat = np.concatenate([job.stream.context, job.frames.reshape(-1)])
    job.stream.context = flat[-CONTEXT:].copy()
    index = np.arange(len(job.frames))[:, None] * FRAME + np.arange(CONTEXT + FRAME)[None, :]
    return flat[index]
