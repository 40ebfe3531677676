"""Sequential mode with and without `vad_filter` (faster-whisper's): wall time, WER and text.

Files: the dev set's 52 s long-form recording (LJ Speech, 8 sentences with their short pauses; reference
beside it), and two synthetic ones of about 2 minutes: the dev set's English clips with references in a
seeded order, each after a pause filled with Gaussian noise at about -60 dBFS RMS (room tone: digital zeros
would be skipped undecoded by sequential mode's silence gate, with or without the filter), of 3-12 s (about
half the file is pauses) or of 15-30 s (about three quarters). WER: Whisper's English normaliser and jiwer,
as bench/accuracy.py. Each file runs `--repeats` times with and without the filter, taking turns, after one
warm-up transcription; the median wall time is reported (audio already decoded).

`--faster-whisper` adds faster-whisper itself on the same files (same CTranslate2 weights, beam 1, English,
its vad_filter defaults) and compares its speech regions (`get_speech_timestamps`, silero v6 in onnxruntime)
with HalkSpeech's (vad_filter.FILTER_VAD over halkspeech.audio.vad).

Run:   PYTHONPATH=src python bench/vad_filter.py [--model tiny.en] [--device cpu] [--repeats 5]
           [--faster-whisper] [--json bench/results/vad_filter_tiny_en_cpu.json]
       Needs the dev set at ../shared/data/dev. About 4 minutes for tiny.en on 2 CPU cores with
       --faster-whisper.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jiwer
import numpy as np
import torch
from whisper.normalizers import EnglishTextNormalizer

from halkspeech.audio import decode_audio
from halkspeech.bench.common import device_info, print_table, write_json
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import load_weights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript
from halkspeech.transcription.vad_filter import find_speech

DEV_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev"
LONGFORM = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
_english = EnglishTextNormalizer()
T = TypeVar("T")


@dataclass(frozen=True)
class File:
    name: str
    audio: np.ndarray
    reference: str


def pauses_file(name: str, dev_dir: Path, pause_s: tuple[float, float], seconds: float = 120.0, seed: int = 0) -> File:
    """English dev clips with references, each after a pause of -60 dBFS noise (uniform in `pause_s`), until
    `seconds`."""
    rows = [json.loads(line) for line in (dev_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["text"] and r["language"] == "en"]
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    for i in rng.permutation(len(rows)):
        pause = (rng.standard_normal(int(rng.uniform(*pause_s) * SAMPLE_RATE)) * 1e-3).astype(np.float32)
        clip = decode_audio(dev_dir / rows[i]["audio"])
        if total + len(pause) + len(clip) > seconds * SAMPLE_RATE:
            break
        pieces += [pause, clip]
        texts.append(rows[i]["text"])
        total += len(pause) + len(clip)
    return File(name, np.concatenate(pieces), " ".join(texts))


def wer(reference: str, hypothesis: str) -> float:
    return float(jiwer.wer(_english(reference), _english(hypothesis) or "<empty>"))


def interleaved(runs: dict[bool, Callable[[], T]], repeats: int) -> dict[bool, tuple[float, T]]:
    """Each run `repeats` times, the settings taking turns (so that a slower spell of a shared machine
    falls on both): median wall seconds and the last result, torch seeded before each run."""
    walls: dict[bool, list[float]] = {key: [] for key in runs}
    last: dict[bool, T] = {}
    for _ in range(repeats):
        for key, run in runs.items():
            torch.manual_seed(0)
            started = time.perf_counter()
            last[key] = run()
            walls[key].append(time.perf_counter() - started)
    return {key: (statistics.median(walls[key]), last[key]) for key in runs}


def halkspeech_rows(model: ModelEngine, files: list[File], repeats: int) -> list[dict[str, Any]]:
    def run(audio: np.ndarray, vad_filter: bool) -> Callable[[], Transcript]:
        options = TranscribeOptions(language="en", vad_filter=vad_filter)
        return lambda: asyncio.run(Transcriber(model).transcribe(audio, options))

    run(files[0].audio, False)()  # warm-up
    rows = []
    for file in files:
        duration = len(file.audio) / SAMPLE_RATE
        speech = asyncio.run(find_speech(file.audio, model.device))
        results = interleaved({vf: run(file.audio, vf) for vf in (False, True)}, repeats)
        for vad_filter, (wall, t) in results.items():
            rows.append(
                {
                    "library": "halkspeech",
                    "file": file.name,
                    "vad_filter": vad_filter,
                    "audio_s": duration,
                    "kept_s": speech.kept_s if vad_filter else duration,
                    "wall_s": wall,
                    "rtfx": duration / wall,
                    "vad_ms": t.timings.vad,
                    "wer": wer(file.reference, t.text),
                    "segments": len(t.segments),
                    "first_start": t.segments[0].start if t.segments else None,
                    "text": t.text.strip(),
                }
            )
    return rows


def faster_whisper_rows(model_dir: Path, files: list[File], device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """faster-whisper on the same files and weights (beam 1, English), and its regions against ours."""
    from faster_whisper import WhisperModel
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    fw = WhisperModel(str(model_dir), device="cpu", compute_type="float32")

    def run(audio: np.ndarray, vad_filter: bool) -> Callable[[], str]:
        # segments come from a generator: the work happens in the join
        return lambda: "".join(
            s.text for s in fw.transcribe(audio, language="en", beam_size=1, vad_filter=vad_filter)[0]
        )

    run(files[0].audio, False)()  # warm-up
    rows = []
    for file in files:
        duration = len(file.audio) / SAMPLE_RATE
        theirs = [(c["start"], c["end"]) for c in get_speech_timestamps(file.audio, VadOptions())]
        ours = list(asyncio.run(find_speech(file.audio, device)).spans)
        results = interleaved({vf: run(file.audio, vf) for vf in (False, True)}, repeats)
        for vad_filter, (wall, text) in results.items():
            row: dict[str, Any] = {
                "library": "faster-whisper",
                "file": file.name,
                "vad_filter": vad_filter,
                "audio_s": duration,
                "wall_s": wall,
                "rtfx": duration / wall,
                "wer": wer(file.reference, text),
                "text": text.strip(),
            }
            if vad_filter:
                row |= {
                    "kept_s": sum(b - a for a, b in theirs) / SAMPLE_RATE,
                    "regions": len(theirs),
                    "halkspeech_regions": len(ours),
                    "max_edge_diff_s": _edge_diff(theirs, ours),
                }
            rows.append(row)
    return rows


def _edge_diff(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> float | None:
    """Largest difference (s) between matching region edges; None when the counts differ."""
    if len(a) != len(b):
        return None
    return (
        max((abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)), default=0) / SAMPLE_RATE
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faster-whisper", action="store_true", help="also run faster-whisper on the same files")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    files = [File("longform_lj_52s", decode_audio(LONGFORM), LONGFORM.with_suffix(".txt").read_text().strip())]
    files.append(pauses_file("pauses_3-12s", DEV_DIR, (3, 12)))
    files.append(pauses_file("pauses_15-30s", DEV_DIR, (15, 30)))
    model_dir = ModelRegistry(ModelSettings()).resolve(args.model)
    model = start_engine(load_weights(model_dir), EngineSettings(device=args.device))
    try:
        rows = halkspeech_rows(model, files, args.repeats)
        if args.faster_whisper:
            rows += faster_whisper_rows(model_dir, files, model.device, args.repeats)
        device = device_info(model.device)
    finally:
        model.close()
    columns = [
        ("library", "library"),
        ("file", "file"),
        ("vad_filter", "vad_filter"),
        ("audio_s", "audio s"),
        ("kept_s", "kept s"),
        ("wall_s", "wall s"),
        ("rtfx", "RTFx"),
        ("vad_ms", "VAD ms"),
        ("wer", "WER"),
        ("first_start", "1st seg s"),
        ("regions", "regions"),
        ("halkspeech_regions", "ours"),
        ("max_edge_diff_s", "max edge Δ s"),
    ]
    print_table(rows, columns, title=f"vad_filter, sequential mode, {args.model} on {args.device}")
    for row in rows:
        print(f"\n[{row['library']} {row['file']} vad_filter={row['vad_filter']}] {row['text']}")
    write_json(args.json, {"model": args.model, "device": device, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
