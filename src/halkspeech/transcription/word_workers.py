"""Where batched long-form does the host half of word timing (DTW, word split, the duration heuristics).

That half is ~2 ms of mostly-Python work a window. In the engine's process it holds the GIL the engine thread
needs for every torch call: on an H100 (bench/gpu_align_insitu.py, 8 concurrent 5-minute files) word timestamps
cost 25-29% of throughput with it in one thread there, and 10-11% with it in four worker processes, in the same
runs (bench/NOTES.md). So on a GPU it runs in worker processes (spawned: a CUDA process must not fork), which also
spread it over cores when many requests ask for words; on a CPU, where the engine's own torch calls release the
GIL for their whole compute, one thread in this process does it and no start-up is paid.

A window travels as plain data: the cost matrix as a NumPy array (a torch tensor would go through shared
memory, and a view would carry its whole batch), the tokens, and the vocabulary's name (each worker builds the
tokenizer's tables once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from halkspeech.engine.request import Alignment
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.alignment import TimedSpan, time_words

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowWords:
    """One window's word-timing job: what `time_words` needs, in a form that pickles small."""

    alignment: Alignment  # without its tensors: they travel as the arrays below
    matrix: np.ndarray | None  # the cost matrix [text + 1, frames] float32, contiguous; None: raw scores
    scores: np.ndarray | None  # raw scores [heads, tokens, 1500] float16 (no cost matrix), else None
    multilingual: bool
    num_languages: int
    language: str | None
    spans: tuple[tuple[float, float, int], ...]
    num_frames: int
    time_offset: float
    last_speech: float

    @classmethod
    def of(
        cls,
        alignment: Alignment,
        tokenizer: Tokenizer,
        language: str | None,
        spans: Sequence[tuple[float, float, int]],
        *,
        num_frames: int,
        time_offset: float,
        last_speech: float,
    ) -> WindowWords:
        matrix, scores = (_array(t) for t in (alignment.matrix, alignment.scores))
        return cls(
            replace(alignment, matrix=None, scores=None),
            matrix,
            scores,
            tokenizer.multilingual,
            tokenizer.num_languages,
            language,
            tuple(spans),
            num_frames,
            time_offset,
            last_speech,
        )


def run_window_words(job: WindowWords) -> tuple[list[TimedSpan], float]:
    """The job's timed spans, and the milliseconds they took (in whichever process runs it)."""
    began = time.perf_counter()
    alignment = replace(
        job.alignment,
        matrix=None if job.matrix is None else torch.from_numpy(job.matrix),
        scores=None if job.scores is None else torch.from_numpy(job.scores),
    )
    timed, _ = time_words(
        alignment,
        _tokenizer(job.multilingual, job.num_languages),
        job.language,
        job.spans,
        num_frames=job.num_frames,
        time_offset=job.time_offset,
        last_speech=job.last_speech,
    )
    return timed, (time.perf_counter() - began) * 1000


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else np.ascontiguousarray(tensor.numpy())


@functools.cache
def _tokenizer(multilingual: bool, num_languages: int) -> Tokenizer:
    return Tokenizer(multilingual=multilingual, num_languages=num_languages)


def _warm(multilingual: bool, num_languages: int) -> None:
    _tokenizer(multilingual, num_languages).encoding  # noqa: B018 (builds the tables once per worker)


_EXECUTORS: dict[int, Executor] = {}
_EXECUTORS_LOCK = threading.Lock()


def word_executor(processes: int, *, broken: Executor | None = None) -> Executor:
    """The process-wide executor for `processes` workers (0: one thread in this process), made on first use, and
    made anew when it is `broken` (the windows that saw it break ask at once; one new pool replaces it).
    The workers start at once and load the common vocabulary, so the first window does not wait for that."""
    with _EXECUTORS_LOCK:
        current = _EXECUTORS.get(processes)
        if current is not None and current is not broken:
            return current
        if current is not None:
            current.shutdown(wait=False, cancel_futures=True)
        if processes <= 0:
            current = ThreadPoolExecutor(max_workers=1, thread_name_prefix="halkspeech-words")
        else:
            current = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(processes):
                current.submit(_warm, True, 100)
        _EXECUTORS[processes] = current
        return current


async def time_window_words(job: WindowWords, processes: int) -> tuple[list[TimedSpan], float]:
    """`run_window_words` in the executor for `processes`, off the event loop. A worker that died (killed, out
    of memory) breaks its whole pool: the window is retried once on a new one, so the server keeps serving."""
    loop = asyncio.get_running_loop()
    executor = word_executor(processes)
    try:
        return await loop.run_in_executor(executor, run_window_words, job)
    except BrokenExecutor:
        log.warning("a word-timing worker died; starting new workers")
        return await loop.run_in_executor(word_executor(processes, broken=executor), run_window_words, job)
