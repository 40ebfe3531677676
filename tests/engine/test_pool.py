"""ModelPool with the real tiny.en model: one load per name however many callers, aliases, errors as domain
errors, the idle-TTL reaper (which spares models in use), close, and names a request may not use."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from halkspeech.config import EngineSettings, ModelSettings, ServerSettings, Settings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.pool import ModelPool
from halkspeech.errors import EngineStopped, ModelInUse, ModelLoadError, ModelNotFound
from halkspeech.model.registry import ModelRegistry


def settings(**server: object) -> Settings:
    return Settings(
        model=ModelSettings(default="tiny.en", allow_download=False),
        engine=EngineSettings(device="cpu"),
        server=ServerSettings(**{"freeze_heap": False, **server}),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def tiny_en() -> Iterator[ModelEngine]:
    s = settings()
    model = start_engine(ModelRegistry(s.model).load("tiny.en"), s.engine)
    yield model
    model.close()


class Lender:
    """A loader handing out the module's engine; counts loads and closes (its close() only counts)."""

    def __init__(self, model: ModelEngine) -> None:
        self.model = model
        self.loads: list[str] = []
        self.closes = 0

    def __call__(self, key: str) -> ModelEngine:
        self.loads.append(key)
        lender = self

        @dataclasses.dataclass
        class Lent(ModelEngine):
            def close(self) -> None:
                lender.closes += 1

        return Lent(**{f.name: getattr(self.model, f.name) for f in dataclasses.fields(ModelEngine)})


def test_one_real_load_for_every_concurrent_caller_and_alias() -> None:
    pool = ModelPool(settings(), ModelRegistry(settings().model))
    calls: list[str] = []
    real = pool._loader
    pool._loader = lambda key: calls.append(key) or real(key)  # type: ignore[func-returns-value]

    async def main() -> list[ModelEngine]:
        names = ("tiny.en", "", None, "whisper-1", "whisper-tiny.en", "Systran/faster-whisper-tiny.en")
        return await asyncio.gather(*(pool.get(n) for n in names))

    try:
        models = asyncio.run(main())
        assert calls == ["tiny.en"] and all(m is models[0] for m in models)
        assert models[0].name == "tiny.en" and models[0].engine.alive
        assert [m.name for m in pool.loaded()] == ["tiny.en"]
    finally:
        pool.close_now()
    assert not models[0].engine.alive  # close_now stopped it


def test_a_catalog_models_own_hub_repo_is_that_model() -> None:
    """faster-whisper-server clients name models by their repo: the same key, so the same engine, as the
    catalog name (they were a 404, then a second engine); other repos and paths stay what they are."""
    pool = ModelPool(settings(), ModelRegistry(settings().model))
    assert pool.key("Systran/faster-whisper-base") == "base"
    assert pool.key(" mobiuslabsgmbh/faster-whisper-large-v3-turbo ") == "large-v3-turbo"
    assert pool.key("someone/faster-whisper-base") == "someone/faster-whisper-base"
    assert pool.key("./Systran/faster-whisper-base") == "./Systran/faster-whisper-base"
    assert pool.offered(pool.key("Systran/faster-whisper-large-v3"))


def test_a_hub_repo_spelt_as_its_cache_directory_is_that_repo(tmp_path: Path) -> None:
    """/v1/models listed cached repos by their directory (Acme--Whisper), an id that was then a 404, and
    owner--repo and owner/repo loaded two engines from one cache entry."""
    s = settings()
    s.model.cache_dir = tmp_path
    (tmp_path / "Acme--Whisper").mkdir()
    pool = ModelPool(s, ModelRegistry(s.model))
    assert pool.key("Acme--Whisper") == pool.key("Acme/Whisper") == "Acme/Whisper"  # the case is the repo's
    assert pool.key("Systran--faster-whisper-base") == "base"
    assert pool.offered("Acme/Whisper") and not pool.offered("acme/whisper")


def test_errors_are_domain_errors(tiny_en: ModelEngine) -> None:
    def broken(key: str) -> ModelEngine:
        raise RuntimeError("CUDA error: out of memory")

    pool = ModelPool(settings(), ModelRegistry(settings().model), loader=broken)
    with pytest.raises(ModelNotFound, match="'no-such-model' is not available here"):
        asyncio.run(pool.get("no-such-model"))
    with pytest.raises(ModelLoadError, match=r"loading model 'tiny\.en' failed: RuntimeError: CUDA error"):
        asyncio.run(pool.get())
    assert pool.loaded() == []


