"""The server's transcription calls from in-process clients: `bench server`'s load without the HTTP layer.

`concurrency` asyncio clients in one event loop each repeat `Transcriber.transcribe` (the call the routes
make) on one clip, decoded once, with the options the server gives a request under `--force-decode-tokens`
(English, `tokens` forced tokens, no timestamps), until `requests` are done; a first load of
`warmup_requests` runs before the timed one, as `bench server` does. The engine has the server's settings
(live slots held back). What is left out: HTTP, the multipart upload, WAV decoding, the admission gate.

Between the engine figure (every window submitted at once) and the server's, it tells the closed loop's cost
(small encoder runs, decode steps only as wide as the windows in flight) from the HTTP layer's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from halkspeech.bench.common import free_device_memory, percentile
from halkspeech.config import EngineSettings
from halkspeech.engine.engine import EngineStats
from halkspeech.engine.factory import start_engine
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions


@dataclass(frozen=True)
class ClosedLoad:
    concurrency: int
    requests: int
    warmup_requests: int
    tokens: int


def closed_loop_figure(
    weights: LoadedWeights, settings: EngineSettings, audio: np.ndarray, load: ClosedLoad
) -> dict[str, Any]:
    """Windows/s and latency percentiles of the timed load (one window a request: `audio` is ≤ 30 s)."""
    model = start_engine(weights, settings)
    try:
        transcriber = Transcriber(model)
        options = TranscribeOptions(language="en", force_decode_tokens=load.tokens, without_timestamps=True)
        asyncio.run(_load(transcriber, audio, options, load.concurrency, load.warmup_requests))
        model.engine.stats = stats = EngineStats()  # the timed load's counters alone (the engine is idle here)
        wall, latencies = asyncio.run(_load(transcriber, audio, options, load.concurrency, load.requests))
    finally:
        model.close()
        del model
        free_device_memory(settings.device)
    if stats.tokens != load.requests * (load.tokens - 1):  # the prefill gives each window its first token
        raise RuntimeError(f"expected {load.tokens} tokens in one window a request; steps gave {stats.tokens}")
    ms = [1000 * s for s in latencies]
    return {
        "requests": load.requests,
        "wall_s": wall,
        "windows_per_s": load.requests / wall,
        "latency_ms": {q: round(percentile(ms, int(q[1:])), 1) for q in ("p50", "p95", "p99")},
        "mean_encoder_batch": _mean_size(stats.encoder_batches),
        "mean_decoder_batch": _mean_size(stats.decode_batches),
        "tokens": stats.tokens,
    }


def _mean_size(sizes: Counter[int]) -> float | None:
    """The mean of a batch-size → count tally (None when empty)."""
    count = sizes.total()
    return round(sum(size * n for size, n in sizes.items()) / count, 1) if count else None


async def _load(
    transcriber: Transcriber, audio: np.ndarray, options: TranscribeOptions, concurrency: int, requests: int
) -> tuple[float, list[float]]:
    """`requests` transcriptions by `concurrency` clients in a closed loop: (wall seconds, each one's latency)."""
    left = requests
    latencies: list[float] = []

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            transcript = await transcriber.transcribe(audio, options)
            latencies.append(time.perf_counter() - started)
            if not transcript.tokens:
                raise RuntimeError("a forced-length transcription came back without tokens")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
    return time.perf_counter() - started, latencies
