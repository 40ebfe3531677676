"""Lost speech in long audio: a sentence, a pause, more speech, in one 30 s chunk. Does each mode keep both?

Each case is built from real English dev recordings with references: an optional lead-in clip and 1 s of
silence (so that the pair sits later in its VAD chunk), clip A, a gap of `--gaps` seconds (digital silence, or
Gaussian noise at about -50 dBFS RMS), then clip B. Each case is transcribed by each model in each mode
(greedy, temperature fallback as served, English), one case at a time with torch's RNG seeded per case, so
two runs of one tree give the same transcripts. For every source clip the script counts how many of its
reference words the transcript holds (Whisper's English normaliser, a word-level alignment of the whole
transcript against the case's reference words): a clip is *lost* when less than half of its words are
there. A case's WER (over all of its reference words) and its inserted words are reported too, so a change
that finds lost speech by inventing words shows up.

Run:   PYTHONPATH=src python bench/lost_speech.py [--models tiny.en,base] [--modes batched,sequential]
           [--gaps 2,3,5,8] [--fills silence,noise] [--leads none,short,long] [--pairs 0-3] [--json out.json]
           [--segments]   (print the segments of every case that lost a clip)
       ~64 cases a model by default; on 2 CPU cores about 3 min (tiny.en) and 7 min (base) for both modes.
       Needs the dev set at ../shared/data/dev.

`--dev` instead scores batched (or `--modes`) mode on the dev set: corpus WER of the 23 English clips with
references and of the 52 s long-form file, as bench/accuracy.py scores sequential mode; `--json` keeps the
texts so that two trees' outputs can be compared word for word.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from whisper.normalizers import EnglishTextNormalizer

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings, load_settings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import load_weights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

DEV_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev"
LONGFORM = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
CHAPTER = DEV_DIR / "longform" / "librispeech_422-122949_chapter_noref.mp3"  # 8.6 min, no reference
RATE = 16_000
NOISE_RMS = 10 ** (-50 / 20)  # -50 dBFS: a quiet room, well under speech, over the VAD's floor of nothing
LOST_BELOW = 0.5  # a clip with less than this share of its words found is lost
LEAD_PAUSE_S = 1.0

# (first, second) by manifest id: short and long first sentences, short and long later ones, three speakers
PAIRS = [
    ("ls_1089-134691-0000", "jfk_flac"),  # HE COULD WAIT NO LONGER (2.1 s) + 11 s
    ("ps_sense_and_sensibility_01_austen_64kb-0880", "lj_LJ001-0005"),  # 3.0 s + 8.1 s
    ("lj_LJ001-0004", "ls_1089-134686-0001"),  # 5.1 s + 3.3 s
    ("pv_test", "ps_sense_and_sensibility_01_austen_64kb-0870"),  # 5.9 s + 7.1 s
    ("ls_1089-134686-0001", "lj_LJ001-0006"),  # 3.3 s + 5.7 s
    ("lj_LJ001-0008", "ls_1221-135766-0002_triton"),  # has never been surpassed. (1.8 s) + 4.8 s
    ("ps_sense_and_sensibility_01_austen_64kb-0930", "ls_1089-134691-0001"),  # 3.3 s + 5.4 s
    ("ls_1221-135766-0002_triton", "ps_sense_and_sensibility_01_austen_64kb-0920"),  # 4.8 s + 6.1 s
    ("lj_LJ001-0002", "jfk_flac"),  # in being comparatively modern. (1.9 s) + 11 s
    ("ls_1089-134691-0000", "ps_sense_and_sensibility_01_austen_64kb-0890"),  # 2.1 s + 5.3 s
    ("lj_LJ001-0008", "lj_LJ001-0003"),  # 1.8 s + 9.7 s
    ("ls_1221-135766-0002_triton", "lj_LJ001-0008"),  # 4.8 s + a short later sentence (1.8 s)
    ("ps_sense_and_sensibility_01_austen_64kb-0930", "lj_LJ001-0002"),  # 3.3 s + 1.9 s
]
LEADS = {"none": None, "short": "lj_LJ001-0002", "long": "ls_1089-134686-0000"}  # 1.9 s, 10.4 s

normalise = EnglishTextNormalizer()


@dataclass(frozen=True)
class Clip:
    id: str
    text: str
    audio: np.ndarray


@dataclass(frozen=True)
class Case:
    name: str
    parts: tuple[str, ...]  # clip ids in order (lead-in, first, second)
    gap_s: float
    fill: str
    lead: str
    audio: np.ndarray
    spans: tuple[tuple[float, float], ...]  # each part's place in the audio (seconds)


@dataclass
class Outcome:
    case: str
    model: str
    mode: str
    recall: dict[str, float]  # clip id → share of its words found
    lost: list[str]
    wer: float
    inserted: int
    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    seconds: float = 0.0
    decodes: int = 0  # windows the engine decoded (fallback temperatures and resumed windows included)


def load_clips() -> dict[str, Clip]:
    rows = [json.loads(line) for line in (DEV_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: Clip(r["id"], r["text"], decode_audio(DEV_DIR / r["audio"])) for r in rows if r.get("text")}


def alias(clip_id: str) -> str:
    """A short name for a manifest id: ls_1089-134691-0000 → 1089-134691-0000, ps_…_64kb-0880 → ps-0880."""
    if clip_id.startswith("ps_"):
        return "ps-" + clip_id.rsplit("-", 1)[1]
    return clip_id.removesuffix("_triton").removesuffix("_flac").split("_", 1)[-1]


def build_case(clips: dict[str, Clip], pair: tuple[str, str], gap_s: float, fill: str, lead: str) -> Case:
    rng = np.random.default_rng(int(gap_s * 10) + 7)  # the same noise in every run
    pieces: list[np.ndarray] = []
    parts: list[str] = []
    spans: list[tuple[float, float]] = []

    def add(clip_id: str) -> None:
        at = sum(len(p) for p in pieces) / RATE
        pieces.append(clips[clip_id].audio)
        parts.append(clip_id)
        spans.append((at, at + len(clips[clip_id].audio) / RATE))

    def pause(seconds: float, noisy: bool) -> None:
        n = round(seconds * RATE)
        pieces.append((rng.standard_normal(n) * NOISE_RMS).astype(np.float32) if noisy else np.zeros(n, np.float32))

    lead_id = LEADS[lead]
    if lead_id is not None:
        add(lead_id)
        pause(LEAD_PAUSE_S, fill == "noise")
    add(pair[0])
    pause(gap_s, fill == "noise")
    add(pair[1])
    name = f"{alias(pair[0])}+{alias(pair[1])} gap={gap_s:g} {fill} lead={lead}"
    return Case(name, tuple(parts), gap_s, fill, lead, np.concatenate(pieces), tuple(spans))


def cases_for(clips: dict[str, Clip], args: argparse.Namespace) -> list[Case]:
    lo, hi = (int(x) for x in args.pairs.split("-"))
    out = []
    for pair in PAIRS[lo : hi + 1]:
        for gap in (float(g) for g in args.gaps.split(",")):
            for fill in args.fills.split(","):
                for lead in args.leads.split(","):
                    out.append(build_case(clips, pair, gap, fill, lead))
    return out


def score(case: Case, clips: dict[str, Clip], text: str) -> tuple[dict[str, float], float, int]:
    """Share of each part's words found in the transcript, the case's WER, and words inserted."""
    ref_words: list[str] = []
    owner: list[str] = []
    for clip_id in case.parts:
        words = normalise(clips[clip_id].text).split()
        ref_words += words
        owner += [clip_id] * len(words)
    hyp_words = normalise(text).split()
    matcher = difflib.SequenceMatcher(a=ref_words, b=hyp_words, autojunk=False)
    found = {clip_id: 0 for clip_id in case.parts}
    matched = 0
    for block in matcher.get_matching_blocks():
        matched += block.size
        for k in range(block.size):
            found[owner[block.a + k]] += 1
    recall = {c: found[c] / max(1, owner.count(c)) for c in case.parts}
    wer = jiwer.wer(" ".join(ref_words), " ".join(hyp_words) or "<empty>")
    return recall, wer, len(hyp_words) - matched


def start_model(name: str) -> ModelEngine:
    directory = ModelRegistry(load_settings().model).resolve(name)
    return start_engine(load_weights(directory), EngineSettings(device="cpu"))


def transcribe(model: ModelEngine, audio: np.ndarray, mode: str) -> Transcript:
    torch.manual_seed(0)  # the temperature fallback samples from torch's global generator
    options = TranscribeOptions(language="en", mode=mode)  # type: ignore[arg-type]
    return asyncio.run(Transcriber(model).transcribe(audio, options))


def run_cases(args: argparse.Namespace) -> list[Outcome]:
    clips = load_clips()
    cases = cases_for(clips, args)
    print(
        f"{len(cases)} cases; durations {min(len(c.audio) for c in cases) / RATE:.1f}–"
        f"{max(len(c.audio) for c in cases) / RATE:.1f} s",
        flush=True,
    )
    outcomes = []
    for model_name in args.models.split(","):
        model = start_model(model_name)
        try:
            for mode in args.modes.split(","):
                started = time.perf_counter()
                for case in cases:
                    t0, completed = time.perf_counter(), model.engine.stats.completed
                    transcript = transcribe(model, case.audio, mode)
                    recall, wer, inserted = score(case, clips, transcript.text)
                    lost = [c for c in case.parts if recall[c] < LOST_BELOW]
                    segments = [(s.start, s.end, s.text) for s in transcript.segments]
                    outcomes.append(
                        Outcome(
                            case.name,
                            model_name,
                            mode,
                            recall,
                            lost,
                            wer,
                            inserted,
                            transcript.text,
                            segments,
                            time.perf_counter() - t0,
                            model.engine.stats.completed - completed,
                        )
                    )
                print(f"{model_name} {mode}: {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            model.close()
    return outcomes


def print_cases(outcomes: list[Outcome], show_segments: bool) -> None:
    groups = sorted({(o.model, o.mode) for o in outcomes})
    print()
    print(
        f"{'model':8} {'mode':10} {'cases':>5} {'lost':>4} {'first lost':>10} {'later lost':>10} "
        f"{'WER':>6} {'inserted':>8} {'decodes':>7}"
    )
    for model, mode in groups:
        rows = [o for o in outcomes if (o.model, o.mode) == (model, mode)]
        lost = [o for o in rows if o.lost]
        # the first of the pair is the second-to-last part, the later sentence the last
        first = sum(1 for o in rows if list(o.recall)[-2] in o.lost)
        later = sum(1 for o in rows if list(o.recall)[-1] in o.lost)
        wer = float(np.mean([o.wer for o in rows]))
        inserted = sum(o.inserted for o in rows)
        decodes = sum(o.decodes for o in rows)
        counts = f"{len(rows):5d} {len(lost):4d} {first:10d} {later:10d}"
        print(f"{model:8} {mode:10} {counts} {wer:6.3f} {inserted:8d} {decodes:7d}")
    print()
    for o in outcomes:
        if not o.lost:
            continue
        shares = " ".join(f"{r:.2f}" for r in o.recall.values())
        print(f"LOST {o.model:8} {o.mode:10} {o.case:60} recall {shares}  wer {o.wer:.2f}")
        if show_segments:
            for start, end, text in o.segments:
                print(f"       [{start:6.2f} → {end:6.2f}] {text}")


def print_diff(before: Path, after: Path) -> None:
    """Each (case, model, mode) run in both files whose transcript differs: lost clips and WER, both texts."""
    if "texts" in json.loads(before.read_text())[0]:
        print_dev_diff(before, after)
        return
    old = {(o["case"], o["model"], o["mode"]): o for o in json.loads(before.read_text())}
    changed = compared = 0
    for o in json.loads(after.read_text()):
        b = old.get((o["case"], o["model"], o["mode"]))
        compared += b is not None
        if b is None or b["text"] == o["text"]:
            continue
        changed += 1
        print(
            f"{o['model']:8} {o['mode']:10} {o['case']}: lost {b['lost']} → {o['lost']}, "
            f"WER {b['wer']:.3f} → {o['wer']:.3f}, inserted {b['inserted']} → {o['inserted']}"
        )
        print(f"    before: {b['text'].strip()}")
        print(f"    after:  {o['text'].strip()}")
    print(f"{changed} of {compared} runs in both files changed")


def print_dev_diff(before: Path, after: Path) -> None:
    """Two saved --dev runs: WER of each, and every file whose text differs."""
    old = {(r["model"], r["mode"]): r for r in json.loads(before.read_text())}
    for r in json.loads(after.read_text()):
        b = old[(r["model"], r["mode"])]
        print(
            f"{r['model']:8} {r['mode']:10} WER {b['wer']:.4f} → {r['wer']:.4f}, 52 s file {b['longform_wer']:.4f} → "
            f"{r['longform_wer']:.4f}, decodes {sum(b['decodes'].values())} → {sum(r['decodes'].values())}"
        )
        same = [c for c in r["texts"] if r["texts"][c] == b["texts"][c]]
        print(f"    {len(same)} of {len(r['texts'])} texts identical")
        for clip_id, text in r["texts"].items():
            if text != b["texts"][clip_id]:
                print(f"    {clip_id} before: {b['texts'][clip_id].strip()}")
                print(f"    {clip_id} after:  {text.strip()}")


# --- the dev set, for regressions --------------------------------------------------------------------------


def run_dev(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Corpus WER of the English dev clips and of the 52 s file per model and mode; the texts (and engine
    decodes) of each, the 8.6 min chapter without a reference included, for --diff."""
    rows = [json.loads(line) for line in (DEV_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    clips = [(r["id"], r["text"], DEV_DIR / r["audio"]) for r in rows if r.get("text") and r["language"] == "en"]
    clips.append(("longform_lj", LONGFORM.with_suffix(".txt").read_text().strip(), LONGFORM))
    clips.append(("longform_chapter", "", CHAPTER))
    refs = {clip_id: ref for clip_id, ref, _ in clips if ref}
    short = [c for c in refs if c != "longform_lj"]
    results = []
    for model_name in args.models.split(","):
        model = start_model(model_name)
        try:
            for mode in args.modes.split(","):
                texts, decodes = {}, {}
                for clip_id, _, path in clips:
                    completed = model.engine.stats.completed
                    texts[clip_id] = transcribe(model, decode_audio(path), mode).text
                    decodes[clip_id] = model.engine.stats.completed - completed
                wer = jiwer.wer([normalise(refs[c]) for c in short], [normalise(texts[c]) or "<empty>" for c in short])
                long_wer = jiwer.wer(normalise(refs["longform_lj"]), normalise(texts["longform_lj"]))
                results.append(
                    {
                        "model": model_name,
                        "mode": mode,
                        "clips": len(short),
                        "wer": wer,
                        "longform_wer": long_wer,
                        "texts": texts,
                        "decodes": decodes,
                    }
                )
                print(
                    f"{model_name:8} {mode:10} {len(short)} clips WER {wer:.4f}   52 s file WER {long_wer:.4f}   "
                    f"decodes {sum(decodes.values())} (8.6 min chapter {decodes['longform_chapter']})",
                    flush=True,
                )
        finally:
            model.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--modes", default="batched,sequential")
    parser.add_argument("--gaps", default="2,3,5,8", help="seconds between the two clips")
    parser.add_argument("--fills", default="silence,noise")
    parser.add_argument("--leads", default="none,long", help=f"of {','.join(LEADS)}")
    parser.add_argument("--pairs", default=f"0-{len(PAIRS) - 1}", help="a range of PAIRS, e.g. 0-3")
    parser.add_argument("--segments", action="store_true", help="print the segments of every lost case")
    parser.add_argument("--dev", action="store_true", help="score the dev set instead (see above)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--load", type=Path, nargs="+", help="print the table of saved --json runs instead")
    parser.add_argument("--diff", type=Path, nargs=2, help="two saved runs: the cases whose text differs")
    args = parser.parse_args()
    if args.diff:
        print_diff(*args.diff)
        return
    if args.load:
        print_cases([Outcome(**o) for path in args.load for o in json.loads(path.read_text())], args.segments)
        return
    if args.dev:
        payload: Any = run_dev(args)
    else:
        outcomes = run_cases(args)
        print_cases(outcomes, args.segments)
        payload = [asdict(o) for o in outcomes]
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