def test_requests_may_not_name_local_paths_or_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "owner" / "repo").mkdir(parents=True)
    pool = ModelPool(settings(models=["random:tiny"]), ModelRegistry(settings().model))
    for name in ("mymodel", "owner/repo", "/etc", "../x", "~/models", "random:base", "a/b/c"):
        with pytest.raises(ModelNotFound):
            pool.check(name, fetch=True)
    for name in ("tiny.en", "base", "small", "random:tiny", "whisper-1"):
        pool.check(name)  # configured, catalog or alias: fine
    pool.check("Systran/faster-whisper-small")  # the catalog's small, by the repo its weights come from
    pool.check("someone/whisper-finetune-ct2", fetch=True)  # another hub repo, when explicitly fetched
    with pytest.raises(ModelNotFound):
        pool.check("someone/whisper-finetune-ct2")  # ... but not from a transcription request


def test_ttl_reaper_unloads_idle_models_and_spares_busy_ones(tiny_en: ModelEngine) -> None:
    lender = Lender(tiny_en)
    pool = ModelPool(settings(model_ttl_s=0.2), ModelRegistry(settings().model), loader=lender)

    async def main() -> None:
        pool.start()
        async with pool.use() as model:
            assert model.engine is tiny_en.engine
            await asyncio.sleep(0.6)  # three TTLs: held, so never reaped
            assert pool.is_loaded("tiny.en") and lender.closes == 0
        for _ in range(200):  # released: gone within the TTL plus a reaper tick
            if not pool.is_loaded("tiny.en"):
                break
            await asyncio.sleep(0.05)
        assert not pool.is_loaded("tiny.en") and lender.closes == 1
        await pool.get()  # loads again on the next use
        await pool.close()

    asyncio.run(main())
    assert lender.loads == ["tiny.en", "tiny.en"] and lender.closes == 2
    with pytest.raises(EngineStopped, match="shutting down"):
        asyncio.run(pool.get())


def test_unload(tiny_en: ModelEngine) -> None:
    lender = Lender(tiny_en)
    pool = ModelPool(settings(), ModelRegistry(settings().model), loader=lender)

    async def main() -> tuple[bool, bool]:
        await pool.get("whisper-1")
        return await pool.unload("tiny.en"), await pool.unload("tiny.en")

    assert asyncio.run(main()) == (True, False) and lender.closes == 1 and pool.loaded() == []


def test_unload_refuses_a_model_in_use_and_a_load_after_it_works(tiny_en: ModelEngine) -> None:
    lender = Lender(tiny_en)
    pool = ModelPool(settings(), ModelRegistry(settings().model), loader=lender)

    async def main() -> None:
        async with pool.use("tiny.en"), pool.use("whisper-1"):
            with pytest.raises(ModelInUse, match=r"model tiny\.en is in use by 2 requests; retry when it is idle"):
                await pool.unload("whisper-1")
            assert pool.is_loaded("tiny.en") and lender.closes == 0
        assert await pool.unload("tiny.en") and lender.closes == 1  # idle now
        async with pool.use() as model:  # the next request loads it again
            assert model.engine.alive and pool.is_loaded("tiny.en")
            await pool.close()  # shutdown does not wait for users
        assert not pool.is_loaded("tiny.en")

    asyncio.run(main())
    assert lender.loads == ["tiny.en", "tiny.en"] and lender.closes == 2


def test_unload_while_loading_is_in_use_not_absent(tiny_en: ModelEngine) -> None:
    """DELETE during a load answered 404 "not loaded", though the load then finished and stayed: it is a 409."""
    release = threading.Event()
    lender = Lender(tiny_en)
    pool = ModelPool(settings(), ModelRegistry(settings().model), loader=lambda key: release.wait(30) and lender(key))

    async def main() -> None:
        loading = asyncio.create_task(pool.get("tiny.en"))
        while "tiny.en" not in pool._loading:
            await asyncio.sleep(0.01)
        with pytest.raises(ModelInUse, match=r"model tiny\.en is loading; retry when it has loaded"):
            await pool.unload("tiny.en")
        release.set()
        await loading
        assert await pool.unload("tiny.en") and lender.closes == 1

    asyncio.run(main())


