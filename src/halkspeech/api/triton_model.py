"""The Whisper model of TensorRT-LLM's Triton examples, as this server serves it over Triton's HTTP (routes/
triton.py) and gRPC (triton_grpc.py) APIs: its inputs as arrays → one transcription per row → its output.

    WAV             FP32   [batch, samples]  16 kHz mono audio in [-1, 1], rows padded to the longest
    WAV_LENS        INT32  [batch, 1]        optional: each row's length in samples
    TEXT_PREFIX     BYTES  [batch, 1]        the decoder's start: <|startoftranscript|><|tr|><|transcribe|>...
    MAX_NEW_TOKENS  INT32  [batch, 1]        optional: tokens a 30 s window may decode at most

and TRANSCRIPTS, BYTES [batch, 1], out. Each row is one transcription through the engine every other request
shares, with the file defaults (temperature fallback, as OpenAI's API); audio over 30 s is transcribed window
after window, where the examples stop at 30 s. The examples' model names (`whisper`, `whisper_bls`,
`whisper_bls_async`, `infer_bls`) mean the server's default model; a name the server offers (`large-v3`) picks
that model.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, NamedTuple

import numpy as np
from starlette.types import Receive

from halkspeech.api.deps import AppState
from halkspeech.api.jobs import Job, Outcome, run_job, until_disconnect, with_server_policy
from halkspeech.api.triton_stats import VERSION
from halkspeech.errors import HalkSpeechError, InvalidRequest, ModelNotFound
from halkspeech.model.languages import LANGUAGES
from halkspeech.model.tokenizer import Task
from halkspeech.transcription.types import TranscribeOptions

#: The names TensorRT-LLM's Triton examples give the Whisper model: they mean this server's default model.
EXAMPLE_MODELS = frozenset({"whisper", "whisper_bls", "whisper_bls_async", "infer_bls"})
#: The protocol's extensions both wires serve (HTTP adds binary_tensor_data, its own).
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]
MAX_ROWS = 64  # rows of one request; each is a transcription under the server's admission limits
MAX_WINDOW_TOKENS = 224  # Whisper's own limit for a 30 s window (openai-whisper's sample_len)
#: A TEXT_PREFIX at most: its prompt and its prefix keep a few hundred tokens each (Tokenizer.decoder_prompt), which
#: this many characters already exceed. Unbounded, a 20 MB prefix held the event loop 10 s (tokenized for every
#: window), and the special tokens' parse is quadratic (2.8 MB of <|transcribe|>: 6 s of a worker thread).
MAX_TEXT_PREFIX_CHARS = 4096
OUTPUT = "TRANSCRIPTS"
INPUTS = {"WAV": "FP32", "WAV_LENS": "INT32", "TEXT_PREFIX": "BYTES", "MAX_NEW_TOKENS": "INT32"}
_DTYPES = {"FP32": "float32", "INT32": "int32", "BYTES": "object"}
_SPECIAL = re.compile(r"<\|([^|<>]*)\|>")


def resolve(state: AppState, model: str, version: str = "") -> str | None:
    """The pool's name for a Triton model name (None: the default), or ModelNotFound."""
    if version not in ("", VERSION):
        raise ModelNotFound(f"model {model!r} has no version {version!r}; this server serves version {VERSION}")
    name = None if model in EXAMPLE_MODELS else model
    state.pool.check(name)
    return name


def stats_name(state: AppState, model: str) -> str:
    """The name a model's statistics are kept under: an example's as it is (its clients ask by it), any other
    the pool's, so that spellings of one model (`Tiny.EN`, `tiny.en`) share one entry and one /metrics series:
    a client cannot grow either with names of its own."""
    return model if model in EXAMPLE_MODELS else state.pool.key(model)


def statistics(state: AppState, model: str, version: str = "") -> list[dict[str, Any]]:
    """Triton's `model_stats` for a model name, or (""), every name: the examples' and those called so far.
    ModelNotFound for a name the server does not offer."""
    if not model:
        return state.triton_stats.report(EXAMPLE_MODELS | state.triton_stats.names())
    resolve(state, model, version)
    return state.triton_stats.report([stats_name(state, model)])


def server_ready(state: AppState) -> bool:
    """Taking requests: not shutting down, and every loaded engine alive."""
    alive = all(model.engine.alive for item in state.pool.loaded() for model in item.replicas.models)
    return alive and not state.stopping.is_set


