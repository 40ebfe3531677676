"""How long one large live message holds the server's event loop: the longest gap a 1 ms ticker sees while a
live turn (tiny.en on the CPU, the streaming VAD on, as `/v1/realtime`'s server_vad) takes one message of
24 kHz PCM, converted on the loop against on a worker thread (`OFF_LOOP_BYTES`), alternating.

Every other live connection waits that long for its next message to be read. The default message is the
largest realtime append the server takes: 15 MiB of base64, 11.25 MiB of PCM, 4 minutes (jfk.flac repeated).

  PYTHONPATH=src python bench/live_loop_stall.py [--mib 11.25] [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av

from halkspeech.audio.streaming import StreamingVAD
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription import streaming
from halkspeech.transcription.live import LiveEvent, StreamLimits, StreamOptions

JFK = Path(__file__).resolve().parents[1] / "tests" / "data" / "jfk.flac"
RATE = 24_000


def pcm_at_24k(nbytes: int) -> bytes:
    """jfk.flac as 16-bit mono PCM at 24 kHz, repeated to `nbytes` (even)."""
    with av.open(str(JFK)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    one = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)
    return (one * (nbytes // len(one) + 1))[: nbytes // 2 * 2]


async def longest_gap_ms(engine: ModelEngine, vad: StreamingVAD, message: bytes, off_loop_bytes: int) -> float:
    streaming.OFF_LOOP_BYTES = off_loop_bytes  # read at each feed

    @contextlib.asynccontextmanager
    async def models(name: str | None) -> AsyncIterator[ModelEngine]:
        yield engine

    async def emit(event: LiveEvent) -> None:
        pass

    limits = StreamLimits(max_turn_s=len(message) / 2 / RATE + 10)
    session = streaming.LiveSession(models, limits, emit, vad)
    await session.start(StreamOptions(sample_rate=RATE, partials=False, segment_silence_ms=500))
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    await session.feed(message)
    await asyncio.sleep(0.05)
    done.set()
    await ticker
    await session.close()  # cancels the VAD's work and the segments it cut: only the feed is timed
    return max(gaps) * 1000


async def measure(mib: float, rounds: int) -> dict[str, list[float]]:
    message = pcm_at_24k(int(mib * 2**20))
    vad = StreamingVAD()
    engine = start_engine(ModelRegistry(ModelSettings()).load("tiny.en"), EngineSettings(device="cpu"))
    ways = {"on the loop": 1 << 62, "worker thread": streaming.OFF_LOOP_BYTES}
    results: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for _ in range(rounds):
            for way, threshold in ways.items():
                results[way].append(await longest_gap_ms(engine, vad, message, threshold))
    finally:
        engine.close()
        vad.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=11.25, help="the message's PCM, MiB (default: 11.25)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.mib <= 0 or args.rounds < 1:
        parser.error("--mib must be > 0 and --rounds ≥ 1")
    results = asyncio.run(measure(args.mib, args.rounds))
    print(f"one message of {args.mib:g} MiB of 24 kHz PCM ({args.mib * 2**20 / 2 / RATE:.0f} s), VAD on")
    print(f"{'conversion':<16}{'median ms':>10}  each round")
    for way, gaps in results.items():
        print(f"{way:<16}{statistics.median(gaps):>10.1f}  {', '.join(f'{g:.1f}' for g in gaps)}")
    if args.json:
        payload = {"mib": args.mib, "rate": RATE, "longest_loop_gap_ms": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
