"""Accuracy of HalkSpeech, openai-whisper (the reference) and faster-whisper on the dev set, same weights.

Greedy decoding (beam 1, temperature 0 only, no fallback), each library's defaults otherwise (language
detection, conditioning on previous text, the same no-speech/log-prob/compression guards). All three read
the same CTranslate2 model directory from the HalkSpeech cache (faster-whisper directly; the other two
through HalkSpeech's loader) and get the same 16 kHz samples from `halkspeech.audio.decode_audio`.

Scored: corpus WER of the English dev clips with references and of the 52 s long-form file (Whisper's
English normaliser, jiwer), and for multilingual models the detected language and character error rate of
each non-English clip. `same tokens` counts clips whose tokens equal the reference's exactly.

Run:   python bench/accuracy.py [--models tiny.en,base] [--device cpu] [--dtype int8] [--json accuracy.json]
       (about 15 minutes for both models on 2 CPU cores; needs the dev set at ../shared/data/dev,
       `openai-whisper` and the `compare` extra: pip install -e '.[compare]')
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from halkspeech.audio import decode_audio
from halkspeech.bench.common import device_info, print_table, write_json
from halkspeech.config import EngineSettings, load_settings
from halkspeech.engine.factory import start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

DEV_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev"
LONGFORM = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
LIBRARIES = ("halkspeech", "openai-whisper", "faster-whisper")

_english = EnglishTextNormalizer()
_basic = BasicTextNormalizer()


@dataclass(frozen=True)
class Clip:
    id: str
    language: str
    reference: str
    audio: np.ndarray


@dataclass(frozen=True)
class Output:
    """One library's transcription of one clip."""

    text: str
    language: str
    tokens: tuple[int, ...]  # all segments' tokens, timestamps included


Transcribe = Callable[[list[Clip]], list[Output]]


# --- data and scores ---------------------------------------------------------------------------------------


