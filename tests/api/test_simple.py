"""The simple API with plain httpx: /transcribe (the earlier Modal app's exact call), /transcribe/url against a
local file server, streaming, /health; and the HTTP load tester driving the same server."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from api.conftest import LiveServer, api_settings, live_server
from conftest import JFK_TEXT, TEST_DATA, jfk_with_pauses, wav_bytes
from halkspeech.api.app import create_app
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import ModelEngine, Replicas, start_engine
from halkspeech.engine.pool import ModelPool
from halkspeech.loadtest.http import HttpLoadConfig, run_http_load
from halkspeech.model.registry import ModelRegistry
from halkspeech.model.weights import LoadedWeights

LJ = TEST_DATA / "LJ001-0002.wav"  # "in being comparatively modern."


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    # This server may fetch from loopback: the file server below runs on 127.0.0.1.
    with live_server(api_settings(url_fetch_allow_private=True), shared_tiny_en) as running:
        yield running


@pytest.fixture(scope="module")
def file_server() -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(TEST_DATA))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_modal_call_exactly(server: LiveServer, jfk_path: Path) -> None:
    """The call the earlier Modal app made, unchanged (tiny.en is English-only: `tr` cannot change its output)."""
    url = f"{server.url}/transcribe?language=tr&task=transcribe&timestamps=true&timings=true"
    response = httpx.post(url, files={"file": jfk_path.open("rb")}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert words_of(body["text"]) == words_of(JFK_TEXT)
    assert body["duration"] == pytest.approx(11.0, abs=0.05) and body["processing_time"] > 0
    assert len(body["segments"]) >= 2  # timestamps=true: the model's own segment boundaries
    assert all(s["end"] > s["start"] for s in body["segments"])
    assert words_of(" ".join(s["text"] for s in body["segments"])) == words_of(JFK_TEXT)
    assert set(body["timings_ms"]) == {"decode", "queue", "encoder", "decoder", "total"}
    assert body["timings_ms"]["encoder"] > 0 and body["timings_ms"]["decoder"] > 0


def test_plain_call_has_no_segments_or_timings(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/transcribe", files={"file": LJ.open("rb")}, timeout=300)
    body = response.json()
    assert words_of(body["text"]) == ["in", "being", "comparatively", "modern"]
    assert "segments" not in body and "timings_ms" not in body
    assert body["language"] == "en" and body["model"] == "tiny.en"


def test_english_only_model_takes_any_language(server: LiveServer) -> None:
    """tiny.en transcribes English whatever language is asked, as `halkspeech transcribe` does: `yue` is not in
    its vocabulary at all, and used to be refused with a 400 only here."""
    response = httpx.post(f"{server.url}/transcribe?language=yue", files={"file": LJ.open("rb")}, timeout=300)
    assert response.status_code == 200, response.text
    assert words_of(response.json()["text"]) == ["in", "being", "comparatively", "modern"]
    assert response.json()["language"] == "en"
    assert httpx.post(f"{server.url}/transcribe?language=klingon", files={"file": LJ.open("rb")}).status_code == 400


def test_include_segments_and_words(server: LiveServer) -> None:
    params = {"include_segments": "true", "word_timestamps": "true"}
    body = httpx.post(f"{server.url}/transcribe", params=params, files={"file": LJ.open("rb")}, timeout=300).json()
    assert len(body["segments"]) == 1
    words = body["segments"][0]["words"]
    assert words_of(" ".join(w["word"] for w in words)) == ["in", "being", "comparatively", "modern"]
    assert all(0 <= w["start"] <= w["end"] <= 2.0 and 0 < w["probability"] <= 1 for w in words)


def test_stream(server: LiveServer, jfk_path: Path) -> None:
    events = []
    with httpx.stream(
        "POST",
        f"{server.url}/transcribe",
        params={"stream": "true", "timestamps": "true"},
        files={"file": jfk_path.open("rb")},
        timeout=300,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert [e["type"] for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 3
    done = events[-1]
    assert done["type"] == "transcript.text.done" and "".join(e["delta"] for e in events[:-1]) == done["text"]
    assert words_of(done["text"]) == words_of(JFK_TEXT) and done["duration"] == pytest.approx(11.0, abs=0.05)


def test_vad_filter_keeps_the_files_times(server: LiveServer) -> None:
    params = {"vad_filter": "true", "timestamps": "true"}
    audio = wav_bytes(jfk_with_pauses())  # speech at 10-12.77 s and 20.77-29 s
    response = httpx.post(f"{server.url}/transcribe", params=params, files={"file": audio}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert words_of(body["text"]) == words_of(JFK_TEXT) and body["duration"] == 29.0
    assert body["segments"][0]["start"] >= 9.5 and body["segments"][-1]["end"] <= 29.0


def test_transcribe_url(server: LiveServer, file_server: str) -> None:
    body = {"url": f"{file_server}/LJ001-0002.wav", "timings": True}
    response = httpx.post(f"{server.url}/transcribe/url", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert words_of(response.json()["text"]) == ["in", "being", "comparatively", "modern"]
    assert response.json()["timings_ms"]["decode"] > 0  # the fetch and decode
    missing = httpx.post(f"{server.url}/transcribe/url", json={"url": f"{file_server}/nope.wav"}, timeout=60)
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["detail"]


def test_health(server: LiveServer) -> None:
    body = httpx.get(f"{server.url}/health", timeout=30).json()
    assert body["status"] == "ok" and body["device"] == "cpu" and body["gpu"] is None
    assert body["devices"] == ["cpu"] and body["gpus"] == []
    assert body["default_model"] == "tiny.en"
    assert [m["name"] for m in body["models"]] == ["tiny.en"] and body["models"][0]["alive"] is True
    head = httpx.head(f"{server.url}/health", timeout=30)  # as load balancers probe
    assert head.status_code == 200 and head.content == b""
    docs = httpx.get(f"{server.url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert {"/v1/audio/transcriptions", "/v1/audio/translations", "/transcribe", "/transcribe/url"} <= set(
        schema["paths"]
    )


def test_health_and_metrics_have_a_row_per_engine(tiny_en_weights: LoadedWeights) -> None:
    """One engine per GPU: /health lists each (degraded while one is down) and /metrics labels each engine's
    series by device. Two CPU engines of tiny.en stand in for two GPUs (a CPU runs one engine in production)."""
    two = Replicas([start_engine(tiny_en_weights, EngineSettings(device="cpu", max_slots=4)) for _ in range(2)])
    try:
        settings = api_settings(metrics_open=True)
        pool = ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: two)
        client = TestClient(create_app(settings, pool))
        assert client.post("/v1/models/tiny.en").status_code == 200
        body = client.get("/health").json()
        assert body["status"] == "ok" and [m["slots"] for m in body["models"]] == [4, 4]
        metrics = client.get("/metrics").text
        assert len(re.findall(r'^halkspeech_engine_steps_total\{device="cpu",model="tiny.en"\}', metrics, re.M)) == 2
        two.models[1].engine.stop()
        body = client.get("/health").json()
        assert body["status"] == "degraded" and [m["alive"] for m in body["models"]] == [True, False]
    finally:
        two.close()


def test_gpu_memory_is_read_for_the_configured_gpus_only(
    tiny_en_engine: ModelEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mem_get_info makes a CUDA context (hundreds of MB) on a GPU this process did not use yet: /metrics read
    every visible GPU, so a server on GPUs 0,1 of a shared 8-GPU host took memory on all 8. As /health: those of
    engine.device_index."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: asked.append(index) or (1, 2))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 0)
    settings = api_settings(metrics_open=True)
    settings = settings.model_copy(update={"engine": EngineSettings(device="cpu", device_index=(2, 5))})
    pool = ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: tiny_en_engine)
    metrics = TestClient(create_app(settings, pool)).get("/metrics").text
    assert set(asked) == {2, 5}
    assert set(re.findall(r'halkspeech_gpu_memory_bytes\{device="(cuda:\d)"', metrics)) == {"cuda:2", "cuda:5"}


def test_http_load_tester_open_loop(server: LiveServer) -> None:
    """--rate: arrivals at a fixed rate (Poisson), not when a client is free. One client for a rate it cannot
    keep up with: arrivals wait for it, and their latency counts that wait, so it grows with each arrival."""
    cfg = HttpLoadConfig(url=server.url, audio=(LJ,), concurrency=1, requests=6, language="en", rate=200.0)
    results = run_http_load(cfg, quiet=True)
    assert results["ok"] == 6 and results["offered_rate"] == 200.0 and results["waited"] >= 4
    # One client serves the requests one after another, so their service times add up to at most the wall time.
    # Latencies that count each arrival's wait for the client add up to more: every wait overlaps the service of
    # the request before it. (A ratio of two latencies would depend on how the machine spreads the service times.)
    assert results["latency_ms"]["mean"] * results["ok"] / 1000 > results["wall_s"]
    slow = run_http_load(dataclasses.replace(cfg, concurrency=4, rate=0.5, requests=2, max_duration_s=0.5), quiet=True)
    assert slow["sent"] == 0 or slow["sent"] == slow["ok"]  # an arrival past max_duration_s is not sent


def test_http_load_tester(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cfg = HttpLoadConfig(url=server.url, audio=(LJ,), concurrency=3, requests=5, language="en", json_path=str(out))
    results = run_http_load(cfg)
    assert results["sent"] == 5 and results["ok"] == 5 and results["errors"] == {}
    assert results["audio_s_per_s"] > 0 and results["latency_ms"]["p50"] <= results["latency_ms"]["p99"]
    assert json.loads(out.read_text())["ok"] == 5
