"""Triton Inference Server's gRPC API (KServe v2's `inference.GRPCInferenceService`) for the Whisper model of
TensorRT-LLM's Triton examples, so that `tritonclient.grpc` clients work unchanged (Triton serves it on port
8001). The model is api/triton_model.py's, as over HTTP; this module is the wire.

It runs on the HTTP server's event loop (`api/server.py` starts and stops it with uvicorn) and shares its
state: the same API keys (`authorization: Bearer <key>` or `x-api-key` metadata), admission limits, models and
shutdown. The service definition is the one `tritonclient[grpc]` ships (`pip install 'halkspeech[grpc]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from halkspeech import __version__
from halkspeech.api import triton_model, triton_repository
from halkspeech.api.deps import AppState, key_refusal, presented_key
from halkspeech.api.errors import status_for
from halkspeech.api.grpc_health import add_health
from halkspeech.api.kserve import NUMERIC, checked, raw_tensor, serialize_bytes
from halkspeech.errors import HalkSpeechError, InvalidRequest, ModelNotFound

MISSING: str | None = None  # why the gRPC API cannot run here (the optional extra is missing or incomplete)
try:
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc
except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when its grpc extra is incomplete
    grpc = None
    MISSING = f"server.grpc_port needs grpcio and Triton's service definition: pip install 'halkspeech[grpc]' ({exc})"

log = logging.getLogger(__name__)
_CLOSING = object()  # put in a stream's answers when the server stops
STOPPING = "the server is shutting down: send this request again to another server or later"

OFF_LOOP_BYTES = 256 * 1024  # a request with more raw data is read on a worker thread, as over HTTP
MAX_CONTENT_VALUES = 4_000_000  # values of one tensor in typed contents (4 minutes of 16 kHz audio)

#: HTTP status of a domain error → the gRPC code Triton uses for it.
_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
          409: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
          503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip
#: KServe datatype → the InferTensorContents field that carries it (when not sent as raw_input_contents).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}  # fmt: skip


@dataclass
class TritonGrpc:
    """The running gRPC server, the port it took, and its calls in flight (the shutdown waits for them)."""

    server: Any
    port: int
    service: _Service

    @property
    def busy(self) -> bool:
        return self.service.in_flight > 0

    async def stop(self, grace: float) -> None:
        """No new call; streams end once answered; what is still running after `grace` seconds is cancelled."""
        self.service.close()
        await self.server.stop(grace)


async def start(state: AppState, host: str, port: int) -> TritonGrpc:
    """A started gRPC server on host:port (0: any free port)."""
    if grpc is None:
        raise RuntimeError(MISSING)
    limit = int(state.settings.server.max_upload_mb * 1e6)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a port another process listens on is an error, not a shared port
    ]
    server = grpc.aio.server(options=options)
    service = _Service(state)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    if not add_health(server, state, lambda: service.closing):
        log.info("no grpc.health.v1 service on the gRPC port: grpcio-health-checking is not installed")
    served = state.settings.server
    pair = None  # (key, certificate): TLS with the HTTP port's pair
    if served.ssl_certfile is not None and served.ssl_keyfile is not None:
        pair = (served.ssl_keyfile.read_bytes(), served.ssl_certfile.read_bytes())
    try:
        if pair is not None:
            taken = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([pair]))
        else:
            taken = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc's "failed to bind"
        raise OSError(str(exc)) from None
    await server.start()
    log.info("Triton gRPC API on %s:%d%s", host, taken, " (TLS)" if pair is not None else "")
    return TritonGrpc(server, taken, service)


class _Service(service_pb2_grpc.GRPCInferenceServiceServicer if grpc is not None else object):  # type: ignore[misc]
    """The KServe v2 calls a Whisper client makes, unary and streaming, and Triton's configuration, statistics
    and repository extensions; the rest (shared memory, tracing, logging) answer UNIMPLEMENTED (the generated
    base class)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.in_flight = 0  # inferences running (ModelInfer calls and streamed requests)
        self.streams: set[asyncio.Queue[Any]] = set()  # the open ModelStreamInfer calls' answer queues
        self.closing = False

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=triton_model.server_ready(self.state))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        return pb.ServerMetadataResponse(name="halkspeech", version=__version__, extensions=triton_model.EXTENSIONS)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        try:
            triton_model.resolve(self.state, request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._resolve(request, context)
        meta = triton_model.metadata(request.name)
        tensors = [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]]
        outputs = [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]]
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], inputs=tensors, outputs=outputs
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._resolve(request, context)
        return pb.ModelConfigResponse(config=json_format.ParseDict(triton_model.config(request.name), mc.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Triton's statistics (api/triton_stats.py): the named model's, or every model's for no name."""
        async with self._answering(context):
            stats = triton_model.statistics(self.state, request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async with self._answering(context, request.repository_name):
            entries = triton_repository.index(self.state, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async with self._answering(context, request.repository_name):
            await triton_repository.load(self.state, request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async with self._answering(context, request.repository_name):
            await triton_repository.unload(self.state, request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    async def _resolve(self, request: Any, context: Any) -> None:
        """A model call's key and model name (and version), or its status: UNAUTHENTICATED, NOT_FOUND."""
        async with self._answering(context):
            triton_model.resolve(self.state, request.name, request.version)

    @contextlib.asynccontextmanager
    async def _answering(self, context: Any, repository: str | None = None) -> AsyncIterator[None]:
        """A call's key checked (and a repository call's repository); a domain error in the block ends the call
        with its status (context.abort raises, so nothing after the block runs)."""
        await self._authorize(context)
        try:
            if repository is not None:
                triton_repository.check_repository(repository)
            yield
        except HalkSpeechError as exc:
            await _abort(context, exc)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        try:
            return await self._infer(request)
        except HalkSpeechError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Triton's streaming call (tritonclient's `start_stream` and `async_stream_infer`): every request is
        transcribed as it arrives, beside the stream's others, and answered once, when it is done (so in the
        order they finish; each response carries its request's id). A request that fails is answered with its
        error_message, as Triton does, and the stream goes on. The key is checked once, from the stream's
        metadata. A client that ends the stream early cancels what it left running; at shutdown the stream ends
        (OK) once what it had running is answered, as a live WebSocket's turns are."""
        await self._authorize(context)
        await context.send_initial_metadata(())  # taken: a client may write now without racing a refusal
        answers: asyncio.Queue[Any] = asyncio.Queue()  # responses; None: no more; _CLOSING: the server stops
        running: set[asyncio.Task[None]] = set()
        pending = 0  # requests read and not yet answered

        def reply(request: Any, response: Any = None, error: str = "") -> None:
            nonlocal pending
            pending -= 1
            if response is None:
                response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            if _wants_final_flag(request):  # the one answer is the request's last, as Triton flags it
                response.parameters["triton_final_response"].bool_param = True
            answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response, error_message=error))

        async def answer(request: Any) -> None:
            try:
                response = await self._infer(request)
            except Exception as exc:  # every request gets its answer, even one that met a bug
                if not isinstance(exc, HalkSpeechError):
                    log.exception("gRPC stream request failed")
                why = str(exc) if isinstance(exc, HalkSpeechError) else f"internal error ({type(exc).__name__})"
                reply(request, error=why)
            else:
                reply(request, response)

        async def read() -> None:
            nonlocal pending
            try:
                async for request in requests:
                    pending += 1
                    if self.closing:
                        reply(request, error=STOPPING)
                        continue
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:  # the client sent its last: answer what it is owed
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)  # all answered and the client sent its last, or its stream broke

        self.streams.add(answers)
        reader = asyncio.ensure_future(read())
        try:
            while True:
                response = await answers.get()
                if response is None:
                    await reader  # a failure to read the stream (the client's) ends the call with it
                    return
                if response is not _CLOSING:
                    yield response
                if self.closing and not pending and answers.empty():
                    return  # the server stops and this stream is owed nothing
        finally:
            self.streams.discard(answers)
            for task in (reader, *running):
                task.cancel()

    def close(self) -> None:
        """The server stops: open streams end once their running requests are answered."""
        self.closing = True
        for answers in self.streams:
            answers.put_nowait(_CLOSING)

    async def _infer(self, request: Any) -> Any:
        """One inference, counted in flight (the shutdown waits for it); HalkSpeechError for a bad request."""
        self.in_flight += 1
        try:
            model = triton_model.resolve(self.state, request.model_name, request.model_version)
            with self.state.triton_stats.measure(triton_model.stats_name(self.state, request.model_name)) as clock:
                triton_model.check_outputs({output.name for output in request.outputs})
                size = sum(len(raw) for raw in request.raw_input_contents)
                read = functools.partial(_rows, request)
                rows = await asyncio.to_thread(read) if size > OFF_LOOP_BYTES else read()
                clock.input_read(len(rows))
                texts, queue_s = await triton_model.transcribe(self.state, model, rows, _never_disconnects)
                clock.inferred(queue_s)
                response = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=triton_model.VERSION, id=request.id
                )
                output = response.outputs.add()
                output.name, output.datatype = triton_model.OUTPUT, "BYTES"
                output.shape.extend([len(texts), 1])
                response.raw_output_contents.append(serialize_bytes(texts))
                clock.output_written()
        finally:
            self.in_flight -= 1
        return response

    async def _authorize(self, context: Any) -> None:
        """The HTTP API's keys, from the call's metadata (its keys are lowercase)."""
        keys = self.state.settings.server.api_keys
        if not keys:
            return
        metadata = {key.lower(): str(value) for key, value in (context.invocation_metadata() or ())}
        token = presented_key(metadata.get("authorization", ""), metadata.get("x-api-key", ""))
        why = key_refusal(token, keys, send="authorization: Bearer <key>")
        if why is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)


