"""The `halkspeech` command: serve | transcribe | bench | loadtest | models | ws-client.

Each subcommand lives in its own module with `register(subparsers)`; this module only dispatches and turns
domain errors into one-line messages with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from halkspeech import __version__
from halkspeech.errors import HalkSpeechError

# Subcommand modules, in the order `--help` lists them. A module missing here is simply not offered.
_SUBCOMMANDS = ("serve", "transcribe", "models", "bench", "loadtest", "ws_client")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halkspeech",
        description="Fast self-hosted Whisper speech-to-text: server, CLI, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"halkspeech {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error (default: info)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"halkspeech.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"halkspeech.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=(args.log_level or "warning").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except HalkSpeechError as exc:
        print(f"halkspeech: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("halkspeech: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
