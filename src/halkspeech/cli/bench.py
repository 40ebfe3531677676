"""`halkspeech bench engine|mixed`: engine benchmarks that print a table and write JSON.

They use random weights of exact released shapes and forced decode lengths: for measuring speed only.
"""

from __future__ import annotations

import argparse
from typing import Any


def _csv(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}: {text!r}"
            ) from exc

    return parse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure engine throughput and latency (random weights of real shapes)",
        description="Engine benchmarks. Timings belong here, never in tests. Results: a table and --json.",
    )
    kinds = parser.add_subparsers(dest="bench", metavar="KIND", required=True)

    engine = kinds.add_parser(
        "engine", help="windows/s, tokens/s and RTFx per batch size, against HF transformers"
    )
    engine.add_argument(
        "--models", type=_csv(str), default=("large-v3-turbo", "large-v3"), help="catalog shapes"
    )
    engine.add_argument("--batches", type=_csv(int), default=(1, 16, 64, 256))
    engine.add_argument("--tokens", type=int, default=80, help="forced decoded tokens per window")
    engine.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    engine.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers peer")
    engine.add_argument("--no-graphs", action="store_true", help="disable CUDA graphs (for comparison)")
    engine.add_argument("--encoder-batch", type=int, default=64, help="windows per encoder call at most")
    _device_args(engine)
    engine.set_defaults(func=_run_engine)

    mixed = kinds.add_parser("mixed", help="continuous against static batching on a mixed workload")
    mixed.add_argument("--models", type=_csv(str), default=("large-v3-turbo", "large-v3"))
    mixed.add_argument("--requests", type=int, default=512)
    mixed.add_argument("--min-tokens", type=int, default=10)
    mixed.add_argument("--max-tokens", type=int, default=150)
    mixed.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: saturating)")
    mixed.add_argument("--slots", type=int, default=64)
    _device_args(mixed)
    mixed.set_defaults(func=_run_mixed)


def _device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")


def _run_engine(args: argparse.Namespace) -> int:
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
            json_path=args.json_path,
        )
    )
    return 0


def _run_mixed(args: argparse.Namespace) -> int:
    from halkspeech.bench.mixed import MixedConfig, run_mixed_bench

    run_mixed_bench(
        MixedConfig(
            models=args.models,
            requests=args.requests,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            rate=args.rate,
            slots=args.slots,
            device=args.device,
            dtype=args.dtype,
            json_path=args.json_path,
        )
    )
    return 0
