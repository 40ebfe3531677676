"""Partials' committed words against real revisions: tiny.en's hypotheses of the English dev clips, each clip's
audio grown 0.4 s at a time from 1 s (as a WebSocket turn's partials), replayed through `StablePrefix` twice:
the committed words found in a new hypothesis by aligning letters (the code) and by counting words (before).

Counts partials with a word repeated next to itself, and the word errors of the text shown against the
hypothesis it came from (a perfect rule would differ only where the hypothesis revised a committed word).

  PYTHONPATH=src python bench/stable_prefix.py [--model tiny.en] [--json OUT.json] [--hypotheses DELTAS.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import jiwer

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription import live
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
STEP = 6400  # 0.4 s: the server's partial interval


async def hypotheses(model_name: str) -> dict[str, list[str]]:
    """Clip id → the greedy hypotheses of its audio's first 1 s, 1.4 s, … (the partials' options)."""
    rows = [json.loads(line) for line in (DEV / "manifest.jsonl").read_text().splitlines() if line.strip()]
    model = start_engine(ModelRegistry(ModelSettings()).load(model_name), EngineSettings(device="cpu"))
    options = TranscribeOptions(language="en", temperatures=(0.0,), condition_on_previous_text=False)
    out: dict[str, list[str]] = {}
    try:
        for row in (r for r in rows if r["language"] == "en" and r["text"]):
            audio = decode_audio(DEV / row["audio"])
            sizes = range(16_000, len(audio) + STEP, STEP)
            out[row["id"]] = [(await Transcriber(model).transcribe(audio[:n], options)).text.strip() for n in sizes]
    finally:
        model.close()
    return out


def timed(clip: list[str]) -> list[tuple[float, str]]:
    """A clip's non-empty hypotheses with the seconds of audio each heard (1 s, then 0.4 s more each)."""
    return [(1.0 + i * STEP / 16_000, h) for i, h in enumerate(clip) if h]


def replay(hyps: dict[str, list[str]], by_count: bool) -> dict[str, Any]:
    aligned = live._covered
    if by_count:
        live._covered = lambda units, stable: (len(stable), "")  # type: ignore[assignment]
    try:
        shown, heard, repeated = [], [], 0
        for clip in hyps.values():
            prefix = live.StablePrefix()
            for audio_s, hypothesis in timed(clip):
                text, _ = prefix.update(hypothesis, "en", audio_s)
                words = [live._norm(w) for w in text.split()]
                repeated += any(a == b != "" for a, b in itertools.pairwise(words))
                shown.append(" ".join(words))
                heard.append(" ".join(live._norm(w) for w in hypothesis.split()))
    finally:
        live._covered = aligned
    errors = jiwer.process_words(heard, shown)
    return {
        "partials": len(shown),
        "repeated_word": repeated,
        "wer_vs_hypothesis": round(errors.wer, 4),
        "dropped": errors.deletions,
        "replaced": errors.substitutions,
        "added": errors.insertions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hypotheses", type=Path, help="bench/realtime_deltas.py's JSON: its hypotheses, not decoded")
    args = parser.parse_args()
    if args.hypotheses:
        saved = json.loads(args.hypotheses.read_text())
        hyps, args.model = saved["hypotheses"], saved["model"]
    else:
        hyps = asyncio.run(hypotheses(args.model))
    rows = {"by letters (now)": replay(hyps, by_count=False), "by word count (before)": replay(hyps, by_count=True)}
    print(f"{'rule':>24} | partials | repeated word | WER vs hypothesis | dropped | replaced | added")
    for name, r in rows.items():
        print(
            f"{name:>24} | {r['partials']:8} | {r['repeated_word']:13} | {r['wer_vs_hypothesis']:17.4f} | "
            f"{r['dropped']:7} | {r['replaced']:8} | {r['added']:5}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "clips": len(hyps), "rules": rows}, indent=1))


if __name__ == "__main__":
    main()
