"""Triton's two wires under hostile requests: the HTTP codec (api/kserve.py), gRPC's tensor reader
(api/triton_grpc._inputs) and the model's rows after either (api/triton_model.rows). Whatever comes in, a request
is read or refused with the API's own error (a 4xx), never another exception (a 500) or a warning. Hypothesis
builds requests for the Whisper model with each field mostly right and sometimes wrong in type, size or value,
and mutates the bytes of a valid binary request. The served paths are in test_triton.py."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from halkspeech.api import triton_grpc, triton_model, triton_repository
from halkspeech.api.errors import status_for
from halkspeech.api.kserve import NUMERIC, inflate, parse_request, serialize_bytes
from halkspeech.api.triton_model import INPUTS, rows
from halkspeech.errors import HalkSpeechError, InvalidRequest

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# A warning is a failure too: numpy's cast warnings would otherwise land in the server's log, request after request.
pytestmark = pytest.mark.filterwarnings("error")

# Any JSON value, leaves weighted towards what a tensor field could hold.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                    max_size=3), max_leaves=12)  # fmt: skip
DATATYPES = st.sampled_from([*NUMERIC, "BYTES", "FP8", "", "fp32"]) | JSON
SHAPES = st.lists(st.integers(min_value=-2, max_value=2**40), max_size=10) | JSON


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` 19 times in 20, else `other`: whole requests often get through to the model's rows, and every
    check still meets wrong values."""
    return st.integers(0, 19).flatmap(lambda n: valid if n else other)


PREFIXES = st.sampled_from(["<|startoftranscript|><|tr|><|transcribe|><|notimestamps|>",
                            "<|startofprev|>Ankara<|startoftranscript|><|en|><|translate|>", ""])  # fmt: skip


def values_of(name: str, samples: int) -> st.SearchStrategy[Any]:
    """An input's elements: in range mostly, else anything its type holds (and more: out of range, non-finite)."""
    if name == "WAV":
        return mostly(st.floats(-1, 1, width=32), st.floats(width=32) | st.floats())
    if name == "WAV_LENS":
        return mostly(st.integers(1, samples), st.integers(-(2**40), 2**40))
    if name == "MAX_NEW_TOKENS":
        return mostly(st.integers(1, 224), st.integers(-(2**40), 2**40))
    return mostly(PREFIXES, st.text(max_size=30) | st.sampled_from(["<|startoflm|>", "<|xx|>", "a<|en|>"]))


@st.composite
def tensors(draw: st.DrawFn, name: str, rows: int, samples: int) -> tuple[dict[str, Any], bytes]:
    """One entry of `inputs` and the binary data it takes (b"" for JSON data): each field mostly right,
    sometimes missing, of a wrong type, size or shape."""
    datatype = draw(mostly(st.just(INPUTS.get(name, "FP32")), DATATYPES))
    shape = draw(mostly(st.just([rows, samples] if name == "WAV" else [rows, 1]), st.just([1, 1]) | SHAPES))
    count = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 999 for d in
                                                                 shape) else 2  # fmt: skip
    values = draw(st.lists(values_of(name, samples), min_size=count, max_size=count))
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    for key in list(tensor):
        if not draw(mostly(st.just(True), st.just(False))):
            tensor[key] = draw(st.just(None) | JSON) if draw(st.booleans()) else tensor.pop(key)
    if draw(st.booleans()):
        tensor["data"] = draw(mostly(st.just(values), JSON))
        return tensor, b""
    if datatype == "BYTES":
        data = serialize_bytes([str(v) for v in values])
    else:
        data = binary(values, NUMERIC.get(datatype, "<f4") if isinstance(datatype, str) else "<f4")
    size = draw(mostly(st.just(len(data)), st.integers(-2, len(data) + 8) | JSON))
    tensor["parameters"] = draw(mostly(st.just({"binary_data_size": size}), JSON))
    return tensor, data


def binary(values: list[Any], dtype: str) -> bytes:
    """Values as a numeric tensor's raw data: integers clamped to the type, floats cast (to ±inf if too large)."""
    kind = np.dtype(dtype)
    numbers = [v if isinstance(v, (int, float)) else 0 for v in values]
    if kind.kind in "iu":
        info = np.iinfo(kind)
        numbers = [min(max(int(v), info.min), info.max) if math.isfinite(v) else 0 for v in numbers]
        return np.array(numbers, dtype=kind).tobytes()
    with np.errstate(all="ignore"):
        return np.array(numbers, dtype=np.float64).astype(kind).tobytes()


