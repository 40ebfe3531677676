"""Domain errors. They carry a message a user can act on and never an HTTP status: api/errors.py maps them."""

from __future__ import annotations


class HalkSpeechError(Exception):
    """Base class of every error HalkSpeech raises on purpose. `param` names the request field at fault where
    there is one (the OpenAI error's `param`)."""

    code: str = "halkspeech_error"

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(HalkSpeechError):
    """A request option is out of range or inconsistent (unknown language, bad temperature ...)."""

    code = "invalid_request"


class AudioDecodeError(HalkSpeechError):
    """The input is not audio FFmpeg can decode, is truncated, or is empty."""

    code = "invalid_audio"


class AudioTooLong(HalkSpeechError):
    """The audio is longer than the configured limit."""

    code = "audio_too_long"


class PayloadTooLarge(HalkSpeechError):
    """An upload or a fetched URL is larger than the configured limit."""

    code = "payload_too_large"


class ModelNotFound(HalkSpeechError):
    """No model of that name or path could be found or fetched; the message lists what was tried."""

    code = "model_not_found"


class ModelInUse(HalkSpeechError):
    """An unload was asked for while requests hold the model; it stays loaded (retry when they finish)."""

    code = "model_in_use"


class ModelLoadError(HalkSpeechError):
    """Model files were found but are corrupt or of an unsupported layout."""

    code = "model_load_error"


class Overloaded(HalkSpeechError):
    """The queue or concurrency limit is reached; retry after `retry_after` seconds."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(HalkSpeechError):
    """The work was cancelled (client went away, timeout, shutdown)."""

    code = "cancelled"


class RequestTimeout(HalkSpeechError):
    """The work did not finish within the per-request timeout."""

    code = "timeout"


class URLFetchError(HalkSpeechError):
    """A URL could not be fetched, or points somewhere it may not (private address, bad scheme)."""

    code = "url_fetch_error"


class EngineStopped(HalkSpeechError):
    """The engine has been shut down or its loop died; no new work is accepted."""

    code = "engine_stopped"
