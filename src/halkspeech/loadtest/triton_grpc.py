"""The load testers' clients of Triton's gRPC API (`halkspeech loadtest http --api triton-grpc|triton-grpc-stream`,
`bench server --api ...`), so the same load can go to this server and to a Triton + TensorRT-LLM one:

- `triton-grpc`: unary ModelInfer calls through `tritonclient.grpc.aio`, as TensorRT-LLM's Whisper client makes
  them; a failure counts under its gRPC status;
- `triton-grpc-stream`: one ModelStreamInfer stream a client process, as perf_analyzer's --streaming drives
  it; each client's request goes out on it with its own id and waits for the answer with that id (answers come
  in the order requests finish). An answer with an error_message counts as `error: <message>`; a stream that
  breaks fails every request waiting on it with its gRPC status.

Either way the request is the examples': raw FP32 WAV [1, samples] and TEXT_PREFIX. Needs the grpc extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from halkspeech.api.kserve import serialize_bytes
from halkspeech.errors import InvalidRequest
from halkspeech.loadtest.clips import TRITON_MODEL, Clip, Send, text_prefix

if TYPE_CHECKING:
    from halkspeech.loadtest.http import HttpLoadConfig

#: Messages of any size both ways (the server's own limit, server.max_upload_mb, is the one that applies).
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_CLOSE_WAIT_S = 30.0  # at the end, for the server to end a stream it owes nothing (it answers every request first)
_ACCEPT_WAIT_S = 2.0  # at the start, for the server's headers (or its refusal) before the first request


def tritonclient_grpc() -> SimpleNamespace:
    """tritonclient's gRPC client (`aio`), its exception and service definition (`pb`, `stubs`) and grpcio
    (`grpc`), or a clear error naming what to install."""
    try:
        import grpc
        import tritonclient.grpc.aio as aio
        from tritonclient.grpc import service_pb2, service_pb2_grpc
        from tritonclient.utils import InferenceServerException
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when its grpc extra is incomplete
        raise InvalidRequest(f"the triton-grpc APIs need tritonclient's gRPC client: pip install 'halkspeech[grpc]' "
                             f"({exc})") from None  # fmt: skip
    return SimpleNamespace(aio=aio, error=InferenceServerException, pb=service_pb2, stubs=service_pb2_grpc, grpc=grpc)


@contextlib.asynccontextmanager
async def grpc_sender(cfg: HttpLoadConfig) -> AsyncIterator[Send]:
    """Unary calls through tritonclient.grpc.aio: one channel for this process's clients, the inputs of each clip
    built once."""
    triton = tritonclient_grpc()
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    model = cfg.model or TRITON_MODEL
    inputs: dict[Clip, list[Any]] = {}
    async with triton.aio.InferenceServerClient(url=cfg.endpoint, ssl=uses_tls(cfg)) as client:

        async def send(clip: Clip) -> str | None:
            if clip not in inputs:
                inputs[clip] = _client_inputs(triton.aio, clip, cfg.language)
            try:
                await client.infer(model, inputs[clip], headers=headers, client_timeout=cfg.timeout_s)
            except triton.error as exc:
                status = str(exc.status() or "error").removeprefix("StatusCode.")
                return "timeout" if status == "DEADLINE_EXCEEDED" else status
            return None

        yield send


@contextlib.asynccontextmanager
async def grpc_stream_sender(cfg: HttpLoadConfig) -> AsyncIterator[Send]:
    """One ModelStreamInfer stream for this process's clients (grpcio and the service's stubs: tritonclient's
    stream reports an error_message without the request's id, which this needs to find the request's client)."""
    triton = tritonclient_grpc()
    grpc, pb = triton.grpc, triton.pb
    if uses_tls(cfg):
        channel = grpc.aio.secure_channel(cfg.endpoint, grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(cfg.endpoint, options=_CHANNEL_OPTIONS)
    metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else None
    outgoing: asyncio.Queue[Any] = asyncio.Queue()  # requests to send; None: the last was sent
    waiting: dict[str, asyncio.Future[str | None]] = {}  # request id → its client's answer
    templates: dict[Clip, Any] = {}
    ids = itertools.count()
    broken: str | None = None  # why the stream can take no more requests

    call = triton.stubs.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=metadata)

    async def write() -> None:
        """One writer (a call takes one write at a time). It waits for the server to take the stream first: a
        write racing a refusal (a wrong key) turns the call's status into grpc's 'Internal error from Core'. This
        server sends its headers as it takes a stream; one that sends nothing before its first answer gets the
        requests after _ACCEPT_WAIT_S. A write to a call that has ended stops it (the collector has its status)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.initial_metadata(), _ACCEPT_WAIT_S)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while not call.done() and (request := await outgoing.get()) is not None:
                await call.write(request)
            await call.done_writing()

    async def collect() -> None:
        nonlocal broken
        try:
            async for response in call:
                future = waiting.pop(response.infer_response.id, None)
                if future is not None and not future.done():
                    message = response.error_message
                    future.set_result(f"error: {message[:100]}" if message else None)
            broken = "stream_ended"
        except grpc.aio.AioRpcError as exc:
            broken = exc.code().name
        for future in waiting.values():
            if not future.done():
                future.set_result(broken)
        waiting.clear()

    collector, writer = asyncio.ensure_future(collect()), asyncio.ensure_future(write())

    async def send(clip: Clip) -> str | None:
        if broken is not None:
            return broken
        if clip not in templates:
            templates[clip] = _request(pb, clip, cfg.model or TRITON_MODEL, cfg.language)
        request = pb.ModelInferRequest()
        request.CopyFrom(templates[clip])
        request.id = str(next(ids))
        answer = waiting[request.id] = asyncio.get_running_loop().create_future()
        outgoing.put_nowait(request)
        try:
            return await asyncio.wait_for(answer, cfg.timeout_s)
        except TimeoutError:
            waiting.pop(request.id, None)
            return "timeout"

    try:
        yield send
    finally:
        outgoing.put_nowait(None)  # half-closed: the server ends the stream once it has answered everything
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(collector), _CLOSE_WAIT_S)
        call.cancel()
        collector.cancel()
        writer.cancel()
        await channel.close()


def uses_tls(cfg: HttpLoadConfig) -> bool:
    return httpx.URL(cfg.url).scheme == "https"


def _client_inputs(aio: Any, clip: Clip, language: str | None) -> list[Any]:
    samples = np.frombuffer(clip.samples, "<f4")[None]  # [1, samples]
    wav = aio.InferInput("WAV", list(samples.shape), "FP32")
    wav.set_data_from_numpy(samples)
    prefix = aio.InferInput("TEXT_PREFIX", [1, 1], "BYTES")
    prefix.set_data_from_numpy(np.array([[text_prefix(language).encode()]], dtype=object))
    return [wav, prefix]


def _request(pb: Any, clip: Clip, model: str, language: str | None) -> Any:
    """The ModelInferRequest tritonclient would build for _client_inputs (raw_input_contents, its way)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="WAV", datatype="FP32", shape=[1, len(clip.samples) // 4])
    request.inputs.add(name="TEXT_PREFIX", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.extend([clip.samples, serialize_bytes([text_prefix(language)])])
    return request
