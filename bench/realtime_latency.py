"""Commit → `completed` on /v1/realtime against end → `final` on /ws, for the same audio on the same server: the
adapter's cost over the live session it wraps. One `halkspeech serve` (a subprocess), the clip sent as 24 kHz
PCM16 as fast as the socket takes it, then the clock starts at the commit (or `end`) and stops when the
transcript arrives, measured by the client. Alternating runs after one warm-up each; medians.

Without turn detection and with `whisper-1` (no partials), the realtime turn is the /ws turn; `gpt-4o-transcribe`
adds partials (deltas), cancelled at the commit as /ws cancels its partials at `end`: compared with /ws with
partials on. Every turn's transcript is kept, and the table says whether all four ways gave the same text.

  PYTHONPATH=src python bench/realtime_latency.py [--model tiny.en] [--audio tests/data/jfk.flac] [--runs 5]
      [--device cpu] [--force-decode-tokens N] [--port 8871] [--json bench/results/realtime_latency_cpu.json]

`--force-decode-tokens` (benchmarking only: random weights never end a window) is passed to the server, as in
`halkspeech bench ws --tokens`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from halkspeech.audio import decode_audio
from halkspeech.bench.subprocess_server import serve
from halkspeech.loadtest import realtime_common as realtime
from halkspeech.loadtest.ws_common import END_MESSAGE, start_message

RATE = 24_000


def pcm24(path: str) -> bytes:
    audio = decode_audio(path, sample_rate=RATE)
    return (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


Turn = Callable[[str, bytes], Awaitable[tuple[float, str]]]
STEP = RATE // 10 * 2  # 100 ms of PCM16


async def _until(
    ws: websockets.ClientConnection, started: float, kind: str, text: str, fatal: bool
) -> tuple[float, str]:
    """Seconds from `started` until the event `kind` arrives, and its `text` field; with `fatal`, an `error`
    event raises (a realtime error ends the item; on /ws the turn goes on to its final)."""
    async for message in ws:
        event = json.loads(message)
        if event["type"] == kind:
            return time.perf_counter() - started, event[text]
        if fatal and event["type"] == "error":
            raise RuntimeError(event["error"])
    raise RuntimeError(f"no {kind}")


def ws_turn(partials: bool) -> Turn:
    async def turn(url: str, pcm: bytes) -> tuple[float, str]:
        """/ws: start, 100 ms frames, end → final; seconds from `end` to the final."""
        async with websockets.connect(f"{url}/ws", max_size=None) as ws:
            await ws.send(start_message(sample_rate=RATE, language="en", partials=partials))
            for i in range(0, len(pcm), STEP):
                await ws.send(pcm[i : i + STEP])
            started = time.perf_counter()
            await ws.send(END_MESSAGE)
            return await _until(ws, started, "final", "text", fatal=False)

    return turn


def realtime_turn(model: str) -> Turn:
    async def turn(url: str, pcm: bytes) -> tuple[float, str]:
        """/v1/realtime: a manual session, 100 ms appends, commit → completed; seconds from the commit."""
        async with websockets.connect(realtime.realtime_url(url), max_size=None) as ws:
            await ws.recv()  # session.created
            await ws.send(realtime.session_update(model=model, language="en", sample_rate=RATE))
            await ws.recv()  # session.updated
            for i in range(0, len(pcm), STEP):
                await ws.send(realtime.append(pcm[i : i + STEP]))
            started = time.perf_counter()
            await ws.send(realtime.COMMIT)
            return await _until(ws, started, realtime.PREFIX + "completed", "transcript", fatal=True)

    return turn


async def measure(url: str, pcm: bytes, runs: int) -> tuple[dict[str, list[float]], dict[str, set[str]]]:
    ways: dict[str, Turn] = {
        "/ws end → final": ws_turn(partials=False),
        "/v1/realtime commit → completed (whisper-1)": realtime_turn("whisper-1"),
        "/ws end → final (partials)": ws_turn(partials=True),
        "/v1/realtime commit → completed (gpt-4o-transcribe: deltas)": realtime_turn("gpt-4o-transcribe"),
    }
    for way in ways.values():  # warm-up: the first turn pays for first calls
        await way(url, pcm)
    times: dict[str, list[float]] = {name: [] for name in ways}
    texts: dict[str, set[str]] = {name: set() for name in ways}
    for _ in range(runs):
        for name, way in ways.items():
            seconds, text = await way(url, pcm)
            times[name].append(seconds)
            texts[name].add(text.strip())
    return times, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--audio", default="tests/data/jfk.flac")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=8871)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force-decode-tokens", type=int, default=None, help="benchmarking only (random weights)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pcm = pcm24(args.audio)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        server_args = ["--model", args.model, "--device", args.device, "--preload"]
        if args.force_decode_tokens:
            server_args += ["--force-decode-tokens", str(args.force_decode_tokens)]
        with serve(server_args, port=args.port, env=env, log_path=Path(tmp) / "server.log", startup_timeout_s=300) as s:
            url = s.url.replace("http://", "ws://")
            times, texts = asyncio.run(measure(url, pcm, args.runs))
    rows: dict[str, Any] = {
        name: {"median_ms": round(statistics.median(ts) * 1000, 1), "runs_ms": [round(t * 1000, 1) for t in ts]}
        for name, ts in times.items()
    }
    same_text = len(set().union(*texts.values())) == 1
    print(f"{args.audio} ({len(pcm) / 2 / RATE:.1f} s at 24 kHz), {args.model} on {args.device}, {args.runs} runs each")
    for name, row in rows.items():
        print(f"  {name:<60} median {row['median_ms']:>7.1f} ms   runs {row['runs_ms']}")
    print(f"  the same transcript from every turn of every way: {same_text}")
    if args.json:
        result = {"model": args.model, "device": args.device, "audio": args.audio, "runs": args.runs}
        result |= {"force_decode_tokens": args.force_decode_tokens, "same_text": same_text, "results": rows}
        result["texts"] = {name: sorted(t) for name, t in texts.items()}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
