"""`halkspeech bench engine|mixed|server|longform|ws`: benchmarks that print a table and write JSON.

They use random weights of exact released shapes and forced decode lengths: for measuring speed only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from halkspeech.cli.argtypes import finite_float
from halkspeech.config import EngineSettings
from halkspeech.errors import InvalidRequest


def _csv(kind: Callable[[str], Any]) -> Any:
    """A comma-separated list, each item parsed by `kind` (a type, or a parser raising its own usage error)."""
    name = getattr(kind, "__name__", "values")

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {name}: {text!r}") from exc

    return parse


def _kind(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    """A benchmark's parser: its one-line summary is also its --help description."""
    return kinds.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure engine throughput and latency (random weights of real shapes)",
        description="Engine benchmarks. Timings belong here, never in tests. Results: a table and --json.",
    )
    kinds = parser.add_subparsers(dest="bench", metavar="KIND", required=True)

    engine = _kind(kinds, "engine", "windows/s, tokens/s and RTFx per batch size, against HF transformers")
    engine.add_argument("--models", type=_csv(str), default=("large-v3-turbo", "large-v3"), help="catalog shapes")
    engine.add_argument("--batches", type=_csv(int), default=(1, 16, 64, 256))
    engine.add_argument("--tokens", type=int, default=80, help="forced decoded tokens per window")
    engine.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    engine.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers peer")
    engine.add_argument("--no-graphs", action="store_true", help="disable CUDA graphs (for comparison)")
    engine.add_argument("--encoder-batch", type=int, default=64, help="windows per encoder call at most")
    engine.add_argument(
        "--fused-max-batch",
        type=int,
        default=None,
        help="decode steps of at most this many slots use the fused Triton kernels, larger ones the Triton "
        "attention (0: none of them; default: the engine's setting)",
    )
    engine.add_argument(
        "--no-fused-encoder", action="store_true", help="the encoder's plain PyTorch path (for comparison)"
    )
    engine.add_argument(
        "--absorbed-min-batch",
        type=int,
        default=None,
        help="decode steps of at least this many slots read the audio in their cross-attention (0: never; "
        "default: the engine's setting)",
    )
    _device_args(engine)
    engine.set_defaults(func=_run_engine)

    mixed = _kind(kinds, "mixed", "continuous against static batching on a mixed workload")
    mixed.add_argument("--models", type=_csv(str), default=("large-v3-turbo", "large-v3"))
    mixed.add_argument("--requests", type=int, default=512)
    mixed.add_argument("--min-tokens", type=int, default=10)
    mixed.add_argument("--max-tokens", type=int, default=150)
    mixed.add_argument(
        "--rate",
        type=_csv(finite_float),
        default=(0.0,),
        help="arrivals per second, or several comma-separated, each a run of the same requests (0: saturating)",
    )
    mixed.add_argument("--slots", type=int, default=64)
    mixed.add_argument(
        "--admit-batch", type=int, default=None, help="windows admitted together while decoding (default: the engine's)"
    )
    mixed.add_argument(
        "--encoder-wait-ms",
        type=finite_float,
        default=None,
        help="continuous batching: how long a window waits for company before a short encoder run while decoding "
        "(default: the engine's, 0)",
    )
    mixed.add_argument(
        "--modes",
        type=_csv(str),
        default=("continuous", "static", "static-padded"),
        help="continuous (encoder inline), continuous-ahead (encoder on a side stream), static (finished rows "
        "leave the step), static-padded (finished rows run until the batch ends)",
    )
    mixed.add_argument(
        "--no-admission-graphs", action="store_true", help="admissions launched eagerly (for comparison)"
    )
    mixed.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each mode, alternating between modes; each mode is reported by its median run",
    )
    _device_args(mixed)
    mixed.set_defaults(func=_run_mixed)

    _register_longform(kinds)

    server = _kind(kinds, "server", "the HTTP server under many clients against the bare engine")
    server.add_argument("--model", default="large-v3-turbo", help="catalog shape, served as random:<model>")
    server.add_argument("--tokens", type=int, default=80, help="forced decoded tokens per window")
    server.add_argument("--concurrency", type=int, default=256, help="HTTP clients posting at once")
    server.add_argument("--requests", type=int, default=1024, help="timed requests (after the warm-up)")
    server.add_argument("--warmup-requests", type=int, default=512, help="untimed requests first")
    server.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over")
    server.add_argument(
        "--api",
        choices=("openai", "triton", "triton-grpc", "triton-grpc-stream"),
        default="openai",
        help="the clients call the OpenAI API, Triton's HTTP API (binary tensors, as tritonclient sends them) or "
        "Triton's gRPC API, unary or one stream a client process (the server started with --grpc-port; needs "
        "the grpc extra)",
    )
    server.add_argument("--engine-repeats", type=int, default=3, help="runs of the engine figure (its best is used)")
    server.add_argument("--slots", type=int, default=256, help="the server's decoder slots")
    server.add_argument("--encoder-batch", type=int, default=64)
    server.add_argument("--engine-batch", type=int, default=None, help="batch of the engine figure (default: "
                        "--concurrency)")  # fmt: skip
    server.add_argument("--audio", type=Path, default=None, help="recording repeated into the clip (default: jfk)")
    server.add_argument("--admit-batch", type=int, default=None, help="server engine: windows encoded together "
                        "while decoding (default: the engine's)")  # fmt: skip
    server.add_argument(
        "--admit-wait-ms",
        type=finite_float,
        default=None,
        help="server engine: ms to wait for --admit-batch (default: the engine's)",
    )
    server.add_argument("--clip-s", type=finite_float, default=30.0)
    server.add_argument("--profile-s", type=finite_float, default=0.0, help="after the timed run, record this many "
                        "s of the server's GPU timeline under the same load; summarise its idle gaps")  # fmt: skip
    server.add_argument(
        "--closed-loop",
        action="store_true",
        help="also run the same load from in-process clients (the routes' transcription call, no HTTP) on an "
        "engine with the server's settings: what the closed loop costs without the HTTP layer",
    )
    _device_args(server)
    server.set_defaults(func=_run_server)

    ws = _kind(
        kinds, "ws", "push-to-talk end→final latency through the real server (/ws or /v1/realtime), with file traffic"
    )
    ws.add_argument(
        "--protocol",
        choices=("ws", "realtime"),
        default="ws",
        help="ws: /ws push-to-talk; realtime: /v1/realtime (commit → completed; partials: gpt-4o-transcribe deltas)",
    )
    ws.add_argument("--model", default="random:large-v3-turbo", help="served model (random:<shape> or real)")
    ws.add_argument("--tokens", type=int, default=20, help="forced decoded tokens per window (0: real decoding)")
    ws.add_argument("--turn-s", type=finite_float, default=5.0, help="seconds of audio per turn")
    ws.add_argument("--frame-ms", type=finite_float, default=20.0, help="audio per message (binary frame or append)")
    ws.add_argument("--single-turns", type=int, default=10, help="turns of the one-user scenario")
    ws.add_argument("--users", type=int, default=200, help="users of the concurrent scenario")
    ws.add_argument("--ramp-s", type=finite_float, default=10.0)
    ws.add_argument("--turns-per-user", type=int, default=3)
    ws.add_argument("--file-clients", type=int, default=4, help="concurrent posters of files meanwhile")
    ws.add_argument("--file-s", type=finite_float, default=30.0, help="seconds of audio per posted file")
    ws.add_argument("--partials", action="store_true", help="also run both scenarios with partials on")
    ws.add_argument("--audio", default=None, help="speech to cut turns from (default: tests/data/jfk.flac)")
    ws.add_argument("--language", default="en")
    ws.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    _device_args(ws)
    ws.set_defaults(func=_run_ws)