@st.composite
def model_inputs(draw: st.DrawFn) -> list[tuple[dict[str, Any], bytes]]:
    """WAV and some of the optional inputs (or, now and then, any names), each as tensors() draws it."""
    rows, samples = draw(st.integers(1, 3)), draw(st.integers(1, 48))
    optional = draw(st.lists(st.sampled_from(["WAV_LENS", "TEXT_PREFIX", "MAX_NEW_TOKENS"]), unique=True))
    names = draw(mostly(st.permutations(["WAV", *optional]), st.lists(st.sampled_from([*INPUTS, "OTHER"]))))
    return [draw(tensors(name, rows, samples)) for name in names]


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A body for the Whisper model (WAV and some of the optional inputs, mostly right) and its
    Inference-Header-Content-Length."""
    parts = draw(model_inputs())
    request: dict[str, Any] = {"inputs": draw(mostly(st.just([t for t, _ in parts]), JSON))}
    if draw(st.booleans()):
        request["outputs"] = draw(mostly(st.just([{"name": "TRANSCRIPTS", "parameters": {"binary_data": True}}]),
                                         JSON))  # fmt: skip
    if draw(st.booleans()):
        request["parameters"] = draw(mostly(st.just({"binary_data_output": True}), JSON))
    if draw(st.booleans()):
        request["id"] = draw(JSON)
    head = json.dumps(request).encode()
    tail = b"".join(data for _, data in parts)
    length = draw(mostly(st.just(len(head) if tail else None), st.none() | st.integers(-2, len(head) + len(tail) + 2)))
    return head + tail, length


def parse_or_refuse(body: bytes, header_length: int | None) -> None:
    """Parse, then take the rows out, as the route does; only the API's own errors may come out."""
    try:
        parsed = parse_request(body, header_length)
        event("parsed")
        rows(parsed.inputs)
        event("rows taken")  # (`--hypothesis-show-statistics` shows how far the cases got)
    except HalkSpeechError as exc:
        assert 400 <= status_for(exc) < 500 and str(exc), exc


@FUZZ
@given(request=requests())
def test_any_header_and_binary_data_is_parsed_or_refused(request: tuple[bytes, int | None]) -> None:
    parse_or_refuse(*request)


def valid_binary_request() -> tuple[bytes, int]:
    """Two rows of audio with WAV_LENS, TEXT_PREFIX and MAX_NEW_TOKENS, all binary, as tritonclient sends it."""
    wav = np.linspace(-0.5, 0.5, 2 * 1600, dtype="<f4").reshape(2, 1600)
    prefix = serialize_bytes(["<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"] * 2)
    parts = [
        ("WAV", "FP32", [2, 1600], wav.tobytes()),
        ("WAV_LENS", "INT32", [2, 1], np.array([[1600], [800]], "<i4").tobytes()),
        ("TEXT_PREFIX", "BYTES", [2, 1], prefix),
        ("MAX_NEW_TOKENS", "INT32", [1, 1], np.array([[20]], "<i4").tobytes()),
    ]
    header = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                         for n, d, s, b in parts]}  # fmt: skip
    head = json.dumps(header).encode()
    return head + b"".join(b for *_, b in parts), len(head)


def test_the_valid_request_the_mutations_start_from_parses() -> None:
    body, length = valid_binary_request()
    assert [len(audio) for audio, _ in rows(parse_request(body, length).inputs)] == [1600, 800]


