"""The KServe v2 inference protocol's HTTP body, as Triton Inference Server and `tritonclient.http` speak it:
JSON, or JSON followed by raw tensors (Triton's binary tensor extension, which `tritonclient.http` uses by
default). Pure codec: bytes in, arrays out and back, InvalidRequest for anything malformed.

Binary form: the request's first `Inference-Header-Content-Length` bytes are the JSON; each input with a
`parameters.binary_data_size` takes that many of the bytes after it, in the order of `inputs`. BYTES tensors
travel as (4-byte little-endian length, bytes) per element, row-major, in either form a flat list in JSON.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from halkspeech.api import json_input
from halkspeech.errors import InvalidRequest, PayloadTooLarge

#: KServe datatype → numpy dtype (little-endian) for the numeric types; BYTES is handled apart.
NUMERIC: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
MAX_DIMS = 8
#: The JSON part of a request at most. Parsed, JSON numbers take ~8× their text in memory (a 16 MiB header is
#: ~2-4 million samples, minutes of audio): longer audio goes as binary data, as tritonclient sends it by default.
MAX_JSON_BYTES = 16 * 2**20


#: Content-Encoding → zlib's wbits: what tritonclient.http's request_compression_algorithm sends ("deflate"
#: is the zlib format, as HTTP means it and tritonclient writes it).
_ENCODINGS = {"gzip": 31, "deflate": 15}


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed body, decompressed; PayloadTooLarge past `limit` bytes (decompression stops there: a small
    body cannot make the server hold gigabytes), InvalidRequest for an unknown encoding or broken data."""
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        raise InvalidRequest(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed, gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"the body is not valid {encoding} data ({exc})") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the body decompresses to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise InvalidRequest(f"the body is not one whole {encoding} stream")
    return data


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: its inputs by name (BYTES as an object array of bytes), the outputs asked for by name
    (empty: all) and whether each comes back binary."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] = field(default_factory=dict)  # name → binary
    binary_by_default: bool = False  # `parameters.binary_data_output`: outputs not named come back binary
    id: str | None = None


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """The request body (and its `Inference-Header-Content-Length`, if it had one) → InferRequest."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes", param="header"
        )
    head, rest = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    if len(head) > MAX_JSON_BYTES:
        raise PayloadTooLarge(
            f"the request's JSON is {len(head)} bytes, over {MAX_JSON_BYTES}: send tensors as binary data "
            "(tritonclient's binary_data=True, its default)"
        )
    try:
        request = json_input.loads(head)
    except json_input.JSONInputError as exc:
        raise InvalidRequest(f"the request's JSON header {exc.reason}") from None
    if not isinstance(request, dict):
        raise InvalidRequest("the request must be a JSON object with 'inputs'")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors", param="inputs")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _input(raw, rest, offset)
        if name in inputs:
            raise InvalidRequest(f"input {name!r} is given twice", param=name)
        inputs[name] = array
        offset += used
    if offset != len(rest):
        raise InvalidRequest(f"the body has {len(rest) - offset} bytes after the inputs' binary data")
    parameters = json_object(request.get("parameters", {}), "parameters")
    outputs: dict[str, bool] = {}
    raw_outputs = request.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidRequest("'outputs' must be a list", param="outputs")
    for raw in raw_outputs:
        out = json_object(raw, "outputs[]")
        wanted = out.get("name")
        if not isinstance(wanted, str):
            raise InvalidRequest("each output needs a 'name'", param="outputs")
        outputs[wanted] = bool(json_object(out.get("parameters", {}), f"{wanted}.parameters").get("binary_data", False))
    request_id = request.get("id")
    return InferRequest(
        inputs,
        outputs,
        bool(parameters.get("binary_data_output", False)),
        request_id if isinstance(request_id, str) else None,
    )


def json_object(value: Any, what: str) -> dict[str, Any]:
    """A parsed JSON value that must be an object (`what` names it in the error), or InvalidRequest."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{what}' must be a JSON object", param=what)
    return value


