"""One engine per GPU (engine.device_index): which engine a request gets, device checks, start and stop.

A CPU runs one engine in production; here two CPU engines of the real tiny.en stand in for two GPUs, so the
routing runs against real engines and real work (test_replicas_cuda.py runs two real GPUs where there are)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import JFK_TEXT
from halkspeech.audio import decode_audio
from halkspeech.cli import main
from halkspeech.config import EngineSettings, ModelSettings, Settings
from halkspeech.engine import factory
from halkspeech.engine.factory import ModelEngine, Replicas, resolve_devices, start_engine, start_engines
from halkspeech.engine.pool import ModelPool
from halkspeech.errors import InvalidRequest
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript


def words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalpha() or c.isspace()).split()


@pytest.fixture
def two(tiny_en_weights: LoadedWeights) -> Iterator[Replicas]:
    engines = Replicas([start_engine(tiny_en_weights, EngineSettings(device="cpu", max_slots=4)) for _ in range(2)])
    yield engines
    engines.close()


def test_requests_that_start_together_spread_over_the_engines(two: Replicas) -> None:
    first, second = two.take(), two.take()
    assert first is not second  # nothing submitted yet: the hold alone counts
    third = two.take()
    two.release(first)
    assert two.pick() is first  # one holder against two
    for model in (second, third):
        two.release(model)
    assert two.pick() is two.first  # a tie goes to the first


def test_the_engine_with_queued_windows_is_avoided(two: Replicas, jfk_path: Path) -> None:
    busy, idle = two.models
    done = asyncio.run(_transcribe_while_picking(busy, two, jfk_path))
    assert words(done.text) == words(JFK_TEXT)  # the work itself is real
    assert idle.engine.stats.admitted == 0


async def _transcribe_while_picking(busy: ModelEngine, engines: Replicas, path: Path) -> Transcript:
    task = asyncio.create_task(Transcriber(busy).transcribe(decode_audio(path), TranscribeOptions(language="en")))
    while busy.engine.running + busy.engine.queue_depth == 0:
        await asyncio.sleep(0.001)
    assert engines.pick() is engines.models[1]  # busy has a window in a slot or queued, the other none
    return await task


def test_a_stopped_engine_gets_no_requests(two: Replicas) -> None:
    two.first.engine.stop()
    assert two.alive  # the other serves on: reloading the model would fail what it is decoding
    assert two.take() is two.models[1] and two.take() is two.models[1]
    two.models[1].engine.stop()
    assert not two.alive  # now the pool loads the model again on the next request


def test_the_pool_holds_one_engine_per_request_and_lists_every_engine(two: Replicas, jfk_path: Path) -> None:
    settings = Settings(model=ModelSettings(default="tiny.en", allow_download=False))
    pool = ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: two)

    async def run() -> None:
        audio = decode_audio(jfk_path)
        async with pool.use("tiny.en") as a, pool.use("whisper-1") as b:
            assert {id(a), id(b)} == {id(m) for m in two.models}
            texts = await asyncio.gather(
                *(Transcriber(m).transcribe(audio, TranscribeOptions(language="en")) for m in (a, b))
            )
            assert texts[0].text == texts[1].text
        (loaded,) = pool.loaded()
        assert loaded.replicas is two and loaded.users == 0 and not two.busy
        await pool.unload("tiny.en")
        assert not two.alive  # unloading stops every engine

    asyncio.run(run())
    assert all(m.engine.stats.completed >= 1 for m in two.models)


def test_transcribe_spreads_files_over_the_engines(
    two: Replicas, jfk_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("halkspeech.cli.transcribe.start_engines", lambda weights, settings: two)
    monkeypatch.setattr(two, "close", lambda: None)  # the fixture stops them after the checks
    assert main(["transcribe", "--model", "tiny.en", "--no-progress", str(jfk_path), str(jfk_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and words(lines[0]) == words(JFK_TEXT)
    assert [m.engine.stats.completed for m in two.models] == [1, 1]


def test_a_cpu_runs_one_engine_whatever_the_indexes() -> None:
    assert resolve_devices("cpu", (0, 1)) == (torch.device("cpu"),)


def test_an_index_this_machine_lacks_is_refused_by_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda", (1, 0)) == (torch.device("cuda", 1), torch.device("cuda", 0))
    with pytest.raises(InvalidRequest, match="asks for GPU 2, but this machine has 2"):
        resolve_devices("auto", (0, 2))


def test_engines_already_started_stop_when_a_later_one_fails(
    tiny_en_weights: LoadedWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[ModelEngine] = []

    def start(weights: LoadedWeights, settings: EngineSettings, *, device: torch.device) -> ModelEngine:
        if started:
            raise torch.OutOfMemoryError("CUDA out of memory")
        started.append(start_engine(weights, settings, device=torch.device("cpu")))
        return started[-1]

    monkeypatch.setattr(factory, "resolve_devices", lambda setting, indexes: (torch.device("cpu"),) * 2)
    monkeypatch.setattr(factory, "start_engine", start)
    with pytest.raises(torch.OutOfMemoryError):
        start_engines(tiny_en_weights, EngineSettings(device="cpu"))
    assert len(started) == 1 and not started[0].engine.alive


def test_the_pool_serves_on_when_one_engine_stops(two: Replicas) -> None:
    settings = Settings(model=ModelSettings(default="tiny.en", allow_download=False))
    loads: list[str] = []
    pool = ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: loads.append(key) or two)

    async def run() -> None:
        async with pool.use("tiny.en"):
            pass
        two.first.engine.stop()
        for _ in range(2):
            async with pool.use("tiny.en") as model:
                assert model is two.models[1]
        assert loads == ["tiny.en"]  # no reload: it would have stopped the engine that still works

    asyncio.run(run())


def test_a_cancelled_or_timed_out_request_gives_its_engine_back(two: Replicas, jfk_path: Path) -> None:
    """The hold ends with the request however it ends: a client that left (cancelled) or a request timeout."""
    settings = Settings(model=ModelSettings(default="tiny.en", allow_download=False))
    pool = ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: two)
    audio = decode_audio(jfk_path)

    async def transcribe() -> None:
        async with pool.use("tiny.en") as model:
            await Transcriber(model).transcribe(audio, TranscribeOptions(language="en"))

    async def run() -> None:
        task = asyncio.create_task(transcribe())
        while not any(m.engine.running + m.engine.queue_depth for m in two.models):
            await asyncio.sleep(0.001)
        assert two.busy
        task.cancel()
        await asyncio.wait({task})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await transcribe()
        for _ in range(2000):  # the engines drop the cancelled windows at their next step
            if not any(m.engine.running + m.engine.queue_depth for m in two.models):
                break
            await asyncio.sleep(0.005)
        (loaded,) = pool.loaded()
        assert loaded.users == 0 and not two.busy  # busy counts the holds too

    asyncio.run(run())
