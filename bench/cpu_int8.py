"""int8 weights on the CPU: the 52 s long-form file, float32 against int8, HalkSpeech and faster-whisper.

Sequential long-form (one row a step, the CLI's usual case for one file), greedy with the default fallback,
language given. Every variant is loaded once, then the rounds alternate between them (the 2-core VM drifts
by ±15% over minutes), and the median of the rounds is reported. faster-whisper (the `compare` extra) runs
the same CTranslate2 weights at compute_type float32 and int8, with as many threads as torch uses; it is
skipped when not installed. Accuracy of the same variants on the dev set: `bench/accuracy.py --dtype int8`.

Run: PYTHONPATH=src python bench/cpu_int8.py [--models base,tiny.en] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from halkspeech.audio import decode_audio
from halkspeech.bench.common import device_info, print_table, write_json
from halkspeech.bench.longform import DEV_DIR
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

LONGFORM = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
Run = Callable[[], str]  # transcribe the file once → its text


def halkspeech_variant(name: str, dtype: str, audio: Any) -> tuple[Run, Callable[[], None]]:
    registry = ModelRegistry(ModelSettings(allow_download=False))
    model = start_engine(registry.load(name), EngineSettings(device="cpu", dtype=dtype))  # type: ignore[arg-type]
    options = TranscribeOptions(language="en")

    def run() -> str:
        return asyncio.run(Transcriber(model).transcribe(audio, options)).text

    return run, model.close


def faster_whisper_variant(name: str, compute_type: str, audio: Any) -> tuple[Run, Callable[[], None]]:
    from faster_whisper import WhisperModel

    path = ModelRegistry(ModelSettings(allow_download=False)).resolve(name)
    model = WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=torch.get_num_threads())

    def run() -> str:
        segments, _ = model.transcribe(audio, language="en", beam_size=1)
        return "".join(s.text for s in segments)  # a generator: decoding happens here

    return run, lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="base,tiny.en")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    audio = decode_audio(LONGFORM)
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        print("faster-whisper is not installed (pip install -e '.[compare]'): HalkSpeech only")
        peers = ["halkspeech"]
    else:
        peers = ["halkspeech", "faster-whisper"]
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        variants: dict[tuple[str, str], tuple[Run, Callable[[], None]]] = {}
        for peer in peers:
            for dtype in ("float32", "int8"):
                make = halkspeech_variant if peer == "halkspeech" else faster_whisper_variant
                variants[peer, dtype] = make(name, dtype, audio)
                variants[peer, dtype][0]()  # warm-up: first-call allocations and thread pools
        times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
        texts: dict[tuple[str, str], str] = {}
        for round_ in range(args.rounds):
            for key, (run, _) in variants.items():
                started = time.perf_counter()
                texts[key] = run()
                times[key].append(time.perf_counter() - started)
            print(f"{name} round {round_ + 1}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.2f} s" for k, v in times.items()))
        for (peer, dtype), (_, close) in variants.items():
            close()
            seconds = statistics.median(times[peer, dtype])
            rows.append(
                {
                    "model": name,
                    "library": peer,
                    "dtype": dtype,
                    "seconds": round(seconds, 2),
                    "runs": [round(t, 2) for t in times[peer, dtype]],
                    "rtfx": round(audio.size / 16000 / seconds, 1),
                    "text": texts[peer, dtype],
                }
            )
    print_table(
        rows,
        [("model", "model"), ("library", "library"), ("dtype", "weights"), ("seconds", "median s"), ("rtfx", "RTFx")],
        title=f"\nThe {audio.size / 16000:.0f} s long-form file on the CPU ({torch.get_num_threads()} threads), "
        f"median of {args.rounds} alternating rounds",
    )
    write_json(args.json_path, {"device": device_info(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