def _wants_final_flag(request: Any) -> bool:
    """tritonclient's `enable_empty_final_response`: the client reads each response's triton_final_response to
    know when a request is done (decoupled models answer a request several times); without it, it would wait."""
    flag = request.parameters.get("triton_enable_empty_final_response")
    return flag is not None and _parameter(flag) is True


def _parameters(parameters: Any) -> dict[str, Any]:
    """A repository request's parameters by name, as Python values."""
    return {name: _parameter(value) for name, value in parameters.items()}


def _parameter(value: Any) -> Any:
    """One request parameter's value (InferParameter, ModelRepositoryParameter: a oneof of bool, int64, string
    ...; unset: False, the bool's default)."""
    return getattr(value, value.WhichOneof("parameter_choice") or "bool_param")


def _rows(request: Any) -> list[triton_model.Row]:
    return triton_model.rows(_inputs(request))


def _inputs(request: Any) -> dict[str, np.ndarray]:
    """The request's tensors by name, from raw_input_contents (tritonclient's way) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, [int(d) for d in tensor.shape]
        if name in inputs:
            raise InvalidRequest(f"input {name!r} is given twice", param=name)
        if raw:
            inputs[name] = raw_tensor(raw[i], datatype, shape, name)
            continue
        datatype, count = checked(name, datatype, shape)
        field = _CONTENTS.get(datatype)
        if field is None:  # a datatype with no typed field (FP16): raw_input_contents only
            raise InvalidRequest(f"input {name}: {datatype} travels only as raw_input_contents", param=name)
        contents = getattr(tensor.contents, field)
        if len(contents) > MAX_CONTENT_VALUES:  # as Python objects, ~30× the bytes they came in
            raise InvalidRequest(
                f"input {name}: {len(contents)} values in typed contents, over {MAX_CONTENT_VALUES}: send "
                "raw_input_contents (tritonclient's way)",
                param=name,
            )
        values = list(contents)
        if len(values) != count:
            raise InvalidRequest(f"input {name}: shape {shape} does not hold its {len(values)} values", param=name)
        try:
            array: np.ndarray = np.array(values, dtype=object if datatype == "BYTES" else NUMERIC[datatype])
        except (OverflowError, ValueError):
            raise InvalidRequest(f"input {name}: a value does not fit {datatype}", param=name) from None
        inputs[name] = array.reshape(shape)
    return inputs


async def _never_disconnects() -> dict[str, Any]:
    """An ASGI `receive` that never reports a disconnect: a gRPC call that ends is cancelled by grpc itself."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _abort(context: Any, exc: HalkSpeechError) -> NoReturn:
    status = status_for(exc)
    code = getattr(grpc.StatusCode, _CODES.get(status, "INTERNAL"))
    if status >= 500:
        log.warning("gRPC request failed: %s: %s", type(exc).__name__, exc)
    await context.abort(code, str(exc))
    raise AssertionError("context.abort raises")  # for the type checker: abort never returns
