"""`vad_filter` on the GPU against the CPU: the same file, the same weights, sequential mode with and without
the filter, fp16 on CUDA against float32 on the CPU.

The file is the committed English clips (jfk.flac, LJ001-0002.wav, 1089-134691-0000.flac) each after a
pause of -60 dBFS Gaussian noise (8 s, 25 s, 4 s; seeded), so that the filter cuts the long pause and keeps
the short ones. Reported per run: the text, the segments' start and end, the filter's kept seconds, the wall
time (after one warm-up run on each device); then whether the GPU's text equals the CPU's and how far apart
their segment times are (fp16 can move a timestamp token by a step or two, as bench/gpu_accuracy.py found).

Run (on a GPU machine):  PYTHONPATH=src python bench/gpu_vad_filter.py MODEL [--json OUT.json]
    MODEL: a model name in the cache or a model directory (real weights: tiny.en or base).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import load_weights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CLIPS = (("jfk.flac", 8.0), ("LJ001-0002.wav", 25.0), ("1089-134691-0000.flac", 4.0))


def pauses_file() -> np.ndarray:
    rng = np.random.default_rng(0)
    pieces = []
    for name, pause_s in CLIPS:
        pieces.append((rng.standard_normal(int(pause_s * SAMPLE_RATE)) * 1e-3).astype(np.float32))
        pieces.append(decode_audio(DATA / name))
    return np.concatenate(pieces)


def runs(model_dir: Path, device: str, audio: np.ndarray) -> dict[bool, dict[str, Any]]:
    engine = start_engine(load_weights(model_dir), EngineSettings(device=device))
    try:
        out: dict[bool, dict[str, Any]] = {}
        for vad_filter in (False, True):
            options = TranscribeOptions(language="en", vad_filter=vad_filter)
            asyncio.run(Transcriber(engine).transcribe(audio, options))  # warm-up
            started = time.perf_counter()
            t = asyncio.run(Transcriber(engine).transcribe(audio, options))
            out[vad_filter] = {
                "wall_s": round(time.perf_counter() - started, 3),
                "text": t.text.strip(),
                "segments": [(round(s.start, 2), round(s.end, 2)) for s in t.segments],
                "vad_ms": t.timings.vad,
            }
        return out
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--devices", default="cpu,cuda", help="the reference, then the device checked")
    args = parser.parse_args()
    reference, checked = args.devices.split(",")
    model_dir = ModelRegistry(ModelSettings()).resolve(args.model)
    audio = pauses_file()
    by_device = [runs(model_dir, device, audio) for device in (reference, checked)]
    rows = []
    name = torch.cuda.get_device_name(0) if checked == "cuda" else checked
    print(f"{len(audio) / SAMPLE_RATE:.1f} s file, {args.model}, {reference} against {name}")
    for vad_filter in (False, True):
        cpu, gpu = by_device[0][vad_filter], by_device[1][vad_filter]
        same_count = len(cpu["segments"]) == len(gpu["segments"])
        gap = (
            max(
                abs(a - b)
                for p, q in zip(cpu["segments"], gpu["segments"], strict=True)
                for a, b in zip(p, q, strict=True)
            )
            if same_count and cpu["segments"]
            else None
        )
        row = {"vad_filter": vad_filter, "same_text": cpu["text"] == gpu["text"], "max_segment_gap_s": gap}
        rows.append(row | {reference: cpu, checked: gpu})
        print(
            f"vad_filter={vad_filter!s:5}  same text {row['same_text']!s:5}  segments {len(cpu['segments'])}/"
            f"{len(gpu['segments'])}  max gap {gap}  wall {cpu['wall_s']} s, {gpu['wall_s']} s"
        )
        print(f"  {checked}: {gpu['text'][:160]}")
    if args.json:
        result = {"model": args.model, "device": name, "audio_s": len(audio) / SAMPLE_RATE, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
