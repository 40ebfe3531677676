"""`halkspeech serve`: the HTTP server (OpenAI audio API, /transcribe, /health, /metrics) under uvicorn.

Flags override HALKSPEECH_* (and WHISPER__*) environment variables. Models named with --preload load before
the port opens, so a bad name or a missing GPU is a one-line error, not a server that fails its first request.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any, get_args

from halkspeech.cli.argtypes import finite_float
from halkspeech.config import DType, Settings

log = logging.getLogger("halkspeech.serve")

# uvicorn's socket backlog: room for a few thousand clients connecting at once (the kernel caps it at somaxconn).
_BACKLOG = 4096


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP server (OpenAI audio API, /transcribe, /health, /metrics)",
        description="Serve Whisper over HTTP. Flags override HALKSPEECH_* and WHISPER__* environment variables.",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", help="address to listen on")
    net.add_argument("--port", type=int, help="port")
    net.add_argument("--grpc-port", type=int, help="also serve Triton's gRPC API here (Triton's: 8001)")
    net.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY", help="accepted key (repeatable)")
    net.add_argument("--ssl-certfile", type=Path, metavar="PEM", help="serve HTTPS, WSS and gRPC over TLS with this "
                     "certificate (chain); needs --ssl-keyfile")  # fmt: skip
    net.add_argument("--ssl-keyfile", type=Path, metavar="PEM", help="the certificate's private key")
    net.add_argument("--metrics-open", action="store_true", default=None, help="serve /metrics without a key")

    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model to serve (repeatable; the first is the default): a catalog name, owner/repo, a path, or "
        "random:<catalog name> for benchmarks",
    )
    models.add_argument(
        "--preload", action="store_true", help="load the --model models (or the default) at start (server.preload)"
    )
    models.add_argument(
        "--only-configured-models",
        action="store_true",
        default=None,
        help="serve only the --model models: requests naming another model get 404 instead of loading it",
    )
    models.add_argument("--model-ttl", type=finite_float, help="seconds idle before a model is unloaded (-1: never)")
    models.add_argument("--cache-dir", type=Path, help="model cache directory")

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where the engines run (auto: cuda if present)"
    )
    engine.add_argument(
        "--device-index", metavar="I[,I...]", help="GPU index, or several (0,1): one engine on each, sharing the work"
    )
    engine.add_argument(
        "--dtype", choices=get_args(DType), help="auto: float16 on cuda, float32 on cpu; int8: int8 weights on cpu"
    )
    engine.add_argument("--max-slots", type=int, help="decoder slots (0: from free GPU memory)")
    engine.add_argument("--encoder-batch", type=int, help="windows per encoder call at most")

    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-concurrent-requests", type=int, help="transcriptions running at once; more wait in the queue"
    )
    limits.add_argument("--max-queue-size", type=int, help="requests waiting for a turn before 429s")
    limits.add_argument("--request-timeout", type=finite_float, help="seconds per request before a 504")
    limits.add_argument(
        "--shutdown-timeout",
        type=finite_float,
        help="seconds from SIGTERM within which everything in flight is answered (finished, or 503)",
    )
    limits.add_argument(
        "--max-upload-mb", type=finite_float, help="largest request body (upload or fetched URL), in MB"
    )
    limits.add_argument("--max-audio-s", type=finite_float, help="longest audio accepted, in seconds")
    limits.add_argument("--allow-private-urls", action="store_true", default=None, help="/transcribe/url may fetch "
                        "private and loopback addresses (only on trusted networks)")  # fmt: skip

    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-format", choices=("json", "text"), help="log lines as JSON objects or key=value pairs")
    logs.add_argument("--no-access-log", action="store_true", help="no line per request (server.access_log false)")

    parser.add_argument(
        "--force-decode-tokens",
        type=int,
        metavar="N",
        help="BENCHMARKS ONLY: decode exactly N tokens per 30 s window, without timestamps, whatever the audio "
        "says (transcripts become nonsense)",
    )
    _name_settings(parser)
    parser.set_defaults(func=run)


#: Each flag (by its dest) and the setting it overrides.
_FLAG_SETTINGS = {
    "host": "server.host",
    "port": "server.port",
    "grpc_port": "server.grpc_port",
    "api_keys": "server.api_keys",
    "ssl_certfile": "server.ssl_certfile",
    "ssl_keyfile": "server.ssl_keyfile",
    "metrics_open": "server.metrics_open",
    "model_ttl": "server.model_ttl_s",
    "only_configured_models": "server.configured_models_only",
    "max_concurrent_requests": "server.max_concurrent_requests",
    "max_queue_size": "server.max_queue_size",
    "request_timeout": "server.request_timeout_s",
    "shutdown_timeout": "server.shutdown_timeout_s",
    "max_upload_mb": "server.max_upload_mb",
    "max_audio_s": "server.max_audio_s",
    "allow_private_urls": "server.url_fetch_allow_private",
    "log_format": "server.log_format",
    "force_decode_tokens": "server.force_decode_tokens",
    "cache_dir": "model.cache_dir",
    "device": "engine.device",
    "device_index": "engine.device_index",
    "dtype": "engine.dtype",
    "max_slots": "engine.max_slots",
    "encoder_batch": "engine.max_encoder_batch",
    "models": "model.default",
}


def _name_settings(parser: argparse.ArgumentParser) -> None:
    """End each flag's help with the setting it overrides and that setting's built-in default."""
    defaults = Settings()
    for action in parser._actions:
        setting = _FLAG_SETTINGS.get(action.dest)
        if setting is not None:
            section, key = setting.split(".")
            value = getattr(getattr(defaults, section), key)
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            said = f"{setting}; default {shown}" if shown not in (None, "", []) else setting
            action.help = f"{action.help or ''} ({said.replace('%', '%%')})".strip()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names: list[str] = args.models or []
    overrides: dict[str, Any] = {
        setting.replace(".", "__"): getattr(args, dest) for dest, setting in _FLAG_SETTINGS.items() if dest != "models"
    }
    overrides["server__access_log"] = False if args.no_access_log else None
    if names:
        overrides["model__default"] = names[0]
        overrides["server__models"] = names[1:]
    if args.preload:
        overrides["server__preload"] = names or ["true"]  # "true": the default model
    return overrides


def run(args: argparse.Namespace) -> int:
    from halkspeech.api.app import create_app
    from halkspeech.api.logging import configure_logging
    from halkspeech.api.server import Server, tls_problem, uvicorn_config
    from halkspeech.config import load_settings
    from halkspeech.engine.pool import ModelPool
    from halkspeech.model.registry import ModelRegistry

    settings = load_settings(**_overrides(args))
    server = settings.server
    configure_logging(args.log_level or settings.log_level, server.log_format)
    problem = tls_problem(server)
    if problem is not None:  # before the port opens and any model loads
        print(f"halkspeech: error: {problem}", file=sys.stderr)
        return 2
    try:
        sock = socket.create_server((server.host, server.port), backlog=_BACKLOG, reuse_port=False)
    except OSError as exc:
        print(f"halkspeech: error: cannot listen on {server.host}:{server.port}: {exc.strerror}", file=sys.stderr)
        return 2
    if server.grpc_port is not None:
        from halkspeech.api import triton_grpc

        if triton_grpc.MISSING is not None:  # before any model loads
            sock.close()
            print(f"halkspeech: error: {triton_grpc.MISSING}", file=sys.stderr)
            return 2
    pool = ModelPool(settings, ModelRegistry(settings.model))
    try:
        for name in server.preload:
            pool.load_now(name)
        host, port = sock.getsockname()[:2]
        scheme = "https" if server.ssl_certfile is not None else "http"
        log.info("serving on %s://%s:%d", scheme, f"[{host}]" if ":" in host else host, port)  # --port 0's real one
        config = uvicorn_config(create_app(settings, pool), server, backlog=_BACKLOG)
        serving = Server(config)
        _serve_until_signalled(serving, sock)
    finally:
        pool.close_now()
        sock.close()
    if serving.startup_error is not None:  # it stopped at once: say why, as for a busy HTTP port
        print(f"halkspeech: error: {serving.startup_error}", file=sys.stderr)
        return 2
    return 0


def _serve_until_signalled(server: Any, sock: socket.socket) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully and return (exit 0).

    uvicorn re-raises the signal it caught once it has stopped; by then a graceful stop is done, so SIGTERM is
    ignored and SIGINT's KeyboardInterrupt swallowed (else `docker stop` would read as a crash)."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
