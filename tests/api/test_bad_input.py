"""Bad input never gives a 500: not audio, truncated, empty, unsupported language, unknown model, wrong field
types and malformed multipart bodies each get a 4xx whose message says what to fix; then schemathesis fuzzes
every operation of the app's OpenAPI schema against the running server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from api.conftest import LiveServer, api_settings, live_server
from conftest import TEST_DATA
from halkspeech.api.app import create_app
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.pool import ModelPool
from halkspeech.model.registry import ModelRegistry

LJ = TEST_DATA / "LJ001-0002.wav"
JFK = TEST_DATA / "jfk.flac"


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    with live_server(api_settings(url_fetch_timeout_s=3), shared_tiny_en) as running:
        yield running


def upload(server: LiveServer, data: bytes, path: str = "/v1/audio/transcriptions", **form: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", files={"file": ("upload.bin", data)}, data=form, timeout=120)


def message(response: httpx.Response) -> str:
    return str(response.json()["error"]["message"])


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        (b"just some text, not audio at all\n" * 10, 400, "text, not audio"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 200, 400, "PNG image, not audio"),
        (b"", 400, "empty"),
        (JFK.read_bytes()[:300_000], 400, "truncated"),
        (LJ.read_bytes()[:20_000], 400, "truncated"),
        (LJ.read_bytes()[:30], 400, "WAV file is corrupt or truncated"),
        (b"RIFF\xff\xff\xff\xffWAVEfmt " + b"\x01" * 100, 400, "corrupt or truncated"),
    ],
    ids=["text", "png", "empty", "truncated-flac", "truncated-wav", "cut-header", "garbage-wav"],
)
def test_not_audio(server: LiveServer, data: bytes, status: int, says: str) -> None:
    for path in ("/v1/audio/transcriptions", "/transcribe"):
        response = upload(server, data, path)
        assert response.status_code == status and says in message(response), (path, response.text)


@pytest.mark.parametrize(
    ("form", "status", "param", "says"),
    [
        ({"language": "xx"}, 400, None, "unsupported language 'xx'"),
        ({"model": "no-such-model"}, 404, None, "not available here"),
        ({"model": "../../etc"}, 404, None, "not available here"),
        ({"model": "tests"}, 404, None, "not available here"),  # a local directory: never loaded from a request
        ({"temperature": "hot"}, 400, "temperature", "valid number"),
        ({"temperature": "7"}, 400, "temperature", "less than or equal to 1"),
        ({"temperature": "nan"}, 400, "temperature", "finite number"),
        ({"language": "x" * 5000}, 400, None, "unsupported language '" + "x" * 40 + "...'"),  # not echoed whole
        ({"beam_size": "many"}, 400, "beam_size", "valid integer"),
        ({"stream": "maybe"}, 400, "stream", "valid boolean"),
        ({"response_format": "docx"}, 400, "response_format", "'json', 'text'"),
        ({"timestamp_granularities[]": "char"}, 400, "timestamp_granularities[]", "'segment' or 'word'"),
        ({"timestamp_granularities[]": "word"}, 400, "timestamp_granularities[]", "needs response_format=verbose_json"),
        ({"mode": "turbo"}, 400, "mode", "'sequential' or 'batched'"),
        ({"vad_filter": "sometimes"}, 400, "vad_filter", "valid boolean"),
        ({"prompt": "x" * (2 << 20)}, 400, None, "a text field of the form (such as 'prompt') is too long"),
        # tokenized for every window on the event loop: 1 MB stalled it ~0.25 s a window (the WebSocket's cap)
        ({"hotwords": "x" * 2001}, 400, "hotwords", "at most 2000 characters"),
    ],
)
def test_bad_fields(server: LiveServer, form: dict[str, str], status: int, param: str | None, says: str) -> None:
    response = upload(server, LJ.read_bytes(), **form)
    assert response.status_code == status and says in message(response), response.text
    if param:
        assert response.json()["error"]["param"] == param


def test_model_names_too_long_for_a_file_name_are_404(server: LiveServer) -> None:
    long = "x" * 5000
    responses = [
        upload(server, LJ.read_bytes(), model=long),
        httpx.post(f"{server.url}/transcribe", params={"model": "y" * 300}, files={"file": LJ.open("rb")}, timeout=60),
        httpx.post(f"{server.url}/v1/models/{'z' * 300}", timeout=60),
        httpx.post(f"{server.url}/v1/models/owner/{'z' * 300}", timeout=60),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found" and "not available here" in message(response)
        assert "characters)" in message(response) and len(message(response)) < 600  # the name cut short


def test_model_errors_name_no_server_paths(server: LiveServer) -> None:
    cache = str(server.settings.model.cache_dir)
    for path in ("/v1/models/no-such-model", "/v1/models/owner/no-such-model"):
        response = httpx.post(f"{server.url}{path}", timeout=60)
        assert response.status_code == 404 and cache not in response.text, response.text
        assert "in the model cache (empty)" in message(response) and "allow_download is false" in message(response)


def test_more_beams_than_the_engine_has_slots_is_a_400_before_any_work() -> None:
    """A group that could never be admitted is the request's fault, not overload: a 429 would have clients
    retry it forever, and a stream would open only to fail."""
    settings = api_settings()
    model = start_engine(ModelRegistry(settings.model).load("tiny.en"), EngineSettings(device="cpu", max_slots=4))
    try:
        with live_server(settings, model) as small:
            for form in (
                {"beam_size": "5"},
                {"beam_size": "5", "stream": "true"},
                {"best_of": "8", "temperature": "0.5"},
            ):
                response = upload(small, LJ.read_bytes(), **form)
                assert response.status_code == 400, (form, response.text)
                assert "decoder slots at once; this server allows 4" in message(response)
            assert small.engine().stats.admitted == 0  # nothing was decoded
            assert upload(small, LJ.read_bytes(), beam_size="4").json()["text"] == "in being comparatively modern."
    finally:
        model.close()


def test_bad_simple_options(server: LiveServer) -> None:
    url = f"{server.url}/transcribe"
    for params, says in (
        ({"timings": "perhaps"}, "'timings'"),
        ({"task": "dance"}, "'transcribe' or 'translate'"),
        ({"language": "klingon"}, "unsupported language"),
        ({"vad_filter": "sometimes"}, "'vad_filter'"),
    ):
        response = httpx.post(url, params=params, files={"file": LJ.open("rb")}, timeout=60)
        assert 400 <= response.status_code < 500 and says in response.json()["detail"], response.text
    for body, says in (
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "the request body is invalid"),
        (b'{"url": 5}', "'url'"),
        (b"{}", "the field 'url' is required"),
        (b"", "the request has no body"),
        (b'{"url": "http://example.com/a.wav"} trailing', "not valid JSON"),
    ):
        response = httpx.post(f"{url}/url", content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 422 and says in response.json()["detail"], response.text
        assert response.json()["error"]["param"] in ("url", None), response.text  # a field, never a byte offset
    not_utf8 = httpx.post(
        f"{url}/url", content=b'{"url": "http://\xff.com/"}', headers={"Content-Type": "application/json"}, timeout=60
    )
    assert not_utf8.status_code == 400 and "not valid JSON (it must be UTF-8" in not_utf8.json()["detail"]
    huge = httpx.post(
        f"{url}/url", content=b'{"url": ' + b"1" * 5000 + b"}", headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 400 and "its integers at most 4300 digits" in huge.json()["detail"]  # valid JSON


@pytest.mark.parametrize(
    ("headers", "body", "says"),
    [
        ({"Content-Type": "multipart/form-data"}, b"whatever", "boundary"),
        ({"Content-Type": "multipart/form-data; boundary=xyz"}, b"garbage without any boundary", "'file'"),
        (
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF',  # never closed
            "",
        ),
        (
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nnot a file\r\n--xyz--\r\n',
            "must be a file upload",
        ),
        ({"Content-Type": "application/json"}, b'{"file": "aGVsbG8="}', "'file' is required"),
        ({"Content-Type": "text/plain"}, b"", "'file' is required"),
    ],
    ids=["no-boundary", "no-parts", "unterminated", "file-as-text", "json", "empty"],
)
def test_malformed_multipart(server: LiveServer, headers: dict[str, str], body: bytes, says: str) -> None:
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", content=body, headers=headers, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert says in message(response)


def test_wrong_method_and_route(server: LiveServer) -> None:
    wrong = httpx.get(f"{server.url}/v1/audio/transcriptions", timeout=30)
    assert wrong.status_code == 405 and "not allowed" in message(wrong)
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "no route" in message(missing)


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_400() -> None:
    """The body parser turned the disconnect into a 400 (a truncated form): metrics and the access log
    counted a client that went away as a bad request."""
    settings = api_settings(metrics_open=True)
    app = create_app(settings, ModelPool(settings, ModelRegistry(settings.model)))
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
    messages = [
        {"type": "http.request", "body": head + LJ.read_bytes()[:10_000], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/transcribe",
        "raw_path": b"/transcribe",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499, sent[:2]
    assert b'"code":"cancelled"' in sent[1]["body"]


# The schema of an app built the same way (no model is loaded to build it), read at collection time so each
# operation is a test of its own; the calls go to the running server.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(api_settings(), ModelPool(api_settings(), ModelRegistry(api_settings().model))).openapi()
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Invalid data needs something that can be invalid: a body or a query (any string is a valid path segment).
CASES = [
    (op, mode)
    for op in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or len(op.body) or any(p.location == "query" for p in op.iter_parameters())
]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{m.value}-{op.label}" for op, m in CASES])
def test_fuzz_never_a_server_error(server: LiveServer, operation: Any, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
        )

    check()
