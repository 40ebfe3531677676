"""Triton's HTTP and gRPC APIs (KServe v2) with the real `tritonclient.http` and `tritonclient.grpc`, as clients
of TensorRT-LLM's Triton Whisper examples call them: binary and JSON tensors, a padded batch with WAV_LENS, the
task tokens of TEXT_PREFIX; and bad requests answered in Triton's error form (a gRPC status), never a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from api.conftest import LiveServer, api_settings, live_server, wait_until
from conftest import REPO, TEST_DATA
from halkspeech.api import grpc_health
from halkspeech.api import triton_grpc as triton_grpc_api
from halkspeech.api.kserve import MAX_JSON_BYTES, inflate, parse_request, serialize_bytes
from halkspeech.api.triton_model import MAX_TEXT_PREFIX_CHARS, options_from_prefix
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import InvalidRequest, PayloadTooLarge
from halkspeech.loadtest.http import HttpLoadConfig, run_http_load
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

PREFIX = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"  # the examples' English prompt


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    # gRPC on any free port beside the HTTP one (server.grpc_port 0)
    with live_server(api_settings(api_keys=["k"], grpc_port=0, host="127.0.0.1"), shared_tiny_en) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server.url.removeprefix("http://")) as c:
        yield c


HEADERS = {"Authorization": "Bearer k"}


def key() -> dict[str, str]:
    """The API key header, fresh each call: tritonclient writes its Inference-Header-Content-Length into the dict."""
    return dict(HEADERS)


JFK = decode_audio(TEST_DATA / "jfk.flac")
LJ = decode_audio(TEST_DATA / "LJ001-0002.wav")


def alone(engine: ModelEngine, audio: np.ndarray, **options: Any) -> str:
    """The transcript of one clip straight through the engine, as the reference for the server's."""
    opts = TranscribeOptions(language="en", without_timestamps=True, **options)
    return asyncio.run(Transcriber(engine).transcribe(audio, opts)).text.strip()


