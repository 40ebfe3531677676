"""api/jobs.py: a request's audio decodes in a worker thread that ends with the request, unless it is a small
16 kHz WAV, read without one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import fastapi.dependencies.utils as fastapi_dependencies
import httpx
import numpy as np
import pytest
import starlette.datastructures as starlette_datastructures

import halkspeech.api.jobs as jobs
from api.conftest import api_settings, live_server
from conftest import long_opus, wav_bytes
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import Cancelled


def test_a_cancelled_decode_stops_its_thread_before_the_task_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves (or a request timeout) cancels the job; the thread decoding its audio cannot be
    cancelled, and kept decoding, holding a core and memory outside the admission limit (hours of Opus went on
    for minutes after the 499). Now it is told to stop and waited for."""
    data = long_opus(tmp_path / "ten_minutes.ogg", 600).read_bytes()  # ~3 s to decode here
    decode_upload = jobs.decode_upload
    ended: list[tuple[float, BaseException | None]] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        try:
            return decode_upload(*args, **kwargs)
        except BaseException as exc:
            ended.append((time.perf_counter(), exc))
            raise
        finally:
            if not ended:
                ended.append((time.perf_counter(), None))

    monkeypatch.setattr(jobs, "decode_upload", recorded)

    async def main() -> float:
        task = asyncio.ensure_future(jobs.decode_in_thread(data, 4 * 3600))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter()

    task_ended = asyncio.run(main())
    assert len(ended) == 1
    thread_ended, error = ended[0]
    assert isinstance(error, Cancelled) and thread_ended <= task_ended


def test_a_small_16k_wav_upload_takes_no_worker_thread(
    shared_tiny_en: ModelEngine, jfk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load, each hop to a worker thread cost a request ~100 ms of waiting for a thread and then for the
    GIL (bench/http_host.py: 256 clients, 138–143 → 183–188 requests/s, the decode's hop most of it). A 16 kHz
    mono WAV upload now takes none: its samples are read on the event loop (wav.small_pcm_wav), the route's
    dependencies are async (FastAPI runs a plain `def` one on a thread), and an upload of up to
    server.upload_memory_mb stays in memory (Starlette spills one over 1 MiB to disk, writing each further
    chunk on a thread). Other audio still decodes on a thread."""
    hops: list[str] = []
    decode_in_thread = jobs.decode_in_thread
    run_in_threadpool = fastapi_dependencies.run_in_threadpool

    async def decode_hop(*args: Any, **kwargs: Any) -> Any:
        hops.append("decode")
        return await decode_in_thread(*args, **kwargs)

    async def dependency_hop(call: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(f"dependency {call.__name__}")
        return await run_in_threadpool(call, *args, **kwargs)

    async def upload_hop(call: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append("upload")
        return await run_in_threadpool(call, *args, **kwargs)

    monkeypatch.setattr(jobs, "decode_in_thread", decode_hop)
    monkeypatch.setattr(fastapi_dependencies, "run_in_threadpool", dependency_hop)
    monkeypatch.setattr(starlette_datastructures, "run_in_threadpool", upload_hop)
    samples = decode_audio(jfk_path)
    with live_server(api_settings(), shared_tiny_en) as server:
        url = f"{server.url}/v1/audio/transcriptions"
        wav = httpx.post(url, files={"file": ("jfk.wav", wav_bytes(samples))}, timeout=120)
        assert wav.status_code == 200 and "fellow Americans" in wav.json()["text"]
        assert hops == []
        longer = wav_bytes(np.concatenate([samples, np.zeros(40 * 16000, np.float32)]))  # 51 s: 1.6 MB
        assert len(longer) > 1024 * 1024
        answer = httpx.post(url, files={"file": ("long.wav", longer)}, timeout=120)
        assert answer.status_code == 200 and "fellow Americans" in answer.json()["text"]
        assert hops == []
        flac = httpx.post(url, files={"file": ("jfk.flac", jfk_path.read_bytes())}, timeout=120)
        assert flac.status_code == 200 and flac.json()["text"] == wav.json()["text"]
        assert hops == ["decode"]
