"""The CPU decode step's logits, three ways, and base's CPU engine on the dev set (sessions 11 and 12).

1. Time [rows, D] @ W.T (F.linear) against [V, D] @ [D, rows], and at one row the vocabulary split in two
   halves of one batched product (whisper._cpu_vector_logits), for base's 51,865 × 512 token embedding.
2. With `devset`: every dev clip with a reference text and the 52 s long-form file through base's CPU engine at
   once (as tests/parity_runs.py does), printing the engine thread's phase times; run it on each side of a
   change to compare.
3. With `file`: the 52 s long-form file alone, sequential long-form (one row a step: the CLI's usual case),
   twice, printing the wall time and the decoder's.

Run: PYTHONPATH=src python bench/cpu_logits.py [devset|file]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from halkspeech.audio import decode_audio
from halkspeech.bench.longform import DEV_DIR as DEV  # ../shared/data/dev, or shared/ inside a copied tree
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import load_weights
from halkspeech.model.whisper import _cpu_vector_logits
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions


def ms(fn: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def orientations() -> None:
    weight = torch.randn(51865, 512)
    print(f"{'rows':>4} | x @ W.T ms | W @ x.T ms | halves ms")
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, 512)
        plain = min(ms(lambda: F.linear(x, weight)) for _ in range(3))  # noqa: B023 - called at once
        turned = min(ms(lambda: (weight @ x.T).T) for _ in range(3))  # noqa: B023
        halves = f"{min(ms(lambda: _cpu_vector_logits(x, weight)) for _ in range(3)):>9.1f}" if rows == 1 else "-"  # noqa: B023
        print(f"{rows:>4} | {plain:>10.1f} | {turned:>10.1f} | {halves:>9}", flush=True)


def devset() -> None:
    import json

    rows = [json.loads(line) for line in (DEV / "manifest.jsonl").read_text().splitlines() if line.strip()]
    paths = [DEV / r["audio"] for r in rows if r["text"] is not None]
    paths.append(DEV / "longform" / "ljspeech_LJ001-0001_0008_concat.wav")  # as the parity tests add it
    audio = [decode_audio(p) for p in paths]
    model = start_engine(load_weights(ModelRegistry(ModelSettings()).resolve("base")), EngineSettings(device="cpu"))
    greedy = TranscribeOptions(temperatures=(0.0,))

    async def everything() -> None:
        transcriber = Transcriber(model)
        await asyncio.gather(*(transcriber.transcribe(a, greedy) for a in audio))

    try:
        started = time.perf_counter()
        asyncio.run(everything())
        stats = model.engine.stats
        print(f"{len(audio)} clips in {time.perf_counter() - started:.1f} s; steps {stats.steps};", stats.phases())
    finally:
        model.close()


def one_file() -> None:
    audio = decode_audio(DEV / "longform" / "ljspeech_LJ001-0001_0008_concat.wav")
    model = start_engine(load_weights(ModelRegistry(ModelSettings()).resolve("base")), EngineSettings(device="cpu"))
    options = TranscribeOptions(language="en")
    try:
        for run in range(2):
            started = time.perf_counter()
            transcript = asyncio.run(Transcriber(model).transcribe(audio, options))
            wall = time.perf_counter() - started
            decoder = transcript.timings.decoder / 1000
            print(f"run {run}: {wall:.2f} s for {audio.size / 16000:.1f} s of audio; decoder {decoder:.2f} s")
    finally:
        model.close()


if __name__ == "__main__":
    orientations()
    if sys.argv[1:] == ["devset"]:
        devset()
    elif sys.argv[1:] == ["file"]:
        one_file()
