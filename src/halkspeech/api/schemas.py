"""Request and response models: what /docs shows, and the JSON bodies the simple API accepts."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
Task = Literal["transcribe", "translate"]
Mode = Literal["sequential", "batched"]


# --- errors -------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape; routes outside /v1 add `detail` (the message) for FastAPI-style clients."""

    error: ErrorDetail
    detail: str | None = None


_ERROR_TEXT: dict[int, str] = {
    400: "Bad input: not audio, an unsupported language, a malformed field ...",
    401: "Missing or wrong API key (when the server has keys)",
    404: "Unknown model",
    409: "The model is in use by running requests; retry when they have finished",
    413: "Upload or audio longer than the limits",
    422: "The model's files are not a loadable Whisper model",
    429: "At capacity: retry after the Retry-After header's seconds",
    503: "The server is shutting down, or the model's engine stopped",
    504: "Did not finish within the request timeout",
}


def error_responses(*statuses: int, text: dict[int, str] | None = None) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` for these error statuses, each with the error body (`text` rewords some)."""
    return {status: {"model": ErrorBody, "description": {**_ERROR_TEXT, **(text or {})}[status]} for status in statuses}


# Validation errors: 400 on /v1 (as OpenAI); FastAPI's 422 elsewhere, in the same error body.
AUDIO_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)  # /v1/audio/*
SIMPLE_ERRORS = error_responses(
    400,
    401,
    404,
    413,
    422,
    429,
    503,
    504,
    text={422: "A malformed option or JSON body, or a model whose files are not a loadable Whisper model"},
)
MODEL_ERRORS = error_responses(  # /v1/models/{id}
    401,
    404,
    409,
    422,
    503,
    text={
        409: "DELETE: the model is in use by running requests; retry when they have finished",
        422: "POST: the model's files are not a loadable Whisper model",
        503: "POST: the server is shutting down",
    },
)


#: Hotwords (the OpenAI form's, a WebSocket turn's): a prompt holds ~220 tokens, which this many characters
#: already exceed; they are tokenized on the event loop, where 1 MB (the form's field limit) took ~0.25 s.
MAX_HOTWORDS_CHARS = 2000


#: vad_filter's description (the OpenAI form's and the simple API's).
VAD_FILTER_TEXT = (
    "faster-whisper's vad_filter: transcribe only the speech silero-vad hears (pauses of 2 s or more are cut, "
    "keeping 0.4 s beside the speech), with every time still the file's; less to decode, and no text invented "
    "for long silence or music. Sequential mode; batched mode decodes only the VAD's speech anyway"
)


# --- OpenAI audio API ---------------------------------------------------------------------------------------
class TranscriptionForm(BaseModel):
    """The multipart form of /v1/audio/transcriptions and /v1/audio/translations.

    Unknown fields are ignored, so clients of faster-whisper servers may send theirs; the ones below past
    `stream` are such extras that HalkSpeech honours."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # temperature=nan: "a finite number"

    file: UploadFile = Field(description="the audio (or video): any format FFmpeg reads")
    model: str = Field(default="", description="a model name; `whisper-1` or empty means the default model")
    language: str | None = Field(
        default=None,
        description="ISO 639-1 code (`tr`), English name or locale (`tr-TR`) of the spoken "
        "language; empty: detect (one more encoder pass for audio under 30 s)",
    )
    prompt: str | None = Field(default=None, description="text that precedes the audio (style, spellings)")
    response_format: ResponseFormat = "json"
    temperature: float = Field(default=0.0, ge=0, le=1, description="0: greedy, raised on failure as OpenAI does")
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=lambda: list[Literal["segment", "word"]](["segment"]),
        alias="timestamp_granularities[]",
        description="`word` adds word timings to verbose_json (only verbose_json; `word` alone leaves out the "
        "segments, as OpenAI's)",
    )
    stream: bool = Field(default=False, description="server-sent events: transcript.text.delta, then .done")
    beam_size: int = Field(default=1, ge=1, le=16)
    best_of: int = Field(default=1, ge=1, le=16)
    condition_on_previous_text: bool = True
    without_timestamps: bool = False
    word_timestamps: bool = False
    mode: Mode = Field(
        default="sequential",
        description="batched: the speech the VAD finds, in chunks of up to 30 s decoded together, each without "
        "the text before it (condition_on_previous_text has no effect; a prompt conditions every chunk)",
    )
    vad_filter: bool = Field(default=False, description=VAD_FILTER_TEXT)
    hotwords: str | None = Field(
        default=None,
        max_length=MAX_HOTWORDS_CHARS,
        description="words or phrases to favour, such as names and terms (faster-whisper's hotwords): they lead "
        f"every window's prompt, in batched mode too; at most {MAX_HOTWORDS_CHARS} characters",
    )


class WordOut(BaseModel):
    word: str
    start: float
    end: float
    probability: float | None = None


class SegmentOut(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[WordOut] | None = None


class UsageOut(BaseModel):
    """OpenAI's usage for models billed by the audio's length."""

    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionOut(BaseModel):
    """response_format=json."""

    text: str
    usage: UsageOut


class VerboseTranscriptionOut(BaseModel):
    """response_format=verbose_json (`words` when timestamp_granularities[] includes "word")."""

    task: str
    language: str
    duration: float
    text: str
    segments: list[SegmentOut] | None = None  # left out when timestamp_granularities[] is only "word"
    words: list[WordOut] | None = None
    usage: UsageOut


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "halkspeech"
    loaded: bool = False
    alias_of: str | None = Field(default=None, description="the model an alias (whisper-1) stands for")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# --- simple API ---------------------------------------------------------------------------------------------
class SimpleSegment(BaseModel):
    id: int
    start: float
    end: float
    text: str
    words: list[WordOut] | None = None


class TimingsOut(BaseModel):
    """Milliseconds: audio decoding, waiting for the engine, encoder and decoder (summed over windows), total."""

    decode: float
    queue: float
    encoder: float
    decoder: float
    total: float


class SimpleTranscription(BaseModel):
    text: str
    language: str
    duration: float = Field(description="seconds of audio")
    processing_time: float = Field(description="seconds from the request's arrival to its answer")
    model: str
    segments: list[SimpleSegment] | None = None
    timings_ms: TimingsOut | None = None


class SimpleOptions(BaseModel):
    """The options of POST /transcribe (its query string) and POST /transcribe/url (its JSON body)."""

    model_config = ConfigDict(extra="ignore")

    language: str | None = Field(
        default=None,
        description="ISO 639-1 code (`tr`), English name or locale (`tr-TR`); empty: detect (one more "
        "encoder pass for audio under 30 s)",
    )
    task: Task = "transcribe"
    include_segments: bool = Field(default=False, description="add `segments` (id, start, end, text)")
    timestamps: bool = Field(default=False, description="predict timestamps (finer segments); implies include_segments")
    timings: bool = Field(default=False, description="add `timings_ms`: decode, queue, encoder, decoder, total")
    model: str | None = Field(default=None, description="a model name; empty: the default model")
    mode: Mode = "sequential"
    word_timestamps: bool = Field(default=False, description="add word timings to the segments")
    vad_filter: bool = Field(default=False, description=VAD_FILTER_TEXT)
    stream: bool = Field(default=False, description="server-sent events: a delta per segment, then the result")


class TranscribeURLRequest(SimpleOptions):
    """POST /transcribe/url: the audio's URL and the same options as /transcribe's query string."""

    url: str = Field(description="http(s) URL of the audio; private and loopback addresses are refused")


# --- health -------------------------------------------------------------------------------------------------
class GPUInfo(BaseModel):
    index: int
    name: str
    memory_total_mb: float
    memory_free_mb: float
    memory_allocated_mb: float
    memory_reserved_mb: float


class HealthModel(BaseModel):
    name: str
    device: str
    dtype: str
    slots: int
    running: int
    queue_depth: int
    alive: bool
    idle_s: float


class AdmissionOut(BaseModel):
    active: int
    waiting: int
    max_concurrent: int
    max_queue: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    device: str = Field(description="the first engine device (engine.device, engine.device_index)")
    devices: list[str] = Field(description="every engine device: one engine per GPU of engine.device_index")
    gpu: GPUInfo | None = Field(description="the first GPU of engine.device_index; null on a CPU")
    gpus: list[GPUInfo] = Field(description="each GPU of engine.device_index")
    default_model: str
    models: list[HealthModel] = Field(description="each loaded model's engines, one row per device")
    admission: AdmissionOut