def test_names_too_long_for_a_file_name_are_not_available(tmp_path: Path) -> None:
    s = settings()
    s.model.cache_dir = tmp_path
    pool = ModelPool(s, ModelRegistry(s.model))
    for name in ("x" * 5000, "y" * 300, "owner/" + "z" * 300):
        for fetch in (False, True):
            with pytest.raises(ModelNotFound, match="is not available here") as refused:
                pool.check(name, fetch=fetch)
            assert len(str(refused.value)) < 600  # the name is cut short in the message
        with pytest.raises(ModelNotFound, match="is not available here"):
            asyncio.run(pool.get(name, fetch=True))
    with pytest.raises(ModelNotFound, match="not a valid model name"):  # the registry refuses it before any file
        asyncio.run(pool.get("a\0b", fetch=True))


def test_load_errors_name_no_cache_paths(tmp_path: Path) -> None:
    s = settings()
    s.model.cache_dir = tmp_path / "models"
    pool = ModelPool(s, ModelRegistry(s.model))
    with pytest.raises(ModelNotFound) as missing:
        asyncio.run(pool.get("owner/no-such-model", fetch=True))
    message = str(missing.value)
    assert str(tmp_path) not in message, message
    assert "owner--no-such-model in the model cache (empty)" in message and "allow_download is false" in message


def test_configured_models_only_refuses_every_other_model(tiny_en: ModelEngine) -> None:
    # by default a request may load any catalog model (base here: cached by the test set-up or not, it is
    # offered); with configured_models_only only the default and server.models are, aliases included
    lender = Lender(tiny_en)
    pool = ModelPool(settings(), ModelRegistry(settings().model), loader=lender)
    pool.check("base")
    strict = settings(models=["tiny"], configured_models_only=True)
    pool = ModelPool(strict, ModelRegistry(strict.model), loader=lender)
    for name in ("tiny.en", "whisper-1", "", "tiny", "whisper-tiny"):
        pool.check(name)
    for name in ("base", "large-v3", "Systran/faster-whisper-small"):
        with pytest.raises(ModelNotFound, match=r"offers only tiny\.en, tiny$"):
            pool.check(name, fetch=True)
        with pytest.raises(ModelNotFound):
            asyncio.run(pool.get(name, fetch=True))  # POST /v1/models/{id} as well
    assert lender.loads == []
    asyncio.run(pool.get("whisper-1"))
    assert lender.loads == ["tiny.en"]
    pool.close_now()


class Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_load_freezes_the_heap_and_an_unload_thaws_it(tiny_en: ModelEngine) -> None:
    """With server.freeze_heap, a load collects once and freezes what is left, so later full collections skip
    the model's objects; cycles frozen with them (a request's, in flight at the load) are collected at the next
    unload, which unfreezes everything first. A closed pool leaves nothing frozen (what is frozen at the
    interpreter's exit is never freed: Triton's bindings print pages of leak warnings). Without it nothing is
    frozen. (Each test leaves the heap unfrozen: tests/conftest.py.)"""
    pool = ModelPool(settings(freeze_heap=True), ModelRegistry(settings().model), loader=Lender(tiny_en))
    in_flight = Cycle()
    gone = weakref.ref(in_flight)
    asyncio.run(pool.get("tiny.en"))
    assert gc.get_freeze_count() > 0
    del in_flight
    gc.collect()
    assert gone() is not None  # frozen: no collection looks at it
    assert asyncio.run(pool.unload("tiny.en"))
    assert gone() is None
    assert gc.get_freeze_count() > 0  # settled again: the server goes on
    asyncio.run(pool.get("tiny.en"))
    pool.close_now()
    assert gc.get_freeze_count() == 0  # closed: nothing frozen is left at the interpreter's exit
    plain = ModelPool(settings(freeze_heap=False), ModelRegistry(settings().model), loader=Lender(tiny_en))
    asyncio.run(plain.get("tiny.en"))
    assert gc.get_freeze_count() == 0
