"""Many clients at once: concurrent requests share engine steps and get the transcripts they would get alone;
past the limits requests get 429 at once and every accepted one completes; a client that disconnects (plain
or streaming) or runs out of time leaves no engine work and no admission slot behind; a model is not unloaded
under requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.conftest import LiveServer, api_settings, live_server, wait_until
from conftest import JFK_TEXT, TEST_DATA, wav_bytes
from halkspeech.api.limits import AdmissionGate
from halkspeech.audio import decode_audio
from halkspeech.bench import server_bench
from halkspeech.engine.engine import Engine
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import Overloaded

CLIPS = (TEST_DATA / "LJ001-0002.wav", TEST_DATA / "1089-134691-0000.flac")  # 1.9 s and 2.1 s
LJ = CLIPS[0]


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def long_wav(path: Path, seconds: float, *, lead: Path | None = None) -> bytes:
    """A real recording repeated to `seconds`, as 16 kHz WAV: several windows of real speech. With `lead`,
    that clip and 20 s of silence come first: the first window decodes in a few tokens (a quick first delta)."""
    audio = decode_audio(path)
    samples = np.tile(audio, int(np.ceil(seconds * 16000 / len(audio))))[: int(seconds * 16000)]
    if lead is not None:
        samples = np.concatenate([decode_audio(lead), np.zeros(20 * 16000, np.float32), samples])
    return wav_bytes(samples)


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    with live_server(api_settings(), shared_tiny_en) as running:
        yield running


@pytest.fixture(scope="module")
def small_server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    with live_server(api_settings(max_concurrent_requests=2, max_queue_size=2), shared_tiny_en) as running:
        yield running


@pytest.fixture(scope="module")
def ninety_seconds(jfk_path: Path) -> bytes:
    return long_wav(jfk_path, 90.0)


@pytest.fixture(scope="module")
def quick_start(jfk_path: Path) -> bytes:
    return long_wav(jfk_path, 66.0, lead=LJ)


def wait_until_cancelled(engine: Engine, cancelled_before: int) -> None:
    """The engine counted a cancellation and holds no work. (Its thread frees the slots a moment before it
    counts, so an idle engine alone does not yet mean the counter is up to date.)"""
    wait_until(
        lambda: engine.stats.cancelled > cancelled_before and engine.running == 0 and engine.queue_depth == 0,
        60,
        "the engine cancelling the work and draining",
    )


async def post_all(url: str, files: list[tuple[str, bytes]]) -> list[tuple[int, httpx.Response]]:
    """Post every file at once; (completion order, response) in submission order."""
    done = 0

    async def one(client: httpx.AsyncClient, name: str, data: bytes) -> tuple[int, httpx.Response]:
        nonlocal done
        response = await client.post(url, files={"file": (name, data)}, data={"model": "whisper-1"})
        done += 1
        return done, response

    limits = httpx.Limits(max_connections=len(files))
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, name, data) for name, data in files))


def test_concurrent_requests_share_steps_and_match_sequential(server: LiveServer) -> None:
    url = f"{server.url}/v1/audio/transcriptions"
    engine = server.engine()
    alone: dict[str, list[str]] = {}
    steps_alone: dict[str, int] = {}
    for clip in CLIPS:
        before = engine.stats.steps
        response = httpx.post(url, files={"file": clip.open("rb")}, timeout=300)
        alone[clip.name] = words_of(response.json()["text"])
        steps_alone[clip.name] = engine.stats.steps - before
    files = [(CLIPS[i % 2].name, CLIPS[i % 2].read_bytes()) for i in range(16)]
    before_steps, before_batches = engine.stats.steps, Counter(engine.stats.decode_batches)
    results = asyncio.run(post_all(url, files))
    steps = engine.stats.steps - before_steps
    batches = Counter(engine.stats.decode_batches) - before_batches
    for (name, _), (_, response) in zip(files, results, strict=True):
        assert response.status_code == 200 and words_of(response.json()["text"]) == alone[name], name
    one_at_a_time = sum(steps_alone[name] for name, _ in files)
    assert steps < one_at_a_time / 2, (steps, one_at_a_time)
    assert max(batches) > 1 and sum(size * n for size, n in batches.items()) > sum(batches.values())


def test_overload_gets_429_at_once_and_accepted_ones_complete(small_server: LiveServer) -> None:
    gate = small_server.app.state.halkspeech.gate
    rejected_before = gate.rejected
    results = asyncio.run(post_all(f"{small_server.url}/v1/audio/transcriptions", [(LJ.name, LJ.read_bytes())] * 10))
    statuses = Counter(r.status_code for _, r in results)
    assert set(statuses) <= {200, 429} and statuses[429] >= 1 and statuses[200] >= 2, statuses
    for _, response in results:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1  # ≥ 1 s: how long this module's requests held slots
            assert (
                response.json()["error"]["code"] == "overloaded"
                and "at capacity" in response.json()["error"]["message"]
            )
        else:
            assert words_of(response.json()["text"]) == ["in", "being", "comparatively", "modern"]
    # "At once": every refusal arrived before the first accepted request finished (order, not wall time).
    first_ok = min(order for order, r in results if r.status_code == 200)
    assert all(order < first_ok for order, r in results if r.status_code == 429)
    assert gate.rejected - rejected_before == statuses[429] and gate.active == 0 and gate.waiting == 0


def test_metrics_split_a_requests_time_into_its_stages(server: LiveServer, jfk_path: Path) -> None:
    """halkspeech_request_stage_seconds: one request's admission wait, decode and transcription, inside the
    server's own HTTP duration for it, as `bench server` reads them (its means from two scrapes)."""
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": jfk_path.open("rb")}, timeout=300)
    assert response.status_code == 200
    means = server_bench._batch_means(before, httpx.get(f"{server.url}/metrics", timeout=30).text)
    stages = [means["admission_ms"], means["decode_ms"], means["transcribe_ms"]]
    assert all(ms is not None and ms >= 0 for ms in stages) and means["transcribe_ms"] > means["decode_ms"] > 0
    assert means["http_ms"] is not None and means["http_ms"] >= sum(s for s in stages if s is not None)


