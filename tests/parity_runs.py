"""The dev set transcribed once per model by HalkSpeech and by openai-whisper (the reference), shared by
test_parity.py and test_accuracy.py.

Greedy (temperature 0 only), CPU, float32, language detected, conditioned on previous text: the reference's
defaults. Both sides get the same samples from `halkspeech.audio.decode_audio` and the same weights. Ours
runs every clip at once through one engine, which also shows that batching does not change results.

That is about 0.8 (tiny.en) and 2.5 minutes (base) on 2 CPU cores, so the runs happen once per session: in a
child process started with the session at the lowest CPU priority (`Background`, from conftest.py), which
does them while the other tests leave the cores idle (waiting on servers, sockets and timers), or else in
this process, whatever module asks first.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions

from conftest import DEV_DIR, dev_manifest
from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.model.weights import LoadedWeights, load_weights
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


class Background:
    """The runs of several models, one after another, in a child process at nice 19: each model's result
    is pickled into `folder` as it completes (the child: `python parity_runs.py FOLDER NAME=MODEL_DIR ...`)."""

    current: Background | None = None  # the session's, if conftest.py started one

    def __init__(self, models: dict[str, Path], folder: Path) -> None:
        self.folder, self.names = folder, list(models)
        self.log = folder / "child.log"
        with self.log.open("wb") as log:
            args = [f"{name}={path}" for name, path in models.items()]
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(folder), *args], stdout=log, stderr=subprocess.STDOUT
            )

    def result(self, name: str) -> dict[str, ClipRun]:
        """The model's runs, waiting for them; an error with the child's last output if it failed."""
        path = self.folder / f"{name}.pickle"
        while not path.exists():
            if self.process.poll() is not None and not path.exists():
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the parity runs' child exited {self.process.returncode}:\n{tail}")
            time.sleep(0.2)
        with path.open("rb") as f:
            runs: dict[str, ClipRun] = pickle.load(f)
        return runs

    def stop(self) -> None:
        """End the child if it is still running (a session that never asked for every model)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def runs(weights: LoadedWeights, model: ModelEngine) -> dict[str, ClipRun]:
    """Clip id → both transcriptions, for this model: the session's child's, or computed here with `model`."""
    if weights.name not in _RUNS:
        background = Background.current
        if background is not None and weights.name in background.names:
            _RUNS[weights.name] = background.result(weights.name)
        else:
            _RUNS[weights.name] = compute(weights, model)
    return _RUNS[weights.name]


def compute(weights: LoadedWeights, model: ModelEngine) -> dict[str, ClipRun]:
    clips = reference_clips()
    audio = [decode_audio(clip["path"]) for clip in clips]
    ours = asyncio.run(_ours(model, audio))
    reference = reference_model(weights)
    theirs = [reference_tokens(reference, samples) for samples in audio]
    return {clip["id"]: ClipRun(clip, o, *t) for clip, o, t in zip(clips, ours, theirs, strict=True)}


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


def _child(folder: Path, models: list[str]) -> None:
    os.nice(19)  # the other tests first: this process takes what they leave idle
    for spec in models:
        name, path = spec.split("=", 1)
        weights = load_weights(Path(path))
        model = start_engine(weights, EngineSettings(device="cpu"))  # as conftest.py's engines
        try:
            result = compute(weights, model)
        finally:
            model.close()
        partial = folder / f"{name}.partial"
        with partial.open("wb") as f:
            pickle.dump(result, f)
        partial.replace(folder / f"{name}.pickle")  # whole, or not there


if __name__ == "__main__":
    import parity_runs  # under its own name, so that the pickles name parity_runs.ClipRun, not __main__'s

    parity_runs._child(Path(sys.argv[1]), sys.argv[2:])