@FUZZ
@given(data=st.data())
def test_mutated_binary_requests_are_parsed_or_refused(data: st.DataObject) -> None:
    body, length = valid_binary_request()
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            mutated[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del mutated[at:]
        elif action == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del mutated[at : at + data.draw(st.integers(1, 8))]
        if not mutated:
            mutated = bytearray(b"{")
    header_length = data.draw(st.sampled_from([length, None]) | st.integers(-1, len(mutated) + 1))
    parse_or_refuse(bytes(mutated), header_length)


def test_a_finite_json_number_too_large_for_its_type_is_refused_not_made_infinite() -> None:
    for datatype, value in (("FP32", 1e300), ("FP16", 70000.0), ("INT32", 2**40)):
        tensor = {"name": "WAV", "datatype": datatype, "shape": [1, 2], "data": [1, value]}
        with pytest.raises(InvalidRequest, match=f"does not fit {datatype}"):
            parse_request(json.dumps({"inputs": [tensor]}).encode(), None)


@FUZZ
@given(parts=model_inputs(), raw=st.booleans())
def test_any_grpc_request_is_read_or_refused(parts: list[tuple[dict[str, Any], bytes]], raw: bool) -> None:
    """The same inputs as ModelInferRequest messages, in raw_input_contents or typed contents."""
    message = service_pb2.ModelInferRequest(model_name="whisper")
    for tensor, data in parts:
        shape = tensor.get("shape")
        shape = [d for d in shape if isinstance(d, int) and -(2**63) <= d < 2**63] if isinstance(shape, list) else []
        entry = message.inputs.add(name=str(tensor.get("name")), datatype=str(tensor.get("datatype")), shape=shape)
        values = tensor.get("data") if isinstance(tensor.get("data"), list) else []
        if raw:
            message.raw_input_contents.append(data or binary_or_bytes(values, entry.datatype))
        else:
            typed(entry, values)
    try:
        triton_model.rows(triton_grpc._inputs(message))
        event(f"rows taken ({'raw' if raw else 'typed'} contents)")
    except HalkSpeechError as exc:
        assert 400 <= status_for(exc) < 500 and str(exc), exc


def binary_or_bytes(values: list[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes([str(v) for v in values])
    return binary(values, NUMERIC.get(datatype, "<f4"))


def typed(entry: Any, values: list[Any]) -> None:
    """Values into the typed-contents field of the entry's datatype (as far as protobuf takes them)."""
    field = triton_grpc._CONTENTS.get(entry.datatype, "fp32_contents")
    target = getattr(entry.contents, field)
    for value in values:
        try:
            target.append(value.encode() if field == "bytes_contents" and isinstance(value, str) else value)
        except (TypeError, ValueError):
            continue  # protobuf refuses it before the server could see it


# --- the repository extension's bodies (api/triton_repository.py) -----------------------------------------
REPOSITORY_BODIES = st.one_of(
    JSON.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({}, optional={"ready": JSON, "parameters": JSON}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries(
        {"parameters": st.dictionaries(st.sampled_from(["unload_dependents", "config", "file:1/model.pt", ""]), JSON)}
    ).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
)


@FUZZ
@given(REPOSITORY_BODIES)
def test_any_repository_body_is_read_or_refused(body: bytes) -> None:
    """An index, load or unload body: its fields, `ready` and parameters, or InvalidRequest; a parameter that
    gets through is unload's own flag, a boolean."""
    try:
        fields = triton_repository.body_fields(body)
        ready = triton_repository.http_ready(fields)
        parameters = triton_repository.http_parameters(fields)
        triton_repository.check_parameters(parameters, taken=("unload_dependents",))
    except InvalidRequest as refused:
        assert status_for(refused) == 400 and str(refused)
        return
    assert isinstance(ready, bool) and set(parameters) <= {"unload_dependents"}
    assert all(isinstance(value, bool) for value in parameters.values())


# --- compressed bodies (kserve.inflate) --------------------------------------------------------------------
def _compressed(data: bytes, encoding: str) -> bytes:
    return gzip.compress(data, mtime=0) if encoding == "gzip" else zlib.compress(data)


@FUZZ
@given(st.data(), st.sampled_from(["gzip", "deflate"]))
def test_any_compressed_body_is_inflated_within_its_limit_or_refused(data: st.DataObject, encoding: str) -> None:
    """Bytes that say they are gzip or deflate: a valid stream mutated, or anything. Decompressed within the
    limit, or refused with a 400 (broken) or 413 (too large); never another exception."""
    plain = data.draw(st.binary(max_size=512))
    packed = bytearray(_compressed(plain, encoding))
    for _ in range(data.draw(st.integers(0, 3))):
        packed[data.draw(st.integers(0, len(packed) - 1))] = data.draw(st.integers(0, 255))
    body = data.draw(st.just(bytes(packed)) | st.binary(max_size=64))
    limit = data.draw(st.integers(0, 1024))
    try:
        out = inflate(body, encoding, limit)
    except HalkSpeechError as refused:
        assert status_for(refused) in (400, 413) and str(refused)
        return
    assert len(out) <= limit
    if body == _compressed(plain, encoding):
        assert out == plain