def _input(raw: Any, rest: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One entry of `inputs` → (name, array, bytes of `rest` it used)."""
    tensor = json_object(raw, "inputs[]")
    name, shape = tensor.get("name"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("each input needs a 'name'", param="inputs")
    if not isinstance(shape, list):
        raise InvalidRequest(f"input {name}: 'shape' must be a list of at most {MAX_DIMS} sizes ≥ 0", param=name)
    datatype, count = checked(name, tensor.get("datatype"), shape)
    size = json_object(tensor.get("parameters", {}), f"{name}.parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(rest) - offset:
            raise InvalidRequest(f"input {name}: binary_data_size {size!r} is not within the body", param=name)
        return name, _raw(rest[offset : offset + size], datatype, shape, count, name), size
    if "data" not in tensor:
        raise InvalidRequest(f"input {name} has neither 'data' nor binary_data_size", param=name)
    flat = _flatten(tensor["data"], name)
    if len(flat) != count:
        raise InvalidRequest(f"input {name}: shape {shape} holds {count} elements, 'data' has {len(flat)}", param=name)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequest(f"input {name}: BYTES data must be strings", param=name)
        array = np.array([v.encode("utf-8", "surrogatepass") for v in flat], dtype=object)
        return name, array.reshape(shape), 0
    wanted = bool if datatype == "BOOL" else (int, float)
    if not all(isinstance(v, wanted) and (datatype == "BOOL" or not isinstance(v, bool)) for v in flat):
        raise InvalidRequest(
            f"input {name}: {datatype} data must be {'booleans' if datatype == 'BOOL' else 'numbers'}", param=name
        )
    try:
        with np.errstate(over="raise"):  # a finite number too large for the type: refused, as a too-large integer
            array = np.array(flat, dtype=NUMERIC[datatype])
    except (OverflowError, ValueError, FloatingPointError):
        raise InvalidRequest(f"input {name}: a value does not fit {datatype}", param=name) from None
    return name, array.reshape(shape), 0


def checked(name: str, datatype: Any, shape: list[Any]) -> tuple[str, int]:
    """A tensor's (datatype, element count) once both are valid (HTTP or gRPC), or InvalidRequest for an unknown
    datatype or a shape that is not at most MAX_DIMS sizes ≥ 0."""
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMERIC):
        raise InvalidRequest(f"input {name}: unknown datatype {datatype!r}", param=name)
    if len(shape) > MAX_DIMS or not all(_size(d) for d in shape):
        raise InvalidRequest(f"input {name}: 'shape' must be a list of at most {MAX_DIMS} sizes ≥ 0", param=name)
    return datatype, math.prod(shape)


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flatten(data: Any, name: str) -> list[Any]:
    """A JSON tensor's `data`, flat (row-major) or nested as the shape; iterative (hostile nesting)."""
    out: list[Any] = []
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(reversed(value))
        else:
            out.append(value)
    return out


def raw_tensor(data: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """A tensor's raw bytes (Triton's binary data, gRPC's raw_input_contents) → array of `shape`."""
    return _raw(data, datatype, shape, checked(name, datatype, shape)[1], name)


def _raw(data: bytes, datatype: str, shape: list[int], count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_elements(data, count, name).reshape(shape)
    return _numeric_binary(data, datatype, count, name).reshape(shape)


def _numeric_binary(data: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    dtype = np.dtype(NUMERIC[datatype])
    if len(data) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name}: {count} {datatype} elements need {count * dtype.itemsize} bytes, got {len(data)}",
            param=name,
        )
    return np.frombuffer(data, dtype=dtype)


def _bytes_elements(data: bytes, count: int, name: str) -> np.ndarray:
    """Serialized BYTES (length-prefixed elements) → object array [count] of bytes."""
    elements: list[bytes] = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise InvalidRequest(f"input {name}: a BYTES element's length is cut off", param=name)
        (length,) = struct.unpack_from("<I", data, at)
        if at + 4 + length > len(data):
            raise InvalidRequest(f"input {name}: a BYTES element runs past its binary data", param=name)
        elements.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    if len(elements) != count:
        raise InvalidRequest(
            f"input {name}: the shape holds {count} elements, the data has {len(elements)}", param=name
        )
    return np.array(elements, dtype=object)


def serialize_bytes(values: list[str]) -> bytes:
    """Strings → a BYTES tensor's raw data: each element's 4-byte little-endian length, then its UTF-8."""
    return b"".join(struct.pack("<I", len(v)) + v for v in (s.encode("utf-8") for s in values))


def bytes_output(name: str, values: list[str], shape: list[int], binary: bool) -> tuple[dict[str, Any], bytes]:
    """One BYTES output: its JSON entry and (binary) its serialized data, else b""."""
    entry: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": shape}
    if not binary:
        entry["data"] = values
        return entry, b""
    data = serialize_bytes(values)
    entry["parameters"] = {"binary_data_size": len(data)}
    return entry, data


def encode_response(header: dict[str, Any], binaries: list[bytes]) -> tuple[bytes, int | None]:
    """The response body, and the `Inference-Header-Content-Length` to send when binary data follows the JSON."""
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    tail = b"".join(binaries)
    return (head + tail, len(head)) if tail else (head, None)
