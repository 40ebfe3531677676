"""`halkspeech models list | pull NAME...`: what the cache holds, and fetching into it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from halkspeech.config import load_settings
from halkspeech.errors import HalkSpeechError, InvalidRequest
from halkspeech.model.registry import ModelInfo, ModelRegistry


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the known and cached models, or fetch them",
        description="List the catalog and cached models, or fetch models into the cache.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: settings)")
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    actions.add_parser(
        "list",
        help="every catalog model and anything else in the cache",
        description="Every catalog model and anything else in the cache: whether it is cached, its size on disk "
        "and where it would be fetched from.",
    )
    pull = actions.add_parser(
        "pull",
        help="fetch models into the cache (re-fetches a corrupt copy)",
        description="Fetch models into the cache (re-fetches a corrupt copy).",
    )
    pull.add_argument("names", nargs="+", metavar="NAME", help="catalog name (tiny.en, base ...) or owner/repo")
    pull.add_argument("--force", action="store_true", help="download even if an intact copy is cached")
    pull.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(model__cache_dir=args.cache_dir)
    cache = settings.model.cache_dir
    if cache.exists() and not cache.is_dir():  # else `list` would show an empty cache and `pull` fail later
        raise InvalidRequest(f"the model cache {cache} is a file, not a directory")
    registry = ModelRegistry(settings.model)
    if args.models_action == "list":
        print(format_table(registry.list()))
        return 0
    failed = False
    for name in args.names:  # one bad name must not keep the others from being fetched
        try:
            print(registry.pull(name, progress=not args.no_progress, force=args.force))
        except HalkSpeechError as exc:
            print(f"halkspeech: error: {exc}", file=sys.stderr)
            failed = True
    return 2 if failed else 0  # as for any error of the command (cli.main)


def format_table(infos: list[ModelInfo]) -> str:
    rows = [("NAME", "DIMS", "CACHED", "SIZE", "PATH")]
    for info in infos:
        rows.append(
            (
                info.name,
                _dims(info),
                "yes" if info.cached else "no",
                f"{info.size_bytes / 1e6:.0f} MB" if info.size_bytes is not None else "-",
                str(info.path) if info.path else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows)


def _dims(info: ModelInfo) -> str:
    d = info.dims
    if d is None:
        return "?"
    return f"d={d.n_audio_state} L={d.n_audio_layer}/{d.n_text_layer} mels={d.n_mels} vocab={d.n_vocab}"
