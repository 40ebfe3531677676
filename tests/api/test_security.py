"""API keys (checked before any body is read), upload and duration limits, URL fetching refusals, request ids,
a bug's 500 and /metrics, on a server with keys and small limits that runs its lifespan (preload, reaper, close)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import time
import wave
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient
from websockets.sync.client import connect as ws_connect

from api.conftest import LiveServer, api_settings, live_server
from conftest import TEST_DATA
from halkspeech.api.app import create_app
from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.pool import ModelPool
from halkspeech.model.registry import ModelRegistry

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
    empty = post_lj(server, headers={"X-API-Key": ""})
    assert empty.status_code == 401 and "missing API key" in empty.json()["error"]["message"]
    assert httpx.post(f"{server.url}/transcribe", files={"file": LJ.open("rb")}, timeout=30).status_code == 401


def test_an_empty_key_is_no_key() -> None:
    """Even were a blank key configured (settings refuse one), an empty header or token never matches it."""
    from halkspeech.api.deps import api_key_valid

    assert not api_key_valid("", [""]) and not api_key_valid(None, ["k"]) and api_key_valid("k", ["", "k"])


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
        "halkspeech_engine_queue_wait_seconds_bucket",
        "halkspeech_engine_window_seconds_count",
        "halkspeech_http_request_duration_seconds_bucket",
        "halkspeech_admission_active",
    ):
        assert name in text, name


def test_upload_too_large(server: LiveServer, jfk_path: object) -> None:
    big = httpx.post(
        f"{server.url}/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * 600_000)}, headers=AUTH, timeout=60
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert "larger than the upload limit of 0.5 MB" in big.json()["error"]["message"]  # the configured limit

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
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
    assert "larger than the upload limit of 0.5 MB" in streamed.json()["detail"]


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


def raw_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on an open connection; read one response (status, headers, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_a_bug_is_a_500_with_the_request_id_and_the_connection_stays_usable(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.pool, "loaded", broken)  # GET /health lists the loaded models
    with httpx.Client(base_url=server.url, timeout=30) as client, caplog.at_level(logging.ERROR):
        response = client.get("/health", headers={"X-Request-ID": "trace-500"})
        assert response.status_code == 500 and response.headers["x-request-id"] == "trace-500"
        error = response.json()["error"]
        assert error["code"] == "internal_error" and error["type"] == "server_error"
        assert "request id trace-500" in error["message"] and "a bug" not in response.text
        assert response.headers.get("connection") != "close"
        unnamed = client.get("/health")  # a fresh id, in the body and the header alike
        rid = unnamed.headers["x-request-id"]
        assert unnamed.status_code == 500 and f"(request id {rid})" in unnamed.json()["error"]["message"]
        tracebacks = [r for r in caplog.records if r.exc_info and "a bug" in str(r.exc_info[1])]
        assert len(tracebacks) == 2, [r.getMessage() for r in caplog.records]  # one per request, not two
        monkeypatch.undo()
        assert client.get("/health").status_code == 200
    # on one connection: the 500, then the next request is answered on it
    monkeypatch.setattr(server.pool, "loaded", broken)
    host, port = server.url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        status, headers, _ = raw_exchange(sock, request)
        assert status == 500 and headers.get("connection") != "close"
        monkeypatch.undo()
        status, _, body = raw_exchange(sock, request)
        assert status == 200 and b'"status"' in body


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations", "/transcribe", "/metrics"])
def test_keys_are_checked_before_the_body_is_read(server: LiveServer, path: str) -> None:
    """An unauthenticated upload is refused before the server reads any of it: the ASGI app never calls
    receive(), and over the network the 401 arrives while the client has sent only the first chunk."""

    async def receive() -> dict[str, object]:
        raise AssertionError("the body was read")

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    method = "GET" if path == "/metrics" else "POST"
    headers = [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"999")]
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("test", 80)}  # fmt: skip
    asyncio.run(server.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 401
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))  # type: ignore[misc]
    assert body["error"]["code"] == "invalid_api_key" and "missing API key" in body["error"]["message"]

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer wrong\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        first = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"\0" * 1000
        # The body never ends: a server waiting for it would time the recv out.
        status, headers, raw = raw_exchange(sock, head.encode() + b"%x\r\n%s\r\n" % (len(first), first))
    assert status == 401 and headers["www-authenticate"] == "Bearer", raw
    assert json.loads(raw)["error"] == {
        "message": "invalid API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"
    }  # fmt: skip


def test_open_routes_need_no_key(server: LiveServer) -> None:
    for path in ("/health", "/openapi.json", "/docs", "/ws"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
    assert httpx.get(f"{server.url}/v1/nothing", timeout=30).status_code == 404  # no route: 404, not 401
    assert httpx.get(f"{server.url}/v1/audio/transcriptions", timeout=30).status_code == 405


def test_metrics_open_leaves_the_rest_protected() -> None:
    settings = api_settings(api_keys=[KEY], metrics_open=True)
    app = create_app(settings, ModelPool(settings, ModelRegistry(settings.model)))
    client = TestClient(app)  # no lifespan: nothing is loaded, and these routes need no model
    assert client.get("/metrics").status_code == 200
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer" and refused.headers["x-request-id"]
    assert client.get("/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_upload_is_refused_and_the_server_goes_on(shared_tiny_en: ModelEngine, framing: str) -> None:
    """A client that sends part of a body and then nothing (or trickles it to hold the connection) gets 408
    after body_idle_timeout_s, instead of holding its connection and upload buffer forever."""
    with live_server(api_settings(body_idle_timeout_s=0.5), shared_tiny_en) as live:
        host, port = live.url.removeprefix("http://").split(":")
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"\0" * 100
        size = f"Content-Length: {len(part) + 5000}" if framing == "content-length" else "Transfer-Encoding: chunked"
        head = f"POST /transcribe HTTP/1.1\r\nHost: {host}\r\n"
        head += f"Content-Type: multipart/form-data; boundary=b\r\n{size}\r\n\r\n"
        body = part if framing == "content-length" else b"%x\r\n%s\r\n" % (len(part), part)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            status, _, raw = raw_exchange(sock, head.encode() + body)  # and then the client stalls
        assert status == 408, raw
        error = json.loads(raw)["error"]
        assert error["code"] == "body_timeout" and "no data for 0.5 s" in error["message"]
        ok = httpx.post(f"{live.url}/transcribe", files={"file": (TEST_DATA / "jfk.flac").read_bytes()}, timeout=120)
        assert ok.status_code == 200 and "country" in ok.json()["text"]


def test_a_trickled_upload_is_refused_though_it_never_stalls(shared_tiny_en: ModelEngine) -> None:
    """One byte every 0.1 s never trips the 1 s idle timeout, but falls behind the minimum rate: the body
    must be in by 1 s + 1 s per 1,000 bytes, so the 408 comes about a second in, not never."""
    settings = api_settings(body_idle_timeout_s=1.0, body_min_rate_bytes_s=1000)
    with live_server(settings, shared_tiny_en) as live:
        host, port = live.url.removeprefix("http://").split(":")
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        head = f"POST /transcribe HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(part) + 5000}\r\n"
        head += "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head.encode() + part)
            started = time.monotonic()
            sock.settimeout(0.1)
            answer = b""
            while b"\r\n\r\n" not in answer and time.monotonic() - started < 10:
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    sock.sendall(b"\0")  # a byte every 0.1 s: never idle for the 1 s timeout
            elapsed = time.monotonic() - started
            sock.settimeout(5)
            length = int(re.search(rb"content-length: (\d+)", answer.lower()).group(1))  # type: ignore[union-attr]
            while len(answer.partition(b"\r\n\r\n")[2]) < length:
                answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"arrived too slowly" in answer and b"at least 1000 bytes a second" in answer
        assert elapsed < 5  # without the rate limit it would run to the loop's 10 s


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took (≤ limit_s)."""
    started = time.monotonic()
    data = b""
    sock.settimeout(limit_s)
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_headers_must_arrive_in_time_on_every_request_of_a_connection(shared_tiny_en: ModelEngine) -> None:
    """A connection that sends nothing, or its headers a byte at a time, gets a 408 and is closed after
    header_timeout_s (uvicorn alone would hold it forever); the deadline counts from each request's first
    byte, so a kept-alive connection idle between requests, and an open WebSocket, are not cut."""
    with live_server(api_settings(header_timeout_s=0.5), shared_tiny_en) as live:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as silent:
            answer, elapsed = read_until_closed(silent, 10)
        assert answer.startswith(b"HTTP/1.1 408") and answer.endswith(b"request headers not complete in time\n")
        assert 0.4 < elapsed < 5
        request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=30) as kept:
            assert raw_exchange(kept, request)[0] == 200
            time.sleep(1.0)  # idle past the header deadline, within the keep-alive timeout
            assert raw_exchange(kept, request)[0] == 200
            started = time.monotonic()
            for byte in request[:-2]:  # the third request's headers, a byte every 0.05 s, never finished
                try:
                    kept.sendall(bytes([byte]))
                except OSError:  # closed under us: the 408 was sent
                    break
                time.sleep(0.05)
            answer, _ = read_until_closed(kept, 10)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        with ws_connect(f"ws://{host}:{port}/ws") as ws:
            time.sleep(1.0)
            ws.ping().wait(5)  # the upgraded connection is the WebSocket protocol's, with no header deadline
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200


def test_configured_models_only_lists_and_serves_nothing_else() -> None:
    audio = (TEST_DATA / "jfk.flac").read_bytes()
    settings = api_settings(configured_models_only=True)
    client = TestClient(create_app(settings, ModelPool(settings, ModelRegistry(settings.model))))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny.en", "whisper-1"]
    for response in (
        client.post("/v1/models/base"),
        client.post("/v1/audio/transcriptions", data={"model": "base"}, files={"file": audio}),
        client.post("/transcribe?model=large-v3", files={"file": audio}),
    ):
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and "offers only tiny.en" in error["message"]
