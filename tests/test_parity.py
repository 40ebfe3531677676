"""Reference parity: greedy decoding on CPU in float32 gives exactly openai-whisper's tokens and language, on
every dev clip with a reference text and the 52 s long-form file, for tiny.en and base."""

from __future__ import annotations

import pytest

from halkspeech.engine.factory import ModelEngine
from parity_runs import ClipRun, reference_clips, runs

CLIP_IDS = [clip["id"] for clip in reference_clips()]


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def model_runs(request: pytest.FixtureRequest) -> dict[str, ClipRun]:
    prefix = request.param.replace(".", "_")
    weights = request.getfixturevalue(f"{prefix}_weights")
    engine: ModelEngine = request.getfixturevalue(f"{prefix}_engine")
    return runs(weights, engine)


def test_dev_set_present() -> None:
    if not CLIP_IDS:
        pytest.skip("../shared/data/dev is not beside this checkout")
    assert len(CLIP_IDS) == 31  # 30 clips with references + the long-form file


@pytest.mark.parametrize("clip_id", CLIP_IDS)
def test_same_tokens_and_language_as_reference(model_runs: dict[str, ClipRun], clip_id: str) -> None:
    run = model_runs[clip_id]
    assert run.ours.language == run.ref_language
    assert list(run.ours.tokens) == list(run.ref_tokens)
    assert [t for s in run.ours.segments for t in s.tokens] == list(run.ref_tokens)
    assert run.ours.text == run.ref_text


def test_nonempty(model_runs: dict[str, ClipRun]) -> None:
    """Parity with an empty output on both sides would prove nothing."""
    assert all(len(run.ref_tokens) > 3 for run in model_runs.values())