def _device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--dtype", default=None, choices=("float16", "bfloat16", "float32"), help="default: float16, float32 on cpu"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a device or dtype the run could not use, in one line before anything loads, and resolve the
    dtype, so that the table and the JSON name what ran."""
    from halkspeech.engine.factory import resolve_device

    try:
        resolve_device(args.device)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{exc}; pass --device cpu") from None
    if args.device == "cpu" and args.dtype == "float16":
        raise InvalidRequest("float16 does not run on the CPU here; use --dtype float32 (the default there)")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")


def _run_engine(args: argparse.Namespace) -> int:
    _check_device(args)
    from halkspeech.bench.engine_bench import EngineBenchConfig, run_engine_bench

    run_engine_bench(
        EngineBenchConfig(
            models=args.models,
            batches=args.batches,
            tokens=args.tokens,
            repeats=args.repeats,
            compare_hf=not args.no_hf,
            device=args.device,
            dtype=args.dtype,
            max_encoder_batch=args.encoder_batch,
            cuda_graphs=not args.no_graphs,
            fused_encoder=not args.no_fused_encoder,
            json_path=args.json_path,
            **({} if args.fused_max_batch is None else {"fused_kernels_max_batch": args.fused_max_batch}),
            **({} if args.absorbed_min_batch is None else {"absorbed_cross_min_batch": args.absorbed_min_batch}),
        )
    )
    return 0


def _run_mixed(args: argparse.Namespace) -> int:
    _check_device(args)
    from halkspeech.bench.mixed import MixedConfig, run_mixed_bench

    run_mixed_bench(
        MixedConfig(
            models=args.models,
            requests=args.requests,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            rates=args.rate,
            slots=args.slots,
            admit_batch=args.admit_batch,
            encoder_wait_ms=args.encoder_wait_ms,
            admission_graphs=not args.no_admission_graphs,
            modes=args.modes,
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            json_path=args.json_path,
        )
    )
    return 0


def _run_ws(args: argparse.Namespace) -> int:
    _check_device(args)
    from pathlib import Path

    from halkspeech.bench.ws_bench import WsBenchConfig, run_ws_bench

    payload = run_ws_bench(
        WsBenchConfig(
            model=args.model,
            tokens=args.tokens or None,
            device=args.device,
            dtype=args.dtype,
            language=args.language,
            turn_s=args.turn_s,
            single_turns=args.single_turns,
            users=args.users,
            ramp_s=args.ramp_s,
            turns_per_user=args.turns_per_user,
            file_clients=args.file_clients,
            file_s=args.file_s,
            partials=args.partials,
            audio=Path(args.audio) if args.audio else None,
            port=args.port,
            json_path=args.json_path,
            protocol=args.protocol,
            frame_ms=args.frame_ms,
        )
    )
    return 0 if all(row["turns"] and not row["failed"] for row in payload["rows"]) else 1  # targets: the table


def _run_server(args: argparse.Namespace) -> int:
    _check_device(args)
    from halkspeech.bench.server_bench import ServerBenchConfig, run_server_bench

    results = run_server_bench(
        ServerBenchConfig(
            model=args.model,
            tokens=args.tokens,
            concurrency=args.concurrency,
            requests=args.requests,
            warmup_requests=args.warmup_requests,
            client_processes=args.client_processes,
            api=args.api,
            engine_repeats=args.engine_repeats,
            slots=args.slots,
            encoder_batch=args.encoder_batch,
            engine_batch=args.engine_batch,
            device=args.device,
            dtype=args.dtype,
            audio=args.audio,
            admit_batch=args.admit_batch,
            admit_wait_ms=args.admit_wait_ms,
            clip_s=args.clip_s,
            json_path=args.json_path,
            profile_s=args.profile_s,
            closed_loop=args.closed_loop,
        )
    )
    return 0 if results["server"]["ok"] else 1


def _register_longform(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    longform = kinds.add_parser(
        "longform",
        help="an hour of speech through batched mode end to end: RTFx, stage times, word-timestamp cost",
        description="Builds a long WAV from the dev recordings and transcribes it in batched mode (and through "
        "a server with --url). Random weights need --force-tokens-per-second for realistic decode lengths.",
    )
    longform.add_argument("--model", default="random:large-v3-turbo", help="name, path or random:<catalog name>")
    longform.add_argument("--minutes", type=finite_float, default=60.0, help="length of the long file")
    longform.add_argument(
        "--force-tokens-per-second",
        type=finite_float,
        default=None,
        help="each chunk decodes ceil(speech s × this) tokens (default: 4 with random weights, else free)",
    )
    longform.add_argument(
        "--words", action=argparse.BooleanOptionalAction, default=True, help="word timestamps in the long-file run"
    )
    longform.add_argument("--compare-files", type=int, default=8, help="concurrent files for the words cost (0: skip)")
    longform.add_argument("--compare-minutes", type=finite_float, default=10.0, help="length of each concurrent file")
    longform.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    longform.add_argument("--url", default=None, help="also POST the file to this server's /transcribe")
    longform.add_argument("--max-slots", type=int, default=0, help="decoder slots (0: from free GPU memory)")
    longform.add_argument("--encoder-batch", type=int, default=64, help="windows per encoder call at most")
    longform.add_argument("--dev-dir", default=None, help="the dev recordings (default: ../shared/data/dev)")
    longform.add_argument(
        "--gil-switch-ms",
        type=finite_float,
        default=EngineSettings().gil_switch_ms,
        help="Python's thread switch interval while the engine runs, ms (0: Python's 5 ms)",
    )
    _device_args(longform)
    longform.set_defaults(func=_run_longform)


def _run_longform(args: argparse.Namespace) -> int:
    _check_device(args)
    from halkspeech.bench.longform import LongformConfig, run_longform_bench

    rate = args.force_tokens_per_second
    if rate is None and args.model.startswith("random:"):
        rate = 4.0
    extra = {"dev_dir": args.dev_dir} if args.dev_dir else {}
    run_longform_bench(
        LongformConfig(
            model=args.model,
            minutes=args.minutes,
            force_tokens_per_second=rate,
            words=args.words,
            compare_files=args.compare_files,
            compare_minutes=args.compare_minutes,
            repeats=args.repeats,
            url=args.url,
            device=args.device,
            dtype=args.dtype,
            max_slots=args.max_slots,
            encoder_batch=args.encoder_batch,
            gil_switch_ms=args.gil_switch_ms,
            json_path=args.json_path,
            **extra,
        )
    )
    return 0
