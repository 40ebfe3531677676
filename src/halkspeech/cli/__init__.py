"""The `halkspeech` command: serve | transcribe | bench | loadtest | models | ws-client.

Each subcommand lives in its own module with `register(subparsers)`; this module only dispatches and turns
domain errors into one-line messages with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from halkspeech import __version__
from halkspeech.cli.argtypes import Parser
from halkspeech.errors import HalkSpeechError

# Subcommand modules, in the order `--help` lists them. A module missing here is simply not offered.
_SUBCOMMANDS = ("serve", "transcribe", "models", "bench", "loadtest", "ws_client")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="halkspeech",
        description="Fast self-hosted Whisper speech-to-text: server, CLI, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"halkspeech {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (default: warning; serve: the log_level setting, info)",
    )
    register_modules(parser.add_subparsers(dest="command", metavar="COMMAND"), "halkspeech.cli", _SUBCOMMANDS)
    return parser


def register_modules(subparsers: argparse._SubParsersAction[Any], package: str, names: Sequence[str]) -> None:
    """Let each module `package.name` add its parser (`register(subparsers)`); a module that does not exist
    is skipped, an import error inside one is not."""
    for name in names:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{package}.{name}":
                continue
            raise
        module.register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    _printable_paths()
    try:  # Ctrl-C while the subcommands import torch lands here too
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, in the handler below, not as Python exits
        return code
    except KeyboardInterrupt:
        print("halkspeech: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `halkspeech ... | head`: stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 1


def _printable_paths() -> None:
    """A file name that is not UTF-8 (its bytes kept as lone surrogates) must print, not raise: a strict
    stdout or stderr (PYTHONIOENCODING=utf-8, say) writes such characters as escapes instead."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def _run(argv: Sequence[str] | None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
