"""`halkspeech loadtest http|ws`: many concurrent clients against a running server; a table and JSON.

Each kind lives in `halkspeech.loadtest.<kind>` and exposes `register(kinds)`, adding its own parser."""

from __future__ import annotations

import argparse

from halkspeech.cli import register_modules

_KINDS = ("http", "ws")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="drive a running server with many concurrent clients",
        description="Load testers: latency percentiles, throughput and errors, printed and written as JSON.",
    )
    kinds = parser.add_subparsers(dest="loadtest", metavar="KIND", required=True)
    register_modules(kinds, "halkspeech.loadtest", _KINDS)
