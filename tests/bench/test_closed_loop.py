"""bench/closed_loop.py on the CPU: in-process clients in a closed loop through the routes' transcription call,
with the server's forced decode length. (Its timings are for GPUs and are never asserted here.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_DATA
from halkspeech.audio import decode_audio
from halkspeech.bench.closed_loop import ClosedLoad, closed_loop_figure
from halkspeech.config import EngineSettings
from halkspeech.model.weights import random_weights


def test_every_request_decodes_one_window_of_the_forced_length() -> None:
    audio = np.tile(decode_audio(TEST_DATA / "jfk.flac"), 3)[: 30 * 16000]  # one full window, as bench server's clip
    settings = EngineSettings(device="cpu", dtype="float32", max_slots=4, max_encoder_batch=2)
    load = ClosedLoad(concurrency=3, requests=7, warmup_requests=2, tokens=3)
    result = closed_loop_figure(random_weights("tiny", dtype=torch.float32), settings, audio, load)
    # the steps gave each of the 7 timed windows its 2 tokens after the prefill's: 7 windows, one each, forced
    assert result["tokens"] == 7 * 2
    assert result["windows_per_s"] == pytest.approx(7 / result["wall_s"])
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= 1000 * result["wall_s"]
    # 3 clients: never more than 3 rows in a step, nor more than the encoder batch (2) in a run
    assert 1 <= result["mean_encoder_batch"] <= 2 and 1 <= result["mean_decoder_batch"] <= 3
