"""Triton Inference Server's HTTP API (KServe v2) for the Whisper model of TensorRT-LLM's Triton examples, so
that clients written for Triton + TensorRT-LLM (`tritonclient.http`, JSON or binary tensors) work unchanged.

That model (named `whisper`, `whisper_bls` or `infer_bls` in the examples) takes

    WAV             FP32   [batch, samples]  16 kHz mono audio in [-1, 1], rows padded to the longest
    WAV_LENS        INT32  [batch, 1]        optional: each row's length in samples
    TEXT_PREFIX     BYTES  [batch, 1]        the decoder's start: <|startoftranscript|><|tr|><|transcribe|>...
    MAX_NEW_TOKENS  INT32  [batch, 1]        optional: tokens a 30 s window may decode at most

and answers TRANSCRIPTS, BYTES [batch, 1]. Each row is one transcription through the engine every other
request shares, with the file defaults (temperature fallback, as OpenAI's API); audio over 30 s is transcribed
window after window, where the examples stop at 30 s. Those model names mean the server's default model; a
name the server offers (`large-v3`) picks that model.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from halkspeech import __version__
from halkspeech.api.deps import AppState, StateDep
from halkspeech.api.jobs import Job, Outcome, run_job, until_disconnect, with_server_policy
from halkspeech.api.kserve import InferRequest, bytes_output, encode_response, parse_request
from halkspeech.errors import HalkSpeechError, InvalidRequest, ModelNotFound
from halkspeech.model.languages import LANGUAGES
from halkspeech.model.tokenizer import Task
from halkspeech.transcription.types import TranscribeOptions

router = APIRouter(prefix="/v2", tags=["Triton (KServe v2)"])
health_router = APIRouter(prefix="/v2", tags=["Triton (KServe v2)"])  # open, as /health

#: The names TensorRT-LLM's Triton examples give the Whisper model: they mean this server's default model.
EXAMPLE_MODELS = frozenset({"whisper", "whisper_bls", "infer_bls"})
VERSION = "1"
MAX_ROWS = 64  # rows of one request; each is a transcription under the server's admission limits
MAX_WINDOW_TOKENS = 224  # Whisper's own limit for a 30 s window (openai-whisper's sample_len)
OUTPUT = "TRANSCRIPTS"
OFF_LOOP_BYTES = 256 * 1024  # a larger body is parsed on a worker thread, not on the event loop
INPUTS = {"WAV": "FP32", "WAV_LENS": "INT32", "TEXT_PREFIX": "BYTES", "MAX_NEW_TOKENS": "INT32"}
_SPECIAL = re.compile(r"<\|([^|<>]*)\|>")


# --- the server and its models ---------------------------------------------------------------------------
@health_router.get("/health/live", summary="Triton: the server is up")
async def live() -> Response:
    return Response(status_code=200)


@health_router.get("/health/ready", summary="Triton: the server takes requests")
async def ready(state: StateDep) -> Response:
    stopping = state.stopping.is_set
    alive = all(model.engine.alive for item in state.pool.loaded() for model in item.replicas.models)
    return Response(status_code=200 if alive and not stopping else 503)


@router.get("", summary="Triton: server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "halkspeech", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/models/{model}", summary="Triton: model metadata")
@router.get("/models/{model}/versions/{version}", summary="Triton: model metadata", include_in_schema=False)
async def model_metadata(state: StateDep, model: str, version: str = VERSION) -> dict[str, Any]:
    _model(state, model, version)
    return {
        "name": model,
        "versions": [VERSION],
        "platform": "halkspeech",
        "inputs": [
            {"name": name, "datatype": kind, "shape": [-1, -1 if name == "WAV" else 1]} for name, kind in INPUTS.items()
        ],
        "outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [-1, 1]}],
    }


@router.get("/models/{model}/ready", summary="Triton: the model takes requests")
@router.get(
    "/models/{model}/versions/{version}/ready", summary="Triton: the model takes requests", include_in_schema=False
)
async def model_ready(state: StateDep, model: str, version: str = VERSION) -> Response:
    _model(state, model, version)
    return Response(status_code=200)


def _model(state: AppState, model: str, version: str) -> str | None:
    """The pool's name for a Triton model name (None: the default), or ModelNotFound (404)."""
    if version not in ("", VERSION):
        raise ModelNotFound(f"model {model!r} has no version {version!r}; this server serves version {VERSION}")
    name = None if model in EXAMPLE_MODELS else model
    state.pool.check(name)
    return name


