"""API keys, upload and duration limits, URL fetching refusals, request ids and /metrics, on a server with keys
and small limits that runs its lifespan (preload, reaper, close)."""

from __future__ import annotations

import io
import re
import wave
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from api.conftest import LiveServer, api_settings, live_server
from conftest import TEST_DATA
from halkspeech.engine.factory import ModelEngine

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LJ = TEST_DATA / "LJ001-0002.wav"  # 1.9 s, 84 KB


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A quiet tone as 8-bit WAV: long audio in few bytes."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(rate)
        out.writeframes((128 + 20 * np.sin(2 * np.pi * 440 * t)).astype(np.uint8).tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    settings = api_settings(api_keys=[KEY, "other-key"], max_upload_mb=0.5, max_audio_s=8, preload=["tiny.en"])
    with live_server(settings, shared_tiny_en, lifespan=True) as running:
        yield running


def post_lj(server: LiveServer, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": LJ.open("rb")}, timeout=300, **kwargs)  # type: ignore[arg-type]


def test_preloaded_by_the_lifespan(server: LiveServer) -> None:
    assert server.pool.is_loaded("tiny.en")


def test_keys(server: LiveServer) -> None:
    missing = post_lj(server)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (
        missing.json()["error"]["code"] == "invalid_api_key" and "missing API key" in missing.json()["error"]["message"]
    )
    wrong = post_lj(server, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    ok = post_lj(server, headers=AUTH)
    assert ok.status_code == 200 and "modern" in ok.json()["text"]
    assert post_lj(server, headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    assert httpx.post(f"{server.url}/transcribe", files={"file": LJ.open("rb")}, timeout=30).status_code == 401


def test_health_open_metrics_closed(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 401
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert metrics.status_code == 200
    text = metrics.text
    assert re.search(
        r'halkspeech_http_requests_total\{method="POST",route="/v1/audio/transcriptions",status="401"\}', text
    )
    for name in (
        "halkspeech_engine_queue_depth",
        "halkspeech_engine_running_sequences",
        "halkspeech_engine_tokens_total",
        "halkspeech_engine_decode_batch_size_bucket",
        "halkspeech_engine_encoder_batch_size_count",
        "halkspeech_engine_phase_seconds_total",
        "halkspeech_http_request_duration_seconds_bucket",
        "halkspeech_admission_active",
    ):
        assert name in text, name


def test_upload_too_large(server: LiveServer, jfk_path: object) -> None:
    big = httpx.post(
        f"{server.url}/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * 600_000)}, headers=AUTH, timeout=60
    )
    assert big.status_code == 413 and "upload limit of 0.5" in big.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n'
        for _ in range(10):
            yield b"\0" * 100_000

    streamed = httpx.post(
        f"{server.url}/transcribe",
        content=chunked(),
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert streamed.status_code == 413 and "upload limit" in streamed.json()["detail"]


def test_audio_too_long(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/transcribe", files={"file": ("long.wav", wav_bytes(9.0))}, headers=AUTH, timeout=60
    )
    assert response.status_code == 413 and "longer than the limit of 8 s" in response.json()["detail"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/audio.wav", "non-public address"),
        ("http://localhost/audio.wav", "non-public address"),
        ("http://169.254.169.254/latest/meta-data/", "non-public address"),
        ("http://[::1]/a.wav", "non-public address"),
        ("http://10.1.2.3/a.wav", "non-public address"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@example.com/a.wav", "may not carry credentials"),
        ("not a url", "only http and https"),
    ],
)
def test_url_fetch_refusals(server: LiveServer, url: str, message: str) -> None:
    response = httpx.post(f"{server.url}/transcribe/url", json={"url": url}, headers=AUTH, timeout=60)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


def test_request_ids(server: LiveServer) -> None:
    kept = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "trace-42.a:b"}, timeout=30)
    assert kept.headers["x-request-id"] == "trace-42.a:b"
    replaced = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    fresh = httpx.get(f"{server.url}/health", timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
