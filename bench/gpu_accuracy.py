"""Real weights on the GPU over the dev set: do batched and one-at-a-time greedy transcripts agree, and
does the WER equal the CPU float32 result?

  pack   (CPU)  decode the dev clips into an .npz of int16 audio, so the GPU box needs no PyAV
  run    (GPU)  transcribe them all at once (batched) and one at a time, in fp16 → JSON
  score  (CPU)  the same clips on the CPU in float32, then WER (Whisper's English normaliser) and
                transcript agreement for every run → a table and JSON

  python bench/gpu_accuracy.py pack OUT.npz
  PYTHONPATH=src python bench/gpu_accuracy.py run MODEL_DIR CLIPS.npz OUT.json      # on the GPU
  python bench/gpu_accuracy.py score MODEL_NAME CLIPS.npz GPU.json [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "dev"


def pack(out: Path) -> None:
    from halkspeech.audio import decode_audio

    rows = [json.loads(line) for line in (DEV / "manifest.jsonl").read_text().splitlines() if line.strip()]
    clips = {r["id"]: (DEV / r["audio"], r["text"], r["language"]) for r in rows if r["text"]}
    long = DEV / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
    clips["longform_52s"] = (long, long.with_suffix(".txt").read_text().strip(), "en")
    arrays = {cid: (decode_audio(path) * 32767).round().astype(np.int16) for cid, (path, _, _) in clips.items()}
    meta = {cid: {"text": text, "language": lang} for cid, (_, text, lang) in clips.items()}
    np.savez(out, meta=json.dumps(meta), **arrays)
    print(f"{len(arrays)} clips, {sum(a.size for a in arrays.values()) / 16000:.0f} s → {out}")


def _load(clips: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    data = np.load(clips)
    meta = json.loads(str(data["meta"]))
    return {k: data[k].astype(np.float32) / 32767 for k in meta}, meta


async def _transcribe_all(model: Any, audio: dict[str, np.ndarray], batched: bool) -> dict[str, Any]:
    from halkspeech.transcription.pipeline import Transcriber
    from halkspeech.transcription.types import TranscribeOptions

    transcriber, options = Transcriber(model), TranscribeOptions(temperatures=(0.0,))
    if batched:
        results = await asyncio.gather(*(transcriber.transcribe(a, options) for a in audio.values()))
    else:
        results = [await transcriber.transcribe(a, options) for a in audio.values()]
    return {
        cid: {"text": r.text, "tokens": list(r.tokens), "language": r.language}
        for cid, r in zip(audio, results, strict=True)
    }


def run(model_dir: Path, clips: Path, out: Path, device: str = "cuda") -> dict[str, Any]:
    from halkspeech.config import EngineSettings
    from halkspeech.engine.factory import start_engine
    from halkspeech.model.weights import load_weights

    audio, _ = _load(clips)
    weights = load_weights(model_dir)
    runs: dict[str, Any] = {}
    model = start_engine(weights, EngineSettings(device=device))  # type: ignore[arg-type]
    try:
        for batched in (True, False):
            started = time.perf_counter()
            runs[f"gpu-fp16-{'batched' if batched else 'one-at-a-time'}"] = {
                "transcripts": asyncio.run(_transcribe_all(model, audio, batched)),
                "seconds": time.perf_counter() - started,
            }
    finally:
        model.close()
    payload = {"model": weights.name, "device": device, "runs": runs}
    out.write_text(json.dumps(payload))
    return payload


def score(model_name: str, clips: Path, gpu_json: Path, json_out: Path | None) -> None:
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    from halkspeech.bench.common import print_table, write_json
    from halkspeech.config import EngineSettings, ModelSettings
    from halkspeech.engine.factory import start_engine
    from halkspeech.model.registry import ModelRegistry

    audio, meta = _load(clips)
    gpu = json.loads(gpu_json.read_text())
    model = start_engine(ModelRegistry(ModelSettings()).load(model_name), EngineSettings(device="cpu"))
    try:
        cpu = asyncio.run(_transcribe_all(model, audio, batched=True))
    finally:
        model.close()
    normalise = EnglishTextNormalizer()
    english = [cid for cid in meta if meta[cid]["language"] == "en"]

    def wer(transcripts: dict[str, Any]) -> float:
        refs = [normalise(meta[c]["text"]) for c in english]
        hyps = [normalise(transcripts[c]["text"]) for c in english]
        return 100 * jiwer.wer(refs, hyps)

    rows = [{"run": "cpu-float32", "wer": wer(cpu), "same_tokens_as_cpu": f"{len(cpu)}/{len(cpu)}"}]
    for name, result in gpu["runs"].items():
        t = result["transcripts"]
        same = sum(t[c]["tokens"] == cpu[c]["tokens"] for c in cpu)
        rows.append(
            {"run": name, "wer": wer(t), "same_tokens_as_cpu": f"{same}/{len(cpu)}", "seconds": result["seconds"]}
        )
    batched, alone = gpu["runs"].get("gpu-fp16-batched"), gpu["runs"].get("gpu-fp16-one-at-a-time")
    agree = (
        sum(batched["transcripts"][c]["tokens"] == alone["transcripts"][c]["tokens"] for c in cpu)
        if batched and alone
        else 0
    )
    title = f"{model_name} on the dev set ({len(english)} English clips scored; {len(cpu)} clips in all), greedy"
    table = print_table(
        rows, [("run", "run"), ("wer", "WER %"), ("same_tokens_as_cpu", "tokens = CPU"), ("seconds", "s")], title=title
    )
    print(f"GPU fp16 batched vs one at a time: identical tokens on {agree}/{len(cpu)} clips")
    write_json(
        json_out, {"model": model_name, "rows": rows, "batched_equals_alone": f"{agree}/{len(cpu)}", "table": table}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("model_dir", type=Path)
    r.add_argument("clips", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--device", default="cuda")
    s = sub.add_parser("score")
    s.add_argument("model")
    s.add_argument("clips", type=Path)
    s.add_argument("gpu_json", type=Path)
    s.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.out)
    elif args.cmd == "run":
        run(args.model_dir, args.clips, args.out, args.device)
    else:
        score(args.model, args.clips, args.gpu_json, args.json)


if __name__ == "__main__":
    main()