def metadata(model: str) -> dict[str, Any]:
    """The model's KServe metadata: its name, version, inputs and output."""
    return {
        "name": model,
        "versions": [VERSION],
        "platform": "halkspeech",
        "inputs": [
            {"name": name, "datatype": kind, "shape": [-1, -1 if name == "WAV" else 1]} for name, kind in INPUTS.items()
        ],
        "outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [-1, 1]}],
    }


#: KServe datatype → Triton's model-config data type.
_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING"}


def config(model: str) -> dict[str, Any]:
    """The model's Triton configuration (the model-configuration extension, as Triton's config.pbtxt would say
    it): rows batch up to MAX_ROWS, so dims leave the batch out; WAV is any length, the rest one value a row.
    Generic Triton clients read it for input names, types and the batch size."""
    return {
        "name": model,
        "platform": "halkspeech",
        "backend": "halkspeech",
        "max_batch_size": MAX_ROWS,
        "input": [_config_input(name, kind) for name, kind in INPUTS.items()],
        "output": [{"name": OUTPUT, "data_type": "TYPE_STRING", "dims": [1]}],
    }


def _config_input(name: str, kind: str) -> dict[str, Any]:
    dims = [-1 if name == "WAV" else 1]
    return {"name": name, "data_type": _CONFIG_TYPES[kind], "dims": dims, "optional": name != "WAV"}


def check_outputs(names: set[str]) -> None:
    unknown = names - {OUTPUT}
    if unknown:
        raise InvalidRequest(f"unknown output {sorted(unknown)[0]!r}: the model has only {OUTPUT}")


#: One row to transcribe: its 16 kHz float32 audio [n] and its options.
Row = tuple[np.ndarray, TranscribeOptions]


class Transcripts(NamedTuple):
    texts: list[str]  # a row's transcript each, in order
    queue_s: float  # the longest wait of a row, for admission and then in the engine (the statistics' queue)


async def transcribe(state: AppState, model: str | None, rows: list[Row], receive: Receive) -> Transcripts:
    """Every row's transcript, in order. Cancelled with the client (`receive`: its disconnect) or the server's
    shutdown, as every request is."""
    server = state.settings.server
    jobs = [Job(with_server_policy(options, server), model, samples=audio) for audio, options in rows]
    outcomes = await until_disconnect(receive, _all(state, jobs), state.stopping)
    texts = [outcome.transcript.text.strip() for outcome in outcomes]
    waits = [outcome.queue_s + outcome.transcript.timings.queue / 1000 for outcome in outcomes]
    return Transcripts(texts, max(waits))


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


def rows(inputs: dict[str, np.ndarray]) -> list[Row]:
    """The inputs' rows, checked and copied out of the request (a worker thread's job for a large request: ~1 ms
    a 30 s row, which the event loop of a busy server cannot spare)."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise InvalidRequest(f"unknown input {sorted(unknown)[0]!r}: the model takes {', '.join(INPUTS)}")
    for name, array in inputs.items():
        if str(array.dtype) != _DTYPES[INPUTS[name]]:
            raise InvalidRequest(f"input {name} must be {INPUTS[name]}", param=name)
    if "WAV" not in inputs:
        raise InvalidRequest("the input WAV (FP32 [batch, samples], 16 kHz) is required", param="WAV")
    wav = inputs["WAV"]
    wav = wav[None] if wav.ndim == 1 else wav
    if wav.ndim != 2 or not 1 <= len(wav) <= MAX_ROWS:
        raise InvalidRequest(
            f"WAV must be [batch, samples] with 1 to {MAX_ROWS} rows, got shape {list(wav.shape)}", param="WAV"
        )
    if wav.shape[1] == 0:
        raise InvalidRequest("WAV has no samples", param="WAV")
    rows = len(wav)
    lens = _per_row(inputs.get("WAV_LENS"), rows, "WAV_LENS")
    prefixes = _per_row(inputs.get("TEXT_PREFIX"), rows, "TEXT_PREFIX")
    max_tokens = _per_row(inputs.get("MAX_NEW_TOKENS"), rows, "MAX_NEW_TOKENS")
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
    if len(prefix) > MAX_TEXT_PREFIX_CHARS:
        raise InvalidRequest(
            f"TEXT_PREFIX may have at most {MAX_TEXT_PREFIX_CHARS} characters, got {len(prefix)}", param="TEXT_PREFIX"
        )
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