def padded(rows: list[np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WAV [rows, longest] (zero-padded), WAV_LENS [rows, 1] and TEXT_PREFIX [rows, 1], as the examples' client
    builds them."""
    wav = np.zeros((len(rows), max(len(r) for r in rows)), np.float32)
    for i, row in enumerate(rows):
        wav[i, : len(row)] = row
    lens = np.array([[len(r)] for r in rows], np.int32)
    return wav, lens, np.array([[prefix.encode()]] * len(rows), dtype=object)


def request(rows: list[np.ndarray], prefix: str = PREFIX, *, binary: bool = True, lens: bool = True) -> list[Any]:
    """The inputs in tritonclient.http's types, binary or JSON."""
    wav, lengths, prefixes = padded(rows, prefix)
    inputs = [
        triton.InferInput("WAV", list(wav.shape), "FP32"),
        triton.InferInput("TEXT_PREFIX", [len(rows), 1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(wav, binary_data=binary)
    inputs[1].set_data_from_numpy(prefixes, binary_data=binary)
    if lens:
        inputs.append(triton.InferInput("WAV_LENS", [len(rows), 1], "INT32"))
        inputs[2].set_data_from_numpy(lengths, binary_data=binary)
    return inputs


def transcripts(result: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("TRANSCRIPTS").reshape(-1)]


def test_a_triton_client_finds_the_server_and_the_examples_model(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("whisper", headers=key()) and client.is_model_ready("infer_bls", headers=key())
    metadata = client.get_model_metadata("whisper_bls", headers=key())
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]}["WAV"] == "FP32"
    assert metadata["outputs"] == [{"name": "TRANSCRIPTS", "datatype": "BYTES", "shape": [-1, 1]}]
    assert not client.is_model_ready("no-such-model", headers=key())
    server = client.get_server_metadata(headers=key())
    assert server["name"] == "halkspeech" and {"statistics", "model_configuration"} <= set(server["extensions"])


def test_generic_triton_clients_read_the_models_configuration(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """get_model_config over HTTP and gRPC: the inputs a client must send, their types, the batch size."""
    over_http = client.get_model_config("whisper", headers=key())
    over_grpc = grpc_client.get_model_config("whisper", headers=GRPC_KEY, as_json=True)["config"]
    for config in (over_http, over_grpc):
        inputs = {i["name"]: (i["data_type"], [int(d) for d in i["dims"]], i.get("optional", False))
                  for i in config["input"]}  # fmt: skip
        assert inputs == {
            "WAV": ("TYPE_FP32", [-1], False),
            "WAV_LENS": ("TYPE_INT32", [1], True),
            "TEXT_PREFIX": ("TYPE_STRING", [1], True),
            "MAX_NEW_TOKENS": ("TYPE_INT32", [1], True),
        }
        assert int(config["max_batch_size"]) == 64 and [o["name"] for o in config["output"]] == ["TRANSCRIPTS"]
    with pytest.raises(InferenceServerException, match="no-such-model"):
        client.get_model_config("no-such-model", headers=key())
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.get_model_config("whisper", headers={"authorization": "Bearer wrong"})
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"


def test_binary_tensors_give_the_engines_transcript(
    client: triton.InferenceServerClient, shared_tiny_en: ModelEngine
) -> None:
    result = client.infer("whisper", request([JFK]), headers=key())  # binary in and out, tritonclient's default
    assert transcripts(result) == [alone(shared_tiny_en, JFK)]
    assert "ask not what your country can do for you" in transcripts(result)[0].lower()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_is_read(
    client: triton.InferenceServerClient, shared_tiny_en: ModelEngine, algorithm: str
) -> None:
    """tritonclient.http's request_compression_algorithm (Content-Encoding gzip or deflate)."""
    result = client.infer("whisper", request([LJ]), headers=key(), request_compression_algorithm=algorithm)
    assert transcripts(result) == [alone(shared_tiny_en, LJ)]


def test_a_compressed_body_is_bounded_and_whole() -> None:
    data = json.dumps({"inputs": [wav_json([0.0] * 1000)]}).encode()
    assert inflate(gzip.compress(data), "gzip", len(data)) == data
    assert inflate(zlib.compress(data), "deflate", len(data)) == data
    with pytest.raises(PayloadTooLarge, match=f"more than {len(data) - 1} bytes"):  # stops there: no bomb
        inflate(gzip.compress(data), "gzip", len(data) - 1)
    for broken in (gzip.compress(data)[:-9], gzip.compress(data) + b"junk", b"\x1f\x8bnot gzip"):
        with pytest.raises(InvalidRequest, match="gzip"):
            inflate(broken, "gzip", 10**6)


def test_a_padded_batch_in_json_gives_each_row_its_own_transcript(
    client: triton.InferenceServerClient, shared_tiny_en: ModelEngine
) -> None:
    outputs = [triton.InferRequestedOutput("TRANSCRIPTS", binary_data=False)]
    result = client.infer("whisper", request([LJ, JFK], binary=False), outputs=outputs, headers=key(), request_id="r1")
    assert transcripts(result) == [alone(shared_tiny_en, LJ), alone(shared_tiny_en, JFK)]
    assert result.get_response()["id"] == "r1" and result.get_response()["model_name"] == "whisper"


def test_max_new_tokens_caps_each_window(client: triton.InferenceServerClient, shared_tiny_en: ModelEngine) -> None:
    inputs = request([JFK], lens=False)
    inputs.append(triton.InferInput("MAX_NEW_TOKENS", [1, 1], "INT32"))
    inputs[-1].set_data_from_numpy(np.array([[5]], np.int32))
    (text,) = transcripts(client.infer("whisper", inputs, headers=key()))
    assert text == alone(shared_tiny_en, JFK, max_new_tokens=5)
    assert 0 < len(shared_tiny_en.tokenizer.encode(" " + text)) <= 5 and len(text) < len(alone(shared_tiny_en, JFK))


def test_text_prefix_sets_language_task_timestamps_prompt_and_prefix() -> None:
    options = options_from_prefix("<|startofprev|> Hester Prynne<|startoftranscript|><|tr|><|translate|> So")
    assert (options.language, options.task, options.initial_prompt, options.prefix) == (
        "tr",
        "translate",
        "Hester Prynne",
        " So",
    )
    assert not options.without_timestamps and options_from_prefix(PREFIX).without_timestamps
    assert options_from_prefix("").language is None  # no language token: detect
    for bad in ("<|startoflm|>", PREFIX + " text <|en|>", "loose text<|startoftranscript|>"):
        with pytest.raises(InvalidRequest, match="TEXT_PREFIX"):
            options_from_prefix(bad)
    # Bounded before it is parsed or tokenized: 2.8 MB of task tokens took the parse 6 s (quadratic), and a 20 MB
    # prefix, tokenized for every window, held the event loop 10 s.
    assert options_from_prefix(PREFIX + "x" * (MAX_TEXT_PREFIX_CHARS - len(PREFIX))).prefix is not None
    for long in (PREFIX + "x" * MAX_TEXT_PREFIX_CHARS, "<|startoftranscript|>" + "<|transcribe|>" * 200_000):
        with pytest.raises(InvalidRequest, match=f"TEXT_PREFIX may have at most {MAX_TEXT_PREFIX_CHARS} characters"):
            options_from_prefix(long)


def test_the_codec_reads_binary_bytes_and_refuses_what_does_not_add_up() -> None:
    header = {"inputs": [{"name": "T", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}}]}
    head = json.dumps(header).encode()
    parsed = parse_request(head + b"\x02\x00\x00\x00hi\x01\x00\x00\x00!", len(head))
    assert list(parsed.inputs["T"]) == [b"hi", b"!"]
    for body, length, says in [
        (head + b"\x09\x00\x00\x00hi", len(head), "binary_data_size"),
        (head + b"\x02\x00\x00\x00hi\x05\x00\x00\x00!!", len(head), "runs past"),
        (b'{"inputs": [{"name": "W", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}', None, "holds 3"),
        (b'{"inputs": [{"name": "W", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "datatype"),
        (b'{"inputs": [{"name": "W", "datatype": "FP32", "shape": [-1], "data": []}]}', None, "shape"),
        (b"[1]", None, "JSON object"),
        (head, len(head) + 5, "Inference-Header-Content-Length"),
    ]:
        with pytest.raises(InvalidRequest, match=says):
            parse_request(body, length)
    with pytest.raises(PayloadTooLarge, match="binary data"):  # 413: JSON numbers take ~8× their text in memory
        parse_request(b" " * (MAX_JSON_BYTES + 1), None)


def infer_raw(server: LiveServer, body: Any, path: str = "/v2/models/whisper/infer", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=HEADERS | headers, timeout=60)


def wav_json(data: list[float], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "WAV", "datatype": "FP32", "shape": shape or [1, len(data)], "data": data}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{", 400, "not valid JSON"),
        # valid JSON that Python's int() refuses (over 4300 digits): said so, not "not valid JSON"
        (b'{"inputs": [' + b"7" * 5000 + b"]}", 400, "an integer of more than 4300 digits"),
        ({"inputs": [{"name": "TEXT_PREFIX", "datatype": "BYTES", "shape": [1, 1], "data": [PREFIX]}]}, 400, "WAV"),
        ({"inputs": [wav_json([0.0, float("nan")])]}, 400, "NaN"),
        (
            {"inputs": [wav_json([0.0] * 4), {"name": "WAV_LENS", "datatype": "INT32", "shape": [1, 1], "data": [9]}]},
            400,
            "WAV_LENS",
        ),
        (
            {
                "inputs": [
                    wav_json([0.0] * 4),
                    {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": [0]},
                ]
            },
            400,
            "MAX_NEW_TOKENS",
        ),
        (
            {"inputs": [wav_json([0.0] * 4), {"name": "EXTRA", "datatype": "FP32", "shape": [1], "data": [1]}]},
            400,
            "unknown input",
        ),
        ({"inputs": [{"name": "WAV", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}, 400, "must be FP32"),
        ({"inputs": [wav_json([0.0] * 4)], "outputs": [{"name": "LOGITS"}]}, 400, "unknown output"),
        ({"inputs": [wav_json([], [65, 0])]}, 400, "rows"),
        ({"inputs": [wav_json([], [1, 0])]}, 400, "no samples"),
        (
            {
                "inputs": [
                    wav_json([0.0] * 4),
                    {"name": "TEXT_PREFIX", "datatype": "BYTES", "shape": [1, 1], "data": [PREFIX + "x" * 5000]},
                ]
            },
            400,
            "TEXT_PREFIX may have at most",
        ),
    ],
)
def test_bad_requests_get_a_4xx_in_tritons_error_form(server: LiveServer, body: Any, status: int, says: str) -> None:
    response = infer_raw(server, body)
    assert response.status_code == status and says in response.json()["error"], response.text


def test_an_inference_header_length_that_is_no_byte_count_is_a_400(server: LiveServer) -> None:
    """str.isdigit passes "²" (a latin-1 header byte), and int() refuses it and numbers of over 4300 digits: a 500."""
    body = json.dumps({"inputs": [wav_json([0.0] * 1600)]}).encode()
    for length in (b"abc", b"-1", b"\xb2", b"1" * 5000):
        headers = {**HEADERS, "Inference-Header-Content-Length": length}
        response = httpx.post(server.url + "/v2/models/whisper/infer", content=body, headers=headers, timeout=60)
        assert response.status_code == 400, (length[:10], response.text)
        assert "Inference-Header-Content-Length must be a number of bytes" in response.json()["error"]
        assert len(response.json()["error"]) < 200  # a long header is not echoed whole


def test_names_versions_keys_and_encodings_are_checked(server: LiveServer) -> None:
    body = {"inputs": [wav_json([0.0] * 1600)]}
    assert infer_raw(server, body, "/v2/models/no-such-model/infer").status_code == 404
    assert infer_raw(server, body, "/v2/models/whisper/versions/2/infer").status_code == 404
    assert infer_raw(server, body, "/v2/models/whisper/versions/1/infer").status_code == 200
    unknown = infer_raw(server, body, **{"Content-Encoding": "br"})
    assert unknown.status_code == 400 and "gzip or deflate" in unknown.json()["error"]
    not_gzip = infer_raw(server, body, **{"Content-Encoding": "gzip"})  # says gzip, sends JSON
    assert not_gzip.status_code == 400 and "not valid gzip" in not_gzip.json()["error"]
    refused = httpx.post(server.url + "/v2/models/whisper/infer", json=body, timeout=60)  # no key
    assert refused.status_code == 401 and "error" in refused.json()
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200  # open, as /health
    url = server.url.removeprefix("http://")
    with triton.InferenceServerClient(url=url) as c, pytest.raises(InferenceServerException, match="no-such-model"):
        c.infer("no-such-model", request([LJ]), headers=key())


def test_the_http_load_tester_drives_the_triton_api(server: LiveServer) -> None:
    """`halkspeech loadtest http --api triton`: the same load against this server or a Triton + TensorRT-LLM one."""
    clips = (TEST_DATA / "jfk.flac", TEST_DATA / "LJ001-0002.wav")
    load = HttpLoadConfig(server.url, clips, concurrency=2, requests=4, api="triton", api_key="k", language="en")
    results = run_http_load(load, quiet=True)
    assert (
        results["ok"] == 4
        and not results["errors"]
        and results["config"]["endpoint"].endswith("/v2/models/whisper/infer")
    )
    assert results["audio_s_per_s"] > 0
    server_side = results["server"]  # the server's statistics over the run, as perf_analyzer's "Server:"
    assert (server_side["requests"], server_side["failures"], server_side["inferences"]) == (4, 0, 4)
    mean = server_side["mean_ms"]
    assert mean["compute_infer"] > 0 and mean["queue"] + mean["compute_infer"] <= mean["success"]
    wrong = run_http_load(dataclasses.replace(load, model="no-such-model", requests=2), quiet=True)
    assert wrong["ok"] == 0 and wrong["errors"] == {"404": 2}
    assert wrong["server"]["unavailable"].startswith("HTTP 404")  # the run's results stand without them


# --- gRPC ---------------------------------------------------------------------------------------------------
GRPC_KEY = {"authorization": "Bearer k"}  # gRPC metadata keys are lowercase


@pytest.fixture(scope="module")
def grpc_client(server: LiveServer) -> Iterator[triton_grpc.InferenceServerClient]:
    port = server._server.grpc.port  # type: ignore[attr-defined]
    with triton_grpc.InferenceServerClient(url=f"127.0.0.1:{port}") as c:
        yield c


def grpc_request(rows: list[np.ndarray], prefix: str = PREFIX) -> list[Any]:
    """The inputs in tritonclient.grpc's types (raw_input_contents, its only way)."""
    wav, lengths, prefixes = padded(rows, prefix)
    inputs = [
        triton_grpc.InferInput("WAV", list(wav.shape), "FP32"),
        triton_grpc.InferInput("TEXT_PREFIX", [len(rows), 1], "BYTES"),
        triton_grpc.InferInput("WAV_LENS", [len(rows), 1], "INT32"),
    ]
    for tensor, values in zip(inputs, (wav, prefixes, lengths), strict=True):
        tensor.set_data_from_numpy(values)
    return inputs


def test_grpc_clients_get_the_same_transcripts(
    grpc_client: triton_grpc.InferenceServerClient, shared_tiny_en: ModelEngine
) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("whisper", headers=GRPC_KEY)
    assert not grpc_client.is_model_ready("no-such-model", headers=GRPC_KEY)
    metadata = grpc_client.get_model_metadata("whisper", headers=GRPC_KEY, as_json=True)
    assert [o["name"] for o in metadata["outputs"]] == ["TRANSCRIPTS"]
    server = grpc_client.get_server_metadata(headers=GRPC_KEY, as_json=True)
    assert server["name"] == "halkspeech" and {"statistics", "model_configuration"} <= set(server["extensions"])
    result = grpc_client.infer("whisper", grpc_request([LJ, JFK]), headers=GRPC_KEY, request_id="g1")
    assert transcripts(result) == [alone(shared_tiny_en, LJ), alone(shared_tiny_en, JFK)]
    assert result.get_response().id == "g1"


def test_the_grpc_port_answers_the_standard_health_checks(server: LiveServer) -> None:
    """grpc.health.v1, as Kubernetes' gRPC probes ask it: open (no key), SERVING for the server and Triton's
    service, NOT_FOUND for another; NOT_SERVING once the server stops, and an open Watch then ends."""
    service = server._server.grpc.service  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{server._server.grpc.port}") as channel:  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == serving
        service.closing = True  # as the server's shutdown sets it (restored below: the module's server goes on)
        try:
            assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]  # and the stream ended
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != serving
        finally:
            service.closing = False


def test_a_watch_sends_not_serving_however_the_stop_falls_between_its_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stopping between a Watch's status and its check to end: it ended the stream without the
    NOT_SERVING (seen once in CI). Here `stopping` turns true after its first read."""
    monkeypatch.setattr(grpc_health.triton_model, "server_ready", lambda state: True)
    reads = iter([False])
    health = grpc_health._Health(None, lambda: next(reads, True))  # type: ignore[arg-type]

    async def watch() -> list[int]:
        return [r.status async for r in health.Watch(health_pb2.HealthCheckRequest(service=""), None)]

    statuses = asyncio.run(watch())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


def test_grpc_typed_contents_are_read_too(server: LiveServer, shared_tiny_en: ModelEngine) -> None:
    """Tensors in InferTensorContents (other KServe clients), not raw_input_contents."""
    request = service_pb2.ModelInferRequest(model_name="whisper")
    wav = request.inputs.add(name="WAV", datatype="FP32", shape=[1, len(LJ)])
    wav.contents.fp32_contents.extend(LJ.tolist())
    prefix = request.inputs.add(name="TEXT_PREFIX", datatype="BYTES", shape=[1, 1])
    prefix.contents.bytes_contents.append(PREFIX.encode())
    with grpc.insecure_channel(f"127.0.0.1:{server._server.grpc.port}") as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=[("authorization", "Bearer k")], timeout=60)
    assert response.raw_output_contents[0][4:].decode() == alone(shared_tiny_en, LJ)
    lens = request.inputs.add(name="WAV_LENS", datatype="INT32", shape=[1, 1])
    lens.contents.int_contents.append(2**31 - 1)  # fits INT32, not the row
    with grpc.insecure_channel(f"127.0.0.1:{server._server.grpc.port}") as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, metadata=[("authorization", "Bearer k")], timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "WAV_LENS" in refused.value.details()


@pytest.mark.parametrize(
    ("model", "headers", "prefix", "status"),
    [
        ("no-such-model", GRPC_KEY, PREFIX, "NOT_FOUND"),
        ("whisper", {}, PREFIX, "UNAUTHENTICATED"),
        ("whisper", {"authorization": "Bearer wrong"}, PREFIX, "UNAUTHENTICATED"),
        ("whisper", GRPC_KEY, "<|startoflm|>", "INVALID_ARGUMENT"),
    ],
)
def test_grpc_errors_are_statuses_with_a_message(
    grpc_client: triton_grpc.InferenceServerClient, model: str, headers: dict[str, str], prefix: str, status: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.infer(model, grpc_request([LJ], prefix), headers=dict(headers))
    assert raised.value.status() == f"StatusCode.{status}" and raised.value.message()


def test_a_grpc_call_given_up_on_leaves_no_engine_work(
    server: LiveServer, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """A client whose deadline passes mid-transcription (or that cancels) frees its engine work at once, as an
    HTTP client that disconnects does: grpc cancels the call's task, and the cancellation reaches the engine."""
    long = np.tile(LJ, 40)  # ~2 minutes: seconds of work for tiny.en on a CPU
    engine = server.engine()
    cancelled = engine.stats.cancelled
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.infer("whisper", grpc_request([long]), headers=GRPC_KEY, client_timeout=1.0)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The engine frees the slots a moment before it counts the cancellation: wait for both.
    wait_until(
        lambda: engine.stats.cancelled > cancelled and engine.running == 0 and engine.queue_depth == 0,
        30,
        "the engine to cancel the call's window and drain",
    )


def stream(
    client: triton_grpc.InferenceServerClient,
    requests: list[tuple[str, list[Any], str]],
    headers: dict[str, str],
    cancel: bool = False,
) -> tuple[dict[str, str], list[InferenceServerException]]:
    """Send (model, inputs, id) over one ModelStreamInfer call, as tritonclient's streaming clients do; the
    transcripts by request id and the errors, once the stream is closed (and, with `cancel`, cut short)."""
    texts: dict[str, str] = {}
    errors: list[InferenceServerException] = []

    def callback(result: Any, error: InferenceServerException | None) -> None:
        if error is not None:
            errors.append(error)
        else:
            texts[result.get_response().id] = transcripts(result)[0]

    client.start_stream(callback=callback, headers=headers)
    for model, inputs, request_id in requests:
        client.async_stream_infer(model, inputs, request_id=request_id)
    client.stop_stream(cancel_requests=cancel)  # closes the stream; without cancel, waits for every answer
    return texts, errors


def test_a_grpc_stream_answers_each_request_and_goes_on_after_a_bad_one(
    grpc_client: triton_grpc.InferenceServerClient, shared_tiny_en: ModelEngine
) -> None:
    requests = [
        ("whisper", grpc_request([LJ]), "a"),
        ("no-such-model", grpc_request([LJ]), "b"),
        ("whisper", grpc_request([JFK]), "c"),
        ("whisper", grpc_request([LJ], "<|startoflm|>"), "d"),
        ("whisper", grpc_request([JFK, LJ]), "e"),
    ]
    texts, errors = stream(grpc_client, requests, GRPC_KEY)
    assert texts == {"a": alone(shared_tiny_en, LJ), "c": alone(shared_tiny_en, JFK), "e": alone(shared_tiny_en, JFK)}
    messages = sorted(str(e.message()) for e in errors)  # b's and d's, the stream going on after each
    assert len(messages) == 2 and "TEXT_PREFIX" in messages[0] and "no-such-model" in messages[1], messages


def test_tensorrt_llms_streaming_whisper_client_gets_its_transcript(
    server: LiveServer, shared_tiny_en: ModelEngine
) -> None:
    """TensorRT-LLM's own Whisper client with --streaming (triton_backend/tools/whisper/client.py): a stream of
    one request through tritonclient.grpc.aio's stream_infer, audio zero-padded to the next 10 s with WAV_LENS,
    its responses read until the stream ends, the last one the transcript; and its model names."""
    port = server._server.grpc.port  # type: ignore[attr-defined]
    padded_wav = np.zeros((1, 16000 * 10), np.float32)
    padded_wav[0, : len(LJ)] = LJ

    async def ask(model: str) -> list[str]:
        inputs = [
            triton_grpc_aio.InferInput("WAV", list(padded_wav.shape), "FP32"),
            triton_grpc_aio.InferInput("WAV_LENS", [1, 1], "INT32"),
            triton_grpc_aio.InferInput("TEXT_PREFIX", [1, 1], "BYTES"),
        ]
        inputs[0].set_data_from_numpy(padded_wav)
        inputs[1].set_data_from_numpy(np.array([[len(LJ)]], np.int32))
        inputs[2].set_data_from_numpy(np.array([[PREFIX]], dtype=object))
        outputs = [triton_grpc_aio.InferRequestedOutput("TRANSCRIPTS")]

        async def requests() -> Any:
            yield {"model_name": model, "inputs": inputs, "outputs": outputs, "request_id": "100000000"}

        answers = []
        async with triton_grpc_aio.InferenceServerClient(url=f"127.0.0.1:{port}") as client:
            async for result, error in client.stream_infer(requests(), stream_timeout=None, headers=GRPC_KEY):
                assert error is None, error
                answers.append(b" ".join(result.as_numpy("TRANSCRIPTS")[0]).decode())  # the client's own reading
        return answers

    for model in ("whisper_bls", "whisper_bls_async", "whisper"):
        assert asyncio.run(ask(model)) == [alone(shared_tiny_en, LJ)]


def test_a_stream_request_that_asks_for_the_final_flag_gets_it(server: LiveServer) -> None:
    """tritonclient's enable_empty_final_response: a client of a decoupled model waits for triton_final_response;
    each request's one answer carries it, a failure's too (raw stubs: tritonclient hides a failure's response)."""
    requests = []
    for request_id, prefix, flagged in (("ok", PREFIX, True), ("bad", "<|startoflm|>", True), ("plain", PREFIX, False)):
        request = service_pb2.ModelInferRequest(model_name="whisper", id=request_id)
        request.inputs.add(name="WAV", datatype="FP32", shape=[1, len(LJ)])
        request.inputs.add(name="TEXT_PREFIX", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.extend([LJ.astype("<f4").tobytes(), serialize_bytes([prefix])])
        if flagged:
            request.parameters["triton_enable_empty_final_response"].bool_param = True
        requests.append(request)
    with grpc.insecure_channel(f"127.0.0.1:{server._server.grpc.port}") as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter(requests), metadata=[("authorization", "Bearer k")], timeout=60))
    flags = {a.infer_response.id: a.infer_response.parameters["triton_final_response"].bool_param for a in answers}
    assert flags == {"ok": True, "bad": True, "plain": False}
    assert [a.infer_response.id for a in answers if a.error_message] == ["bad"]


def test_a_grpc_stream_needs_the_key_and_a_cut_stream_leaves_no_engine_work(
    server: LiveServer, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    refused: list[InferenceServerException] = []
    grpc_client.start_stream(callback=lambda result, error: refused.append(error), headers={"authorization": "x"})
    wait_until(lambda: refused, 30, "the stream's refusal")  # at once, before any request
    grpc_client.stop_stream()
    assert refused[0].status() == "StatusCode.UNAUTHENTICATED" and "key" in refused[0].message()
    engine = server.engine()
    admitted = engine.stats.admitted  # the engine's requests so far: one a window
    long = np.tile(LJ, 120)  # ~3.8 minutes: at least 8 windows, one after another
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{server._server.grpc.port}")  # type: ignore[attr-defined]
    client.start_stream(callback=lambda result, error: None, headers=GRPC_KEY)
    client.async_stream_infer("whisper", grpc_request([long]), request_id="long")
    wait_until(lambda: engine.running > 0, 30, "the stream's request to reach the engine")
    client.stop_stream(cancel_requests=True)  # the client gives the stream up
    client.close()

    def quiet() -> bool:
        """Idle, and still idle a second on. (The cut may land in a window, which the engine then cancels, or
        between two, when no window is running: a bare `running == 0` could see such a gap before the cut.)"""
        if engine.running or engine.queue_depth:
            return False
        before = engine.stats.admitted
        time.sleep(1.0)
        return not engine.running and not engine.queue_depth and engine.stats.admitted == before

    wait_until(quiet, 30, "the engine to drop the stream's work")
    windows = engine.stats.admitted - admitted
    assert 1 <= windows < 8, f"{windows} windows ran: the cut did not stop the request"


def account(entry: dict[str, Any]) -> dict[str, Any]:
    """A statistics entry's numbers as ints, absent ones 0 (gRPC's JSON writes uint64 as strings and leaves
    zeros out)."""
    stats = entry.get("inference_stats", {})
    phases = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
    out: dict[str, Any] = {k: int(entry.get(k, 0)) for k in ("last_inference", "inference_count", "execution_count")}
    out |= {p: (int(stats.get(p, {}).get("count", 0)), int(stats.get(p, {}).get("ns", 0))) for p in phases}
    out["batches"] = {
        int(b["batch_size"]): {
            p: int(b.get(p, {}).get("count", 0)) for p in ("compute_input", "compute_infer", "compute_output")
        }
        for b in entry.get("batch_stats", [])
    }
    return out | {"name": entry["name"], "version": entry["version"]}


def statistics(client: Any, model: str = "", **headers: str) -> list[dict[str, Any]]:
    """get_inference_statistics over either wire, the same dicts."""
    if isinstance(client, triton_grpc.InferenceServerClient):
        found = client.get_inference_statistics(model, headers=headers or GRPC_KEY, as_json=True)
    else:
        found = client.get_inference_statistics(model, headers=headers or key())
    return [account(entry) for entry in found.get("model_stats", [])]


def test_statistics_count_each_request_and_where_its_time_went(
    server: LiveServer, client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """Triton's statistics extension, as perf_analyzer reads it: successes and failures, inferences (rows) and
    executions (requests), batch sizes, and the phases of a success, the same over HTTP and gRPC, and on
    /metrics by Triton's metric names."""
    [before] = statistics(client, "infer_bls")
    started_ms = time.time() * 1000
    client.infer("infer_bls", request([JFK, LJ]), headers=key())
    with pytest.raises(InferenceServerException):
        client.infer("infer_bls", request([LJ], "<|startoflm|>"), headers=key())  # a bad request: a failure
    grpc_client.infer("infer_bls", grpc_request([LJ]), headers=GRPC_KEY)
    [after] = statistics(client, "infer_bls")
    assert statistics(grpc_client, "infer_bls") == [after]  # one account, read over either wire
    assert after["name"] == "infer_bls" and after["version"] == "1"
    phases = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
    counts = {p: after[p][0] - before[p][0] for p in phases}
    assert counts == {"success": 2, "fail": 1, "queue": 2, "compute_input": 2, "compute_infer": 2,
                      "compute_output": 2, "cache_hit": 0, "cache_miss": 0}  # fmt: skip
    assert after["inference_count"] - before["inference_count"] == 3  # rows
    assert after["execution_count"] - before["execution_count"] == 2  # requests
    ns = {p: after[p][1] - before[p][1] for p in phases}
    parts = ns["queue"] + ns["compute_input"] + ns["compute_infer"] + ns["compute_output"]
    assert ns["compute_infer"] > 0 and ns["compute_input"] > 0 and ns["fail"] > 0 and 0 < parts <= ns["success"]
    for size in (1, 2):  # a request of each batch size
        was = before["batches"].get(size, {"compute_infer": 0})["compute_infer"]
        assert after["batches"][size]["compute_infer"] - was == 1
    assert started_ms - 1000 <= after["last_inference"] <= time.time() * 1000 + 1000
    # /metrics: the same, by Triton's metric names (its dashboards' queries)
    scraped = httpx.get(f"{server.url}/metrics", headers=HEADERS).text
    for metric, value in (("nv_inference_request_success", after["success"][0]),
                          ("nv_inference_count", after["inference_count"]),
                          ("nv_inference_compute_infer_duration_us", after["compute_infer"][1] / 1000)):  # fmt: skip
        line = re.search(rf'^{metric}{{model="infer_bls",version="1"}} (\S+)$', scraped, re.MULTILINE)
        assert line is not None and float(line[1]) == pytest.approx(value), metric
    assert re.search(r'^nv_inference_pending_request_count\{model="infer_bls",version="1"\} 0\.0$', scraped, re.M)


def test_statistics_of_every_model_and_their_errors(
    server: LiveServer, client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """No name: every model (the examples' names, and any other called), as perf_analyzer first asks."""
    for wire in (client, grpc_client):
        names = [entry["name"] for entry in statistics(wire)]
        assert {"whisper", "whisper_bls", "infer_bls"} <= set(names) and names == sorted(names)
        with pytest.raises(InferenceServerException, match="no-such-model"):
            statistics(wire, "no-such-model")
    client.infer("Tiny.EN", request([LJ]), headers=key())  # a spelling of tiny.en: counted under tiny.en
    [entry] = statistics(grpc_client, "tiny.en")
    assert statistics(client, "Tiny.EN") == [entry] and entry["name"] == "tiny.en" and entry["success"][0] >= 1
    assert not {"Tiny.EN"} & {e["name"] for e in statistics(client)}
    with pytest.raises(InferenceServerException) as refused:
        statistics(grpc_client, "whisper", authorization="Bearer wrong")
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    response = httpx.get(f"{server.url}/v2/models/whisper/versions/2/stats", headers=HEADERS)
    assert response.status_code == 404 and "version" in response.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/stats").status_code == 401  # keys, as /infer


def test_statistics_show_the_wait_for_admission_as_queue(shared_tiny_en: ModelEngine) -> None:
    """One transcription at a time, its one slot held by the test: a request's rows wait for it at least as
    long as it is held (hold_s after both are seen waiting), and that wait is queue, not compute_infer. A lower
    bound the server cannot undercut on any machine, not a ratio of two timings."""
    hold_s = 0.5
    settings = api_settings(max_concurrent_requests=1, max_queue_size=4, host="127.0.0.1")
    with live_server(settings, shared_tiny_en) as small, triton.InferenceServerClient(url=small.url[7:]) as http:
        gate = small.app.state.halkspeech.gate  # the server's admission, one slot
        held, release = threading.Event(), threading.Event()

        async def occupy() -> None:
            async with gate.admit():
                held.set()
                await asyncio.to_thread(release.wait, 60)

        occupied = asyncio.run_coroutine_threadsafe(occupy(), small._server.servers[0].get_loop())
        assert held.wait(10)

        def infer() -> Any:  # tritonclient's HTTP client is gevent's: one of its own on the pool's thread
            with triton.InferenceServerClient(url=small.url[7:]) as own:  # url: host:port, tritonclient's form
                return own.infer("whisper", request([LJ, LJ]))

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(infer)
            wait_until(lambda: gate.waiting == 2, 30, "both rows to wait for the slot")
            time.sleep(hold_s)
            release.set()
            assert transcripts(answer.result(120)) and occupied.result(10) is None
        [entry] = statistics(http, "whisper")
    (waits, queue_ns), infer_ns = entry["queue"], entry["compute_infer"][1]
    assert waits == 1 and queue_ns >= hold_s * 1e9 and infer_ns > 0


def states(client: Any) -> dict[str, str]:
    """The repository index over either wire: name → state."""
    if isinstance(client, triton_grpc.InferenceServerClient):
        models = client.get_model_repository_index(headers=GRPC_KEY, as_json=True).get("models", [])
    else:
        models = client.get_model_repository_index(headers=key())
    return {entry["name"]: entry.get("state", "") for entry in models}


def test_the_repository_lists_unloads_and_loads_models(
    server: LiveServer, client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    """Triton's explicit model control over both wires: the index, an unload (the examples' names are the
    default model), a load, and a request that loads an unloaded model, as every request here does."""
    loaded = dict.fromkeys(["whisper", "whisper_bls", "whisper_bls_async", "infer_bls", "tiny.en"], "READY")
    assert states(client) == states(grpc_client) == loaded
    client.unload_model("whisper", headers=key())
    unloaded = dict.fromkeys(loaded, "UNAVAILABLE")
    assert states(client) == states(grpc_client) == unloaded
    ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, headers=HEADERS)
    assert ready_only.status_code == 200 and ready_only.json() == []
    grpc_client.load_model("tiny.en", headers=GRPC_KEY)
    assert states(client) == loaded
    grpc_client.unload_model("infer_bls", headers=GRPC_KEY)
    client.unload_model("infer_bls", headers=key())  # unloaded already: nothing to do, as Triton
    assert states(grpc_client) == unloaded
    assert transcripts(client.infer("whisper", request([LJ]), headers=key()))  # loads it back
    assert states(client) == loaded


def test_the_repository_refuses_config_files_unknown_models_and_bad_bodies(
    server: LiveServer, client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    for wire, headers in ((client, key()), (grpc_client, GRPC_KEY)):
        with pytest.raises(InferenceServerException, match="config") as refused:
            wire.load_model("whisper", headers=headers, config='{"max_batch_size": 8}')
        assert refused.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
        with pytest.raises(InferenceServerException, match="no-such-model"):
            wire.load_model("no-such-model", headers=headers)
        with pytest.raises(InferenceServerException, match="no-such-model"):
            wire.unload_model("no-such-model", headers=headers)
    bad = [("/v2/repository/index", b"[1]"), ("/v2/repository/index", b'{"ready": "yes"}'),
           ("/v2/repository/index", b"{"), ("/v2/repository/index", b" " * 70_000),
           ("/v2/repository/models/whisper/unload", b'{"parameters": {"unload_dependents": "yes"}}'),
           ("/v2/repository/models/whisper/load", b'{"parameters": [1]}')]  # fmt: skip
    for path, body in bad:
        response = httpx.post(server.url + path, content=body, headers=HEADERS)
        assert response.status_code == 400 and response.json()["error"], (path, body)
    huge = httpx.post(f"{server.url}/v2/repository/index", content=b'{"ready": ' + b"1" * 5000 + b"}", headers=HEADERS)
    assert huge.status_code == 400 and "an integer of more than 4300 digits" in huge.json()["error"]
    assert httpx.post(f"{server.url}/v2/repository/index").status_code == 401  # keys, as everything but health
    with grpc.insecure_channel(f"127.0.0.1:{server._server.grpc.port}") as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryIndex(
                service_pb2.RepositoryIndexRequest(repository_name="other"), metadata=[("authorization", "Bearer k")]
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one repository" in refused.value.details()


def test_an_unload_keeps_a_model_in_use_and_its_request_is_answered(
    server: LiveServer, client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    engine = server.engine()
    answers: list[Any] = []
    grpc_client.async_infer(
        "whisper",
        grpc_request([np.tile(JFK, 4)]),
        lambda result, error: answers.append((result, error)),
        headers=GRPC_KEY,
    )
    wait_until(lambda: engine.running > 0, 30, "the request to reach the engine")
    scraped = httpx.get(f"{server.url}/metrics", headers=HEADERS).text
    assert re.search(r'^nv_inference_pending_request_count\{model="whisper",version="1"\} 1\.0$', scraped, re.M)
    with pytest.raises(InferenceServerException, match="in use") as refused:
        client.unload_model("whisper", headers=key())
    assert refused.value.status() == "409"
    with pytest.raises(InferenceServerException, match="in use") as refused:
        grpc_client.unload_model("tiny.en", headers=GRPC_KEY)
    assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
    wait_until(lambda: answers, 60, "the request's answer")
    [(result, error)] = answers
    assert error is None and transcripts(result)[0]
    assert states(client)["tiny.en"] == "READY"


def test_the_load_tester_drives_the_grpc_api_too(server: LiveServer) -> None:
    """`halkspeech loadtest http --api triton-grpc`: tritonclient.grpc.aio's calls, failures by gRPC status; and
    `--api triton-grpc-stream`: one stream for the clients, failures by error_message (or the stream's status)."""
    port = server._server.grpc.port  # type: ignore[attr-defined]
    clips = (TEST_DATA / "jfk.flac", TEST_DATA / "LJ001-0002.wav")
    load = HttpLoadConfig(f"grpc://127.0.0.1:{port}", clips, concurrency=2, requests=4, api="triton-grpc",
                          api_key="k", language="en")  # fmt: skip
    results = run_http_load(load, quiet=True)
    assert results["ok"] == 4 and not results["errors"] and results["config"]["endpoint"] == f"127.0.0.1:{port}"
    assert results["windows_per_s"] > 0 and "api_key" not in results["config"]
    refused = run_http_load(dataclasses.replace(load, api_key="wrong", requests=2), quiet=True)
    assert refused["ok"] == 0 and refused["errors"] == {"UNAUTHENTICATED": 2}
    assert refused["server"]["unavailable"].startswith("UNAUTHENTICATED")
    wrong = run_http_load(dataclasses.replace(load, model="no-such-model", requests=2), quiet=True)
    assert wrong["errors"] == {"NOT_FOUND": 2}
    assert results["server"]["requests"] == 4 and results["server"]["mean_ms"]["compute_infer"] > 0
    streamed = run_http_load(dataclasses.replace(load, api="triton-grpc-stream", requests=6), quiet=True)
    assert streamed["ok"] == 6 and not streamed["errors"]  # one stream, each answer found by its request's id
    assert streamed["server"]["requests"] == 6
    refused = run_http_load(dataclasses.replace(load, api="triton-grpc-stream", api_key="wrong"), quiet=True)
    assert refused["ok"] == 0 and refused["errors"] == {"UNAUTHENTICATED": 4}
    wrong = run_http_load(dataclasses.replace(load, api="triton-grpc-stream", model="no-such-model"), quiet=True)
    ((failure, count),) = wrong["errors"].items()  # answered on the stream, each with its error_message
    assert count == 4 and failure.startswith("error: ") and "no-such-model" in failure
    with pytest.raises(InvalidRequest, match="http://, https:// or grpc://"):
        dataclasses.replace(load, url=f"ftp://127.0.0.1:{port}")
    with pytest.raises(InvalidRequest, match="http:// or https:// URL"):  # grpc:// is for the gRPC API only
        dataclasses.replace(load, api="triton")


def test_docs_list_every_triton_endpoint_on_both_wires(server: LiveServer) -> None:
    """docs/triton.md's endpoint table against what is served: every HTTP path (less the /versions/1 forms) and
    every gRPC call the service implements, and nothing more."""
    doc = (REPO / "docs" / "triton.md").read_text()
    table = doc[doc.index("## Endpoints") : doc.index("Every `/v2/models/{m}` path")]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented_http = {path.replace("{m}", "{model}") for cell, _ in rows for path in re.findall(r"(/v2[^`]*)`", cell)}
    served_http = {path for path in server.app.openapi()["paths"] if path.startswith("/v2")}  # /versions/ forms: hidden
    assert documented_http == served_http
    documented_grpc = {name for _, cell in rows for name in re.findall(r"`(\w+)`", cell)}
    base = service_pb2_grpc.GRPCInferenceServiceServicer
    served_grpc = {
        name
        for name in vars(base)
        if not name.startswith("_") and getattr(triton_grpc_api._Service, name) is not getattr(base, name)
    }
    assert documented_grpc == served_grpc