def test_retry_after_follows_how_long_requests_hold_their_slots() -> None:
    """Two slots, no queue: until a request has ended a 429 asks for retry_after_s; after requests held their
    slot 60 s each, for 30 s (a place frees about every 60 / 2 s); at most 60 s; back to the floor once they
    take 0.1 s."""
    now = [0.0]
    gate = AdmissionGate(2, 0, retry_after_s=1.0, clock=lambda: now[0])

    async def refusal() -> int:
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.admit():
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0)  # both slots taken
        with pytest.raises(Overloaded) as refused:
            async with gate.admit():
                pass
        release.set()
        await asyncio.gather(*holders)  # they end at `now`: held 0 s, as the fake clock did not move
        assert f"retry after {refused.value.retry_after} s" in str(refused.value)
        return int(refused.value.retry_after)

    async def requests(count: int, seconds: float) -> None:
        for _ in range(count):
            async with gate.admit():
                now[0] += seconds

    async def main() -> None:
        assert await refusal() == 1
        await requests(20, 60.0)
        assert await refusal() == 30
        await requests(20, 1000.0)
        assert await refusal() == 60
        await requests(40, 0.1)  # 1000 s × 0.8 ** 40 ≈ 0.1 s
        assert await refusal() == 1

    asyncio.run(main())


def test_disconnect_cancels_the_work(server: LiveServer, ninety_seconds: bytes) -> None:
    engine = server.engine()
    gate = server.app.state.halkspeech.gate
    cancelled_before, completed_before = engine.stats.cancelled, engine.stats.completed

    async def leave_midway() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            request = asyncio.create_task(
                client.post(f"{server.url}/transcribe", files={"file": ("long.wav", ninety_seconds)})
            )
            await asyncio.to_thread(wait_until, lambda: engine.running > 0, 120, "the request reaching the engine")
            request.cancel()  # closes the connection mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(leave_midway())
    wait_until_cancelled(engine, cancelled_before)
    assert engine.stats.completed - completed_before < 3  # 90 s is 3+ windows: it did not run to the end
    wait_until(lambda: gate.active == 0, 10, "the admission slot coming back")


def test_stream_disconnect_cancels_the_work(server: LiveServer, quick_start: bytes) -> None:
    engine = server.engine()
    cancelled_before = engine.stats.cancelled
    with httpx.stream(
        "POST",
        f"{server.url}/transcribe",
        params={"stream": "true", "timestamps": "true"},
        files={"file": ("long.wav", quick_start)},
        timeout=300,
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert "transcript.text.delta" in first
    # leaving the block closed the connection after the first delta
    wait_until_cancelled(engine, cancelled_before)


def test_request_timeout_is_504_and_frees_the_engine(server: LiveServer, ninety_seconds: bytes) -> None:
    engine = server.engine()
    settings = server.settings.server
    saved = settings.request_timeout_s
    settings.request_timeout_s = 0.5
    try:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/transcribe", files={"file": ("long.wav", ninety_seconds)}, timeout=300)
    finally:
        settings.request_timeout_s = saved
    assert response.status_code == 504 and "did not finish within 0.5 s" in response.json()["detail"]
    assert time.monotonic() - started < 60  # a bound against hanging, not a speed assertion
    wait_until(lambda: engine.running == 0 and engine.queue_depth == 0, 60, "the engine draining")


def test_unload_waits_for_requests_in_flight(server: LiveServer, jfk_path: Path) -> None:
    """DELETE /v1/models/{id} while a request runs on the model: 409, and the request completes; once idle,
    the unload goes through and the next request loads the model again."""
    url = f"{server.url}/v1/models/tiny.en"

    async def delete_midway() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            request = asyncio.create_task(
                client.post(f"{server.url}/transcribe", files={"file": jfk_path.read_bytes()})
            )
            in_use = lambda: any(m.users > 0 for m in server.pool.loaded())  # noqa: E731
            await asyncio.to_thread(wait_until, in_use, 120, "the request holding the model")
            refused = await client.delete(url)
            return refused, await request

    refused, done = asyncio.run(delete_midway())
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use", refused.text
    assert "in use by 1 request; retry when it is idle" in refused.json()["error"]["message"]
    assert done.status_code == 200, done.text
    assert words_of(done.json()["text"]) == words_of(JFK_TEXT), done.text
    unloaded = httpx.delete(url, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["deleted"] is True and not server.pool.is_loaded("tiny.en")
    again = httpx.post(f"{server.url}/transcribe", files={"file": LJ.open("rb")}, timeout=300)
    assert again.status_code == 200 and words_of(again.json()["text"]) == ["in", "being", "comparatively", "modern"]
    assert server.pool.is_loaded("tiny.en")
