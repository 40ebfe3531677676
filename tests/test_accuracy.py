"""Accuracy on the dev set: English corpus WER equal to the reference's and within honest bounds; the
multilingual clips (base) detected as their language and transcribed in it.

Same runs as test_parity.py (greedy, CPU, float32, computed once per session in parity_runs.py).
"""

from __future__ import annotations

from typing import Any

import jiwer
import pytest
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from halkspeech.engine.factory import ModelEngine
from halkspeech.model.weights import LoadedWeights
from parity_runs import ClipRun, reference_clips, runs

# Measured 2026-11-21 (CPU, float32, greedy; equal for openai-whisper and faster-whisper, bench/accuracy.py):
# corpus WER of the 23 English clips tiny.en 0.037, base 0.037 (15 errors in 410 words each, on different
# clips); the 52 s long-form file 0.023 for both (3 in 128). Bounds leave a margin, yet catch a broken decoder.
WER_BOUNDS = {"tiny.en": 0.06, "base": 0.06}
LONGFORM_WER_BOUND = 0.05
# Character error rate per multilingual clip with base, after normalising (see cer); measured 2026-11-21:
# de 0.082, es 0.186, fr 0.043, it 0.161, pt 0.000, ja 0.100, ko 0.211.
CER_BOUND = 0.3
MULTILINGUAL = [c["id"] for c in reference_clips() if c["language"] != "en"]

_english = EnglishTextNormalizer()
_basic = BasicTextNormalizer()


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over all clips at once (errors / reference words), Whisper's English normaliser."""
    return jiwer.wer([_english(r) for r in references], [_english(h) or "<empty>" for h in hypotheses])


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate without spaces or punctuation: comparable across scripts, Japanese included."""
    ref, hyp = ("".join(_basic(t).split()) for t in (reference, hypothesis))
    return jiwer.cer(ref, hyp or "<empty>")


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def model_runs(request: pytest.FixtureRequest, dev_clips: list[dict[str, Any]]) -> tuple[str, dict[str, ClipRun]]:
    # dev_clips: skips where ../shared/data/dev is not beside the checkout (the runs read it themselves)
    prefix = request.param.replace(".", "_")
    engine: ModelEngine = request.getfixturevalue(f"{prefix}_engine")
    return request.param, runs(request.getfixturevalue(f"{prefix}_weights"), engine)


def _english_clips(model_runs: dict[str, ClipRun]) -> list[ClipRun]:
    return [r for r in model_runs.values() if r.clip["language"] == "en" and r.clip["id"] != "longform_lj"]


def test_english_wer_equals_reference_and_is_bounded(model_runs: tuple[str, dict[str, ClipRun]]) -> None:
    name, by_id = model_runs
    clips = _english_clips(by_id)
    assert len(clips) == 23
    references = [r.clip["text"] for r in clips]
    ours = corpus_wer(references, [r.ours.text for r in clips])
    theirs = corpus_wer(references, [r.ref_text for r in clips])
    assert ours == theirs
    assert ours < WER_BOUNDS[name]


def test_longform_wer_is_bounded(model_runs: tuple[str, dict[str, ClipRun]]) -> None:
    _, by_id = model_runs
    run = by_id["longform_lj"]
    assert len(run.ours.segments) > 4  # several windows' worth of segments, not one cut-off line
    assert corpus_wer([run.clip["text"]], [run.ours.text]) < LONGFORM_WER_BOUND


@pytest.mark.parametrize("clip_id", MULTILINGUAL)
def test_multilingual_detected_and_transcribed_in_language(
    base_weights: LoadedWeights, base_engine: ModelEngine, clip_id: str
) -> None:
    run = runs(base_weights, base_engine)[clip_id]
    assert run.ours.language == run.clip["language"]
    assert run.ours.language_probs is not None
    assert max(run.ours.language_probs, key=run.ours.language_probs.__getitem__) == run.clip["language"]
    assert cer(run.clip["text"], run.ours.text) < CER_BOUND