# --- inference -------------------------------------------------------------------------------------------
@router.post("/models/{model}/infer", summary="Triton: transcribe (KServe v2 inference)")
@router.post("/models/{model}/versions/{version}/infer", summary="Triton: transcribe", include_in_schema=False)
async def infer(request: Request, state: StateDep, model: str, version: str = VERSION) -> Response:
    name = _model(state, model, version)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    length = request.headers.get("inference-header-content-length")
    if length is not None and not length.isdigit():
        raise InvalidRequest(f"Inference-Header-Content-Length must be a number of bytes, got {length!r}")
    body = await request.body()
    parse = functools.partial(parse_request, body, None if length is None else int(length))
    parsed = await asyncio.to_thread(parse) if len(body) > OFF_LOOP_BYTES else parse()  # JSON: ~30 ms a MB
    unknown = set(parsed.outputs) - {OUTPUT}
    if unknown:
        raise InvalidRequest(f"unknown output {sorted(unknown)[0]!r}: the model has only {OUTPUT}")
    server = state.settings.server
    jobs = [Job(with_server_policy(options, server), name, samples=audio) for audio, options in _rows(parsed)]
    outcomes = await until_disconnect(request.receive, _all(state, jobs), state.stopping)
    binary = parsed.outputs.get(OUTPUT, parsed.binary_by_default)
    entry, data = bytes_output(OUTPUT, [o.transcript.text.strip() for o in outcomes], [len(outcomes), 1], binary)
    header: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": [entry]}
    if parsed.id is not None:
        header["id"] = parsed.id
    body, header_length = encode_response(header, [data])
    if header_length is None:
        return Response(body, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(body, media_type="application/octet-stream", headers=headers)


async def _all(state: AppState, jobs: list[Job]) -> list[Outcome]:
    """Every row's transcription at once; the first failure cancels the others and is the request's error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run_job(state, job)) for job in jobs]
    except ExceptionGroup as failed:
        first = next((e for e in failed.exceptions if isinstance(e, HalkSpeechError)), None)
        if first is None:
            raise
        raise first from None
    return [task.result() for task in tasks]


def _rows(request: InferRequest) -> list[tuple[np.ndarray, TranscribeOptions]]:
    """The request's rows: (16 kHz float32 audio [n], options)."""
    unknown = set(request.inputs) - set(INPUTS)
    if unknown:
        raise InvalidRequest(f"unknown input {sorted(unknown)[0]!r}: the model takes {', '.join(INPUTS)}")
    for name, array in request.inputs.items():
        kind = "BYTES" if array.dtype == object else str(array.dtype)
        if kind != {"FP32": "float32", "INT32": "int32", "BYTES": "BYTES"}[INPUTS[name]]:
            raise InvalidRequest(f"input {name} must be {INPUTS[name]}", param=name)
    if "WAV" not in request.inputs:
        raise InvalidRequest("the input WAV (FP32 [batch, samples], 16 kHz) is required", param="WAV")
    wav = request.inputs["WAV"]
    wav = wav[None] if wav.ndim == 1 else wav
    if wav.ndim != 2 or not 1 <= len(wav) <= MAX_ROWS:
        raise InvalidRequest(
            f"WAV must be [batch, samples] with 1 to {MAX_ROWS} rows, got shape {list(wav.shape)}", param="WAV"
        )
    if wav.shape[1] == 0:
        raise InvalidRequest("WAV has no samples", param="WAV")
    rows = len(wav)
    lens = _per_row(request.inputs.get("WAV_LENS"), rows, "WAV_LENS")
    prefixes = _per_row(request.inputs.get("TEXT_PREFIX"), rows, "TEXT_PREFIX")
    max_tokens = _per_row(request.inputs.get("MAX_NEW_TOKENS"), rows, "MAX_NEW_TOKENS")
    out = []
    for i in range(rows):
        n = wav.shape[1] if lens is None else int(lens[i])
        if not 0 < n <= wav.shape[1]:
            raise InvalidRequest(
                f"WAV_LENS[{i}] is {n}: it must be 1 to the row's {wav.shape[1]} samples", param="WAV_LENS"
            )
        audio = np.array(wav[i, :n], dtype=np.float32)  # a copy: the body's view is read-only
        if not np.isfinite(audio).all():
            raise InvalidRequest(f"WAV row {i} holds a NaN or an infinity", param="WAV")
        limit = None if max_tokens is None else int(max_tokens[i])
        if limit is not None and not 1 <= limit <= MAX_WINDOW_TOKENS:
            raise InvalidRequest(
                f"MAX_NEW_TOKENS must be 1 to {MAX_WINDOW_TOKENS}, got {limit}", param="MAX_NEW_TOKENS"
            )
        prefix = _text(prefixes[i]) if prefixes is not None else ""
        out.append((audio, options_from_prefix(prefix, limit)))
    return out


def _per_row(array: np.ndarray | None, rows: int, name: str) -> np.ndarray | None:
    """An optional [batch, 1] (or [batch], or one for all) input → one value per row."""
    if array is None:
        return None
    flat = array.reshape(-1)
    if len(flat) == 1:
        return np.repeat(flat, rows)
    if len(flat) != rows:
        raise InvalidRequest(f"{name} has {len(flat)} values for {rows} rows of WAV", param=name)
    return flat


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("TEXT_PREFIX is not UTF-8", param="TEXT_PREFIX") from None


def options_from_prefix(prefix: str, max_new_tokens: int | None = None) -> TranscribeOptions:
    """TEXT_PREFIX → options. `<|startofprev|>` text before `<|startoftranscript|>` is the prompt; after it come
    a language (`<|tr|>`, none: detect), `<|transcribe|>` or `<|translate|>`, and `<|notimestamps|>`; any text
    after those starts the transcript (openai-whisper's `prefix`)."""
    before, sot, after = prefix.partition("<|startoftranscript|>")
    if not sot:
        before, after = "", prefix
    prompt = None
    if before.strip():
        if not before.startswith("<|startofprev|>"):
            raise InvalidRequest(
                "TEXT_PREFIX: text before <|startoftranscript|> must follow <|startofprev|>", param="TEXT_PREFIX"
            )
        prompt = before.removeprefix("<|startofprev|>").strip() or None
    language: str | None = None
    task: Task = "transcribe"
    timestamps = True
    while (match := _SPECIAL.match(after)) is not None:
        token = match.group(1)
        if token in LANGUAGES and language is None:
            language = token
        elif token == "transcribe":
            task = "transcribe"
        elif token == "translate":
            task = "translate"
        elif token == "notimestamps":
            timestamps = False
        else:
            raise InvalidRequest(
                f"TEXT_PREFIX: <|{token}|> is not taken here (a language such as <|tr|>, <|transcribe|>, "
                "<|translate|>, <|notimestamps|>)",
                param="TEXT_PREFIX",
            )
        after = after[match.end() :]
    if _SPECIAL.search(after) or (prompt is not None and _SPECIAL.search(prompt)):
        raise InvalidRequest("TEXT_PREFIX: special tokens go before the text", param="TEXT_PREFIX")
    return TranscribeOptions(
        language=language,
        task=task,
        initial_prompt=prompt,
        prefix=after or None,
        without_timestamps=not timestamps,
        max_new_tokens=max_new_tokens,
    )
