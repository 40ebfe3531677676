"""Triton Inference Server's HTTP API (KServe v2) for the Whisper model of TensorRT-LLM's Triton examples, so
that clients written for Triton + TensorRT-LLM (`tritonclient.http`, JSON or binary tensors) work unchanged.
The model (its inputs, a transcription per row) is api/triton_model.py's; the body's codec api/kserve.py's; the
statistics and repository extensions are api/triton_stats.py's and api/triton_repository.py's.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Request, Response

from halkspeech import __version__
from halkspeech.api import triton_model, triton_repository
from halkspeech.api.deps import StateDep
from halkspeech.api.kserve import InferRequest, bytes_output, encode_response, inflate, parse_request
from halkspeech.errors import InvalidRequest

router = APIRouter(prefix="/v2", tags=["Triton (KServe v2)"])
health_router = APIRouter(prefix="/v2", tags=["Triton (KServe v2)"])  # open, as /health
OFF_LOOP_BYTES = 256 * 1024  # a larger body is read on a worker thread (JSON: ~30 ms a MB), not on the loop
VERSION = triton_model.VERSION


@health_router.get("/health/live", summary="Triton: the server is up")
async def live() -> Response:
    return Response(status_code=200)


@health_router.get("/health/ready", summary="Triton: the server takes requests")
async def ready(state: StateDep) -> Response:
    return Response(status_code=200 if triton_model.server_ready(state) else 503)


@router.get("", summary="Triton: server metadata")
async def server_metadata() -> dict[str, Any]:
    extensions = ["binary_tensor_data", *triton_model.EXTENSIONS]
    return {"name": "halkspeech", "version": __version__, "extensions": extensions}


@router.get("/models/stats", summary="Triton: every model's statistics")  # before /models/{model}
async def all_statistics(state: StateDep) -> dict[str, Any]:
    return {"model_stats": triton_model.statistics(state, "")}


@router.get("/models/{model}", summary="Triton: model metadata")
@router.get("/models/{model}/versions/{version}", summary="Triton: model metadata", include_in_schema=False)
async def model_metadata(state: StateDep, model: str, version: str = VERSION) -> dict[str, Any]:
    triton_model.resolve(state, model, version)
    return triton_model.metadata(model)


@router.get("/models/{model}/config", summary="Triton: model configuration")
@router.get("/models/{model}/versions/{version}/config", summary="Triton: model configuration", include_in_schema=False)
async def model_config(state: StateDep, model: str, version: str = VERSION) -> dict[str, Any]:
    triton_model.resolve(state, model, version)
    return triton_model.config(model)


@router.get("/models/{model}/stats", summary="Triton: the model's statistics")
@router.get("/models/{model}/versions/{version}/stats", summary="Triton: statistics", include_in_schema=False)
async def model_statistics(state: StateDep, model: str, version: str = VERSION) -> dict[str, Any]:
    return {"model_stats": triton_model.statistics(state, model, version)}


@router.get("/models/{model}/ready", summary="Triton: the model takes requests")
@router.get("/models/{model}/versions/{version}/ready", summary="Triton: model ready", include_in_schema=False)
async def model_ready(state: StateDep, model: str, version: str = VERSION) -> Response:
    triton_model.resolve(state, model, version)
    return Response(status_code=200)


@router.post("/repository/index", summary="Triton: the models, loaded or not")
async def repository_index(request: Request, state: StateDep) -> list[dict[str, str]]:
    fields = triton_repository.body_fields(await request.body())
    return triton_repository.index(state, triton_repository.http_ready(fields))


@router.post("/repository/models/{model}/load", summary="Triton: load a model")
async def repository_load(request: Request, state: StateDep, model: str) -> Response:
    fields = triton_repository.body_fields(await request.body())
    await triton_repository.load(state, model, triton_repository.http_parameters(fields))
    return Response(status_code=200)


@router.post("/repository/models/{model}/unload", summary="Triton: unload a model")
async def repository_unload(request: Request, state: StateDep, model: str) -> Response:
    fields = triton_repository.body_fields(await request.body())
    await triton_repository.unload(state, model, triton_repository.http_parameters(fields))
    return Response(status_code=200)


@router.post("/models/{model}/infer", summary="Triton: transcribe (KServe v2 inference)")
@router.post("/models/{model}/versions/{version}/infer", summary="Triton: transcribe", include_in_schema=False)
async def infer(request: Request, state: StateDep, model: str, version: str = VERSION) -> Response:
    name = triton_model.resolve(state, model, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    length = request.headers.get("inference-header-content-length")
    # ASCII digits only, and few: str.isdigit also passes "²" (latin-1 headers), and int() refuses both that and
    # 4301 digits or more (CPython's limit): a ValueError here was a 500
    if length is not None and not (length.isascii() and length.isdigit() and len(length) <= 19):
        raise InvalidRequest(f"Inference-Header-Content-Length must be a number of bytes, got {length[:40]!r}")
    body = await request.body()
    with state.triton_stats.measure(triton_model.stats_name(state, model)) as clock:
        limit = int(state.settings.server.max_upload_mb * 1e6)
        read = functools.partial(_read, body, encoding, limit, None if length is None else int(length))
        off_loop = len(body) > OFF_LOOP_BYTES or encoding != "identity"  # a small gzip may inflate to MBs
        parsed, rows = await asyncio.to_thread(read) if off_loop else read()
        clock.input_read(len(rows))
        texts, queue_s = await triton_model.transcribe(state, name, rows, request.receive)
        clock.inferred(queue_s)
        binary = parsed.outputs.get(triton_model.OUTPUT, parsed.binary_by_default)
        entry, data = bytes_output(triton_model.OUTPUT, texts, [len(texts), 1], binary)
        header: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": [entry]}
        if parsed.id is not None:
            header["id"] = parsed.id
        content, header_length = encode_response(header, [data])
        clock.output_written()
    if header_length is None:
        return Response(content, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(content, media_type="application/octet-stream", headers=headers)


def _read(
    body: bytes, encoding: str, limit: int, header_length: int | None
) -> tuple[InferRequest, list[triton_model.Row]]:
    """The request and its rows, the body decompressed first if it came so (tritonclient's
    request_compression_algorithm); on a worker thread for a large body."""
    if encoding != "identity":
        body = inflate(body, encoding, limit)
    parsed = parse_request(body, header_length)
    triton_model.check_outputs(set(parsed.outputs))
    return parsed, triton_model.rows(parsed.inputs)
