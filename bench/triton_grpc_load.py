"""Closed-loop load on Triton's gRPC API (`halkspeech serve --grpc-port`, or a Triton + TensorRT-LLM server):
`--concurrency` clients, each sending one request after another through `tritonclient.grpc.aio`, until
`--requests` have been sent. The clip (WAV, 16 kHz) goes as raw FP32 with the examples' TEXT_PREFIX.
Prints requests/s, windows/s (30 s each), latency percentiles and errors by gRPC status; `--json` keeps them.

  python bench/triton_grpc_load.py --url 127.0.0.1:8001 --audio clip.wav [--concurrency 128] [--requests 512]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from halkspeech.audio import decode_audio
from halkspeech.bench.common import percentile

PREFIX = b"<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


def inputs(audio: np.ndarray) -> list[triton.InferInput]:
    wav = triton.InferInput("WAV", [1, len(audio)], "FP32")
    wav.set_data_from_numpy(audio[None].astype(np.float32))
    prefix = triton.InferInput("TEXT_PREFIX", [1, 1], "BYTES")
    prefix.set_data_from_numpy(np.array([[PREFIX]], dtype=object))
    return [wav, prefix]


async def run(args: argparse.Namespace) -> dict[str, object]:
    audio = decode_audio(args.audio)
    request = inputs(audio)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0
    async with triton.InferenceServerClient(url=args.url) as client:

        async def worker() -> None:
            nonlocal sent
            while sent < args.requests:
                sent += 1
                started = time.perf_counter()
                try:
                    await client.infer(args.model, request, headers=headers, client_timeout=args.timeout_s)
                except InferenceServerException as exc:
                    errors[str(exc.status())] += 1
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - began
    ms = [x * 1000 for x in latencies]
    windows = len(ms) * max(1, math.ceil(len(audio) / 16000 / 30 - 1e-6))

    def pct(q: float) -> float | None:
        return round(percentile(ms, q), 1) if ms else None

    return {
        "url": args.url, "model": args.model, "concurrency": args.concurrency, "sent": sent, "ok": len(ms),
        "errors": dict(errors), "wall_s": round(wall, 3), "requests_per_s": round(len(ms) / wall, 2),
        "windows_per_s": round(windows / wall, 2), "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="host:port of the gRPC API")
    parser.add_argument("--audio", type=Path, required=True, help="the clip every request sends")
    parser.add_argument("--model", default="whisper", help="the Triton model name (default: whisper)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.concurrency < 1 or args.requests < 1 or not args.timeout_s > 0:
        parser.error("--concurrency and --requests must be ≥ 1 and --timeout-s > 0")
    if not args.audio.is_file():
        parser.error(f"no such file: {args.audio}")
    results = asyncio.run(run(args))
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
