"""Shared fixtures: committed test clips, the dev set beside the checkout, and the real small models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
DEV_DIR = REPO.parent / "shared" / "data" / "dev"


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    return TEST_DATA / "jfk.flac"


JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def dev_manifest() -> list[dict[str, Any]]:
    """Every clip of ../shared/data/dev/manifest.jsonl with its absolute path; empty if the set is absent."""
    manifest = DEV_DIR / "manifest.jsonl"
    if not manifest.exists():
        return []
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = DEV_DIR / row["audio"]
    return rows


@pytest.fixture(scope="session")
def dev_clips() -> list[dict[str, Any]]:
    rows = dev_manifest()
    if not rows:
        pytest.skip("../shared/data/dev is not beside this checkout")
    return rows
