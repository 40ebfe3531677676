"""One engine per GPU on two real GPUs (skipped with fewer): each engine keeps its weights, caches and graphs on
its own device, and a file transcribed on either gives the same transcript as on the first alone.

Random tiny.en weights (no download on a GPU machine; what is tested does not depend on the values): sequential
mode forced to decode 40 tokens a window, so that there is text to compare; batched mode with word timings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import Replicas, start_engines
from halkspeech.model.weights import random_weights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")
CLIPS = Path(__file__).resolve().parents[1] / "data"


def _transcribe(engines: Replicas, index: int, options: TranscribeOptions) -> Transcript:
    audio = decode_audio(CLIPS / "jfk.flac")
    return asyncio.run(Transcriber(engines.models[index]).transcribe(audio, options))


def test_each_gpu_runs_its_own_engine_with_the_same_results() -> None:
    weights = random_weights("tiny.en", device="cuda:0")
    settings = EngineSettings(device="cuda", device_index=(1, 0), max_slots=16)
    engines = start_engines(weights, settings)
    try:
        assert [m.device for m in engines.models] == [torch.device("cuda", 1), torch.device("cuda", 0)]
        for model in engines.models:
            runner = model.engine.runner
            cache = runner.cache
            devices = {p.device for p in runner.model.parameters()} | {cache.self_kv.device, cache.cross_k.device}
            assert devices == {model.device}
        forced = TranscribeOptions(language="en", temperatures=(0.0,), force_decode_tokens=40, without_timestamps=True)
        on_1, on_0 = (_transcribe(engines, i, forced) for i in (0, 1))
        assert on_1.text and on_1.text == on_0.text
        words = TranscribeOptions(language="en", temperatures=(0.0,), mode="batched", word_timestamps=True)
        on_1, on_0 = (_transcribe(engines, i, words) for i in (0, 1))
        assert on_1.text == on_0.text
        assert [s.words for s in on_1.segments] == [s.words for s in on_0.segments]
        assert all(m.engine.stats.completed >= 2 for m in engines.models)
    finally:
        engines.close()
