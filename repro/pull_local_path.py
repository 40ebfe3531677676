"""`models pull PATH` says a local path needs no pull only when PATH is not also a valid cache key: an absolute
path or ./x does; an existing relative path like models/tiny.en (or a bare directory name) is taken for a hub
repo (or a catalog-style name) and fetched.

    PYTHONPATH=src /work/main/.venv/bin/python repro/pull_local_path.py
"""
import os
import shutil
import tempfile
from pathlib import Path

from halkspeech.config import ModelSettings
from halkspeech.errors import ModelNotFound
from halkspeech.model.registry import ModelRegistry

work = Path(tempfile.mkdtemp())
shutil.copytree(Path.home() / ".cache/halkspeech/models/tiny.en", work / "models" / "tiny-ft")
shutil.copytree(Path.home() / ".cache/halkspeech/models/tiny.en", work / "tinyft")
os.chdir(work)
registry = ModelRegistry(ModelSettings(cache_dir=work / "cache", allow_download=False))
for name in (str(work / "models" / "tiny-ft"), "./models/tiny-ft", "models/tiny-ft", "tinyft"):
    assert Path(name).exists()
    try:
        registry.pull(name, progress=False)
    except ModelNotFound as exc:
        print(f"pull {name!r}:\n    {exc}")
