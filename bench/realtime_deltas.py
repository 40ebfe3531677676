"""What streaming deltas cost in accuracy: the `/v1/realtime` transcript of an item (its deltas, which are never
taken back, then the rest of the final) against the final alone, on the English dev clips.

Each clip's partial hypotheses are bench/stable_prefix.py's (its audio grown 0.4 s at a time from 1 s, greedy,
as the server's partials); they go through `StablePrefix` and `AppendOnlyText` as in the realtime adapter,
then the final (the whole clip with the file defaults: temperature fallback) ends the item. WER against the
references with Whisper's English normaliser and jiwer, as bench/accuracy.py.

  PYTHONPATH=src python bench/realtime_deltas.py [--model tiny.en] [--json OUT.json] [--rescore OUT.json]
      [--agree-span-s S]

The JSON keeps every clip's hypotheses and final, so that `--rescore` scores them again without decoding
(after a change to StablePrefix or AppendOnlyText).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import jiwer
from whisper.normalizers import EnglishTextNormalizer

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription import live
from halkspeech.transcription.live import AppendOnlyText, StablePrefix
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions
from stable_prefix import DEV, hypotheses, timed  # bench/ is the script's directory

_english = EnglishTextNormalizer()


async def finals(model_name: str, ids: list[str]) -> dict[str, str]:
    rows = {r["id"]: r for r in map(json.loads, (DEV / "manifest.jsonl").read_text().splitlines()) if r}
    model = start_engine(ModelRegistry(ModelSettings()).load(model_name), EngineSettings(device="cpu"))
    try:
        options = TranscribeOptions(language="en")
        return {
            i: (await Transcriber(model).transcribe(decode_audio(DEV / rows[i]["audio"]), options)).text for i in ids
        }
    finally:
        model.close()


def streamed(partials: list[str], final: str) -> tuple[str, int]:
    """The item's transcript as the realtime adapter builds it (the deltas, then the final's rest), and how many
    of its words the deltas sent before the final."""
    prefix, text = StablePrefix(), AppendOnlyText()
    for audio_s, hypothesis in timed(partials):
        _, stable = prefix.update(hypothesis, "en", audio_s)
        text.grow(stable)
    early = len(text.sent.split())
    return text.finish(final.strip(), "en")[1], early


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rescore", type=Path, help="a JSON this script wrote: score its texts again")
    parser.add_argument(
        "--agree-span-s", type=float, default=live.AGREE_SPAN_S, help="live.AGREE_SPAN_S (0.4: two partials agree)"
    )
    args = parser.parse_args()
    live.AGREE_SPAN_S = args.agree_span_s
    if args.rescore:
        saved = json.loads(args.rescore.read_text())
        hyps, ends, args.model = saved["hypotheses"], saved["finals"], saved["model"]
    else:
        hyps = asyncio.run(hypotheses(args.model))
        ends = asyncio.run(finals(args.model, list(hyps)))
    references = {r["id"]: r["text"] for r in map(json.loads, (DEV / "manifest.jsonl").read_text().splitlines()) if r}
    refs = [_english(references[i]) for i in hyps]
    final_texts = [_english(ends[i]) for i in hyps]
    runs = {i: streamed(hyps[i], ends[i]) for i in hyps}
    stream_texts = [_english(runs[i][0]) for i in hyps]
    differ = [i for i, a, b in zip(hyps, final_texts, stream_texts, strict=True) if a != b]
    sent_early = sum(early for _, early in runs.values()) / sum(len(text.split()) for text, _ in runs.values())
    result = {
        "model": args.model,
        "clips": len(hyps),
        "wer_final": round(jiwer.wer(refs, final_texts), 4),
        "wer_streamed": round(jiwer.wer(refs, stream_texts), 4),
        "agree_span_s": args.agree_span_s,
        "words_sent_before_the_final": round(sent_early, 4),
        "clips_differing": len(differ),
        "differences": {i: {"final": ends[i].strip(), "streamed": runs[i][0]} for i in differ},
        "hypotheses": hyps,
        "finals": ends,
    }
    print(
        f"{args.model}, {len(hyps)} English dev clips: WER final {result['wer_final']:.2%}, streamed deltas + rest "
        f"{result['wer_streamed']:.2%}; {sent_early:.0%} of its words sent before the final; {len(differ)} clips differ"
    )
    for i, d in result["differences"].items():
        print(f"  {i}\n    final:    {d['final']}\n    streamed: {d['streamed']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
