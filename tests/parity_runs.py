"""The dev set transcribed once per model by HalkSpeech and by openai-whisper (the reference), shared by
test_parity.py and test_accuracy.py.

Greedy (temperature 0 only), CPU, float32, language detected, conditioned on previous text: the reference's
defaults. Both sides get the same samples from `halkspeech.audio.decode_audio` and the same weights. Ours
runs every clip at once through one engine, which also shows that batching does not change results. About
2.5 minutes per model on 2 CPU cores, so the results are cached for the session, whatever module asks first.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions

from conftest import DEV_DIR, dev_manifest
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

LONGFORM = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"
GREEDY = TranscribeOptions(temperatures=(0.0,))


def reference_clips() -> list[dict[str, Any]]:
    """Every dev clip with a reference text, plus the 52 s long-form concatenation (id `longform_lj`)."""
    clips = [row for row in dev_manifest() if row["text"] is not None]
    if clips and LONGFORM.exists():
        text = LONGFORM.with_suffix(".txt").read_text().strip()
        clips.append({"id": "longform_lj", "language": "en", "text": text, "path": LONGFORM})
    return clips


@dataclass(frozen=True)
class ClipRun:
    """One clip as both implementations transcribed it."""

    clip: dict[str, Any]  # manifest row: id, language, text (the human reference), path
    ours: Transcript
    ref_tokens: tuple[int, ...]  # every segment's tokens, timestamps included, concatenated
    ref_language: str
    ref_text: str


_RUNS: dict[str, dict[str, ClipRun]] = {}


def runs(weights: LoadedWeights, model: ModelEngine) -> dict[str, ClipRun]:
    """Clip id → both transcriptions, for this model; computed on the first call only."""
    if weights.name not in _RUNS:
        clips = reference_clips()
        audio = [decode_audio(clip["path"]) for clip in clips]
        ours = asyncio.run(_ours(model, audio))
        reference = reference_model(weights)
        theirs = [reference_tokens(reference, samples) for samples in audio]
        _RUNS[weights.name] = {clip["id"]: ClipRun(clip, o, *t) for clip, o, t in zip(clips, ours, theirs, strict=True)}
    return _RUNS[weights.name]


async def _ours(model: ModelEngine, audio: list[np.ndarray]) -> list[Transcript]:
    transcriber = Transcriber(model)
    return list(await asyncio.gather(*(transcriber.transcribe(samples, GREEDY) for samples in audio)))


def reference_model(weights: LoadedWeights) -> whisper.model.Whisper:
    model = whisper.model.Whisper(ModelDimensions(**weights.dims.as_dict()))
    model.load_state_dict({k: v.float() for k, v in weights.state_dict.items()})
    return model.eval()


def reference_tokens(model: whisper.model.Whisper, samples: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FP16 is not supported on CPU" and similar
        result = whisper.transcribe(model, torch.from_numpy(samples), temperature=0.0, fp16=False)
    tokens = tuple(t for segment in result["segments"] for t in segment["tokens"])
    return tokens, result["language"], result["text"]