def load_clips(dev_dir: Path) -> list[Clip]:
    """Every manifest clip with a reference text, then the long-form file (id `longform_lj`)."""
    rows = [json.loads(line) for line in (dev_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    clips = [Clip(r["id"], r["language"], r["text"], decode_audio(dev_dir / r["audio"])) for r in rows if r["text"]]
    reference = LONGFORM.with_suffix(".txt").read_text().strip()
    return [*clips, Clip("longform_lj", "en", reference, decode_audio(LONGFORM))]


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    return jiwer.wer([_english(r) for r in references], [_english(h) or "<empty>" for h in hypotheses])


def cer(reference: str, hypothesis: str) -> float:
    """Characters without spaces or punctuation, so that Japanese and Korean score alike."""
    ref, hyp = ("".join(_basic(t).split()) for t in (reference, hypothesis))
    return jiwer.cer(ref, hyp or "<empty>")


# --- the three libraries -----------------------------------------------------------------------------------


def halkspeech_runner(weights: LoadedWeights, device: str, dtype: str) -> Transcribe:
    """Every clip at once through one engine (how the server and CLI run them)."""

    def run(clips: list[Clip]) -> list[Output]:
        model = start_engine(weights, EngineSettings(device=device, dtype=dtype))  # type: ignore[arg-type]
        try:
            transcriber = Transcriber(model)
            options = TranscribeOptions(temperatures=(0.0,))

            async def all_clips() -> list[Any]:
                return await asyncio.gather(*(transcriber.transcribe(c.audio, options) for c in clips))

            return [Output(t.text, t.language, t.tokens) for t in asyncio.run(all_clips())]
        finally:
            model.close()

    return run


def openai_runner(weights: LoadedWeights, device: str, dtype: str) -> Transcribe:
    import whisper
    from whisper.model import ModelDimensions

    model = whisper.model.Whisper(ModelDimensions(**weights.dims.as_dict()))
    model.load_state_dict({k: v.float() for k, v in weights.state_dict.items()})
    model = model.to(device).eval()

    def run(clips: list[Clip]) -> list[Output]:
        outputs = []
        for clip in clips:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = whisper.transcribe(model, torch.from_numpy(clip.audio), temperature=0.0, fp16=dtype == "float16")
            outputs.append(Output(r["text"], r["language"], tuple(t for s in r["segments"] for t in s["tokens"])))
        return outputs

    return run


def faster_whisper_runner(model_dir: Path, device: str, dtype: str) -> Transcribe:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device=device, compute_type=dtype, cpu_threads=torch.get_num_threads())

    def run(clips: list[Clip]) -> list[Output]:
        outputs = []
        for clip in clips:
            segments, info = model.transcribe(clip.audio, beam_size=1, temperature=0.0)
            segments = list(segments)  # a generator: decoding happens here
            text = "".join(s.text for s in segments)
            outputs.append(Output(text, info.language, tuple(t for s in segments for t in s.tokens)))
        return outputs

    return run


# --- one model ----------------------------------------------------------------------------------------------


def evaluate(name: str, libraries: tuple[str, ...], clips: list[Clip], device: str, dtype: str) -> dict[str, Any]:
    registry = ModelRegistry(load_settings().model)
    weights = registry.load(name)
    runners: dict[str, Callable[[], Transcribe]] = {
        "halkspeech": lambda: halkspeech_runner(weights, device, dtype),
        "openai-whisper": lambda: openai_runner(weights, device, dtype),
        "faster-whisper": lambda: faster_whisper_runner(registry.resolve(name), device, dtype),
    }
    if not weights.dims.is_multilingual:
        clips = [c for c in clips if c.language == "en"]
    outputs: dict[str, list[Output]] = {}
    seconds: dict[str, float] = {}
    for library in libraries:
        runner = runners[library]()
        start = time.perf_counter()
        outputs[library] = runner(clips)
        seconds[library] = time.perf_counter() - start
        print(f"{name}: {library} done in {seconds[library]:.1f} s", flush=True)
    return {
        "model": name,
        "rows": [_score(name, lib, clips, outputs, seconds[lib]) for lib in libraries],
        "languages": _languages(name, clips, outputs) if weights.dims.is_multilingual else [],
        "outputs": {lib: {c.id: asdict(o) for c, o in zip(clips, outs, strict=True)} for lib, outs in outputs.items()},
    }


def _score(
    name: str, library: str, clips: list[Clip], outputs: dict[str, list[Output]], seconds: float
) -> dict[str, Any]:
    outs = outputs[library]
    english = [i for i, c in enumerate(clips) if c.language == "en" and c.id != "longform_lj"]
    longform = next(i for i, c in enumerate(clips) if c.id == "longform_lj")
    reference = outputs.get("openai-whisper")
    return {
        "model": name,
        "library": library,
        "wer_en": corpus_wer([clips[i].reference for i in english], [outs[i].text for i in english]),
        "wer_longform": corpus_wer([clips[longform].reference], [outs[longform].text]),
        "en_clips": len(english),
        "same_tokens": (
            f"{sum(o.tokens == r.tokens for o, r in zip(outs, reference, strict=True))}/{len(clips)}"
            if reference
            else None
        ),
        "seconds": seconds,
    }


def _languages(name: str, clips: list[Clip], outputs: dict[str, list[Output]]) -> list[dict[str, Any]]:
    rows = []
    for i, clip in enumerate(clips):
        if clip.language == "en":
            continue
        row: dict[str, Any] = {"model": name, "clip": clip.id, "language": clip.language}
        for library, outs in outputs.items():
            row[f"{library}_detected"] = outs[i].language
            row[f"{library}_cer"] = cer(clip.reference, outs[i].text)
        rows.append(row)
    return rows


# --- entry point --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny.en,base", help="comma-separated catalog names")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated subset of " + str(LIBRARIES))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "int8"),
        help="int8: HalkSpeech's int8 weights and faster-whisper's compute_type int8 (CPU); openai-whisper float32",
    )
    parser.add_argument("--dev-dir", type=Path, default=DEV_DIR)
    parser.add_argument("--json", dest="json_path", default=None, help="write results (and every output) here")
    args = parser.parse_args()
    libraries = tuple(x for x in args.libraries.split(",") if x)
    clips = load_clips(args.dev_dir)
    results = [evaluate(name, libraries, clips, args.device, args.dtype) for name in args.models.split(",") if name]
    rows = [row for r in results for row in r["rows"]]
    print_table(
        rows,
        [
            ("model", "model"),
            ("library", "library"),
            ("wer_en", "WER en (23 clips)"),
            ("wer_longform", "WER 52 s long-form"),
            ("same_tokens", "same tokens as reference"),
            ("seconds", f"wall s ({args.device})"),
        ],
        title=f"\nGreedy, temperature 0, {args.device} {args.dtype}; Whisper English normaliser; corpus WER",
    )
    languages = [row for r in results for row in r["languages"]]
    if languages:
        columns = [("model", "model"), ("clip", "clip"), ("language", "lang")]
        for lib in libraries:
            columns += [(f"{lib}_detected", f"{lib} detected"), (f"{lib}_cer", f"{lib} CER")]
        print_table(languages, columns, title="\nMultilingual clips: detected language and character error rate")
    write_json(args.json_path, {"device": device_info(torch.device(args.device)), "results": results})


if __name__ == "__main__":
    main()
