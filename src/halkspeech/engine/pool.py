"""Several models loaded at once, chosen per request by name.

A model loads on first use (or at start: `preload`), in a worker thread, once per name however many requests
ask for it together; it is unloaded after `server.model_ttl_s` seconds without use (-1: never). OpenAI
clients name models like `whisper-1`: that and an empty name mean the default model.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from halkspeech.config import Settings
from halkspeech.engine.factory import ModelEngine, Replicas, resolve_device, resolve_dtype, start_engines
from halkspeech.errors import EngineStopped, HalkSpeechError, ModelInUse, ModelLoadError, ModelNotFound
from halkspeech.model.dims import KNOWN_DIMS, canonical_name
from halkspeech.model.registry import ModelRegistry, shown_name

log = logging.getLogger(__name__)

#: Names that mean "the default model" (OpenAI's only model id, and what clients send when they omit it).
DEFAULT_ALIASES = frozenset({"", "default", "whisper-1"})
RANDOM_PREFIX = "random:"

Loader = Callable[[str], ModelEngine | Replicas]  # pool key -> started engine(s) (runs in a worker thread)


@dataclass(frozen=True)
class LoadedModel:
    """A snapshot of one loaded model, for /health and /v1/models."""

    name: str
    replicas: Replicas  # one engine per GPU
    loaded_at: float  # time.time() when it finished loading
    idle_s: float  # seconds since it was last used
    users: int  # requests holding it now

    @property
    def model(self) -> ModelEngine:
        """The first engine: what every replica shares (name, tokenizer, precision) is read from it."""
        return self.replicas.first


def settle_heap() -> None:
    """Collect garbage, then take every object left out of the collector's future scans (gc.freeze): what
    `server.freeze_heap` does after each model load.

    A loaded model brings ~350,000 tracked objects (torch, its modules, the tokenizer's tables), and every full
    collection walks them all, with every thread stopped: 200-340 ms on this repo's CPU machine, each one
    stalling the engine's launches and the event loop alike (bench/http_host.py).
    Objects of requests in flight when it runs are frozen too: freed as usual when their last reference goes;
    only reference cycles among them stay, until the next unload unfreezes everything."""
    gc.collect()
    gc.freeze()


@dataclass
class _Entry:
    replicas: Replicas
    loaded_at: float
    last_used: float  # monotonic
    users: int = 0

    @property
    def busy(self) -> bool:
        return self.users > 0 or self.replicas.busy


class ModelPool:
    """Loaded models by name; `get` loads on demand, a reaper task unloads idle ones."""

    def __init__(self, settings: Settings, registry: ModelRegistry, *, loader: Loader | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self._loader = loader or self._load_weights_and_start
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Task[ModelEngine]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        server = settings.server
        self.configured = tuple(
            dict.fromkeys(self.key(n) for n in (settings.model.default, *server.models, *server.preload))
        )

    # --- names -----------------------------------------------------------------------------------------
    @property
    def default(self) -> str:
        return self.key(self.settings.model.default)

    def key(self, name: str | None) -> str:
        """The pool's name for a requested model: aliases → the default; catalog spellings → catalog names."""
        text = (name or "").strip()
        if text.lower() in DEFAULT_ALIASES:
            text = self.settings.model.default.strip()
        if text.startswith(RANDOM_PREFIX):
            return RANDOM_PREFIX + canonical_name(text.removeprefix(RANDOM_PREFIX))
        if "--" in text and not _local(text):  # a hub repo as its cache directory spells it: owner--repo
            text = text.replace("--", "/", 1)
        if "/" in text or "\\" in text or text.startswith((".", "~")):
            # a path or a hub repo, which the registry resolves; a catalog model's own repo is that model (one
            # engine for base and Systran/faster-whisper-base, as faster-whisper-server clients name it)
            return self.registry.catalog_name(text) or text
        return canonical_name(text)

    def offered(self, key: str) -> bool:
        """Whether a request may load `key`: configured, loaded, a catalog name or already in the cache.

        Requests never name files on this machine: a name that is a local path is only served if configured."""
        if key in self._entries or key in self.configured:
            return True
        if self.settings.server.configured_models_only or _local(key) or key.startswith(RANDOM_PREFIX):
            return False
        return key in KNOWN_DIMS or (key.count("/") <= 1 and _in_cache(self.settings, key) is True)

    def check(self, name: str | None, *, fetch: bool = False) -> None:
        """ModelNotFound unless `name` may be served (without loading anything)."""
        self._check(name, self.key(name), fetch=fetch)

    def _check(self, name: str | None, key: str, *, fetch: bool) -> None:
        if self.offered(key):
            return
        if self.settings.server.configured_models_only:
            raise ModelNotFound(
                f"model {shown_name(name)} is not available here; this server offers only {', '.join(self.configured)}"
            )
        fetchable = (
            fetch
            and not key.startswith(RANDOM_PREFIX)
            and not _local(key)
            and key.count("/") <= 1
            and _in_cache(self.settings, key) is not None  # else not a usable file name here (too long ...)
        )
        if not fetchable:
            offered = ", ".join(self.configured)
            raise ModelNotFound(
                f"model {shown_name(name)} is not available here; this server offers {offered} and the catalog models "
                f"({', '.join(n for n in KNOWN_DIMS if canonical_name(n) == n)})"
            )

    # --- getting and loading ---------------------------------------------------------------------------
    async def get(self, name: str | None = None, *, fetch: bool = False) -> ModelEngine:
        """The engine for `name`, loading it first if needed (ModelNotFound, ModelLoadError).

        `fetch` also allows hub repositories (`owner/name`) that are neither configured nor cached."""
        if self._closed:
            raise EngineStopped("the server is shutting down")
        key = self.key(name)
        entry = self._entries.get(key)
        if entry is not None and entry.replicas.alive:
            entry.last_used = time.monotonic()
            return entry.replicas.pick()
        if entry is not None:  # its engine loop died: replace it
            log.warning("engine of model %s is not running; loading it again", key)
            await self.unload(key, force=True)
        self._check(name, key, fetch=fetch)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key), name=f"load {key}")
            self._loading[key] = task
            task.add_done_callback(self._loaded_callback(key))
        return await asyncio.shield(task)  # a cancelled caller leaves the load running for the others

    @contextlib.asynccontextmanager
    async def use(self, name: str | None = None) -> AsyncIterator[ModelEngine]:
        """`get`, and hold the model for the block: neither the reaper nor `unload` takes a model in use."""
        key = self.key(name)
        model = await self.get(name)
        entry = self._entries.get(key)
        if entry is None or model not in entry.replicas:  # unloaded while its load finished: load it again
            model = await self.get(name)
            entry = self._entries.get(key)
        if entry is not None:
            model = entry.replicas.take()  # the least loaded GPU, counted as this request's until it ends
            entry.users += 1
        try:
            yield model
        finally:
            if entry is not None:
                entry.replicas.release(model)
                entry.users -= 1
                entry.last_used = time.monotonic()

    def _loaded_callback(self, key: str) -> Callable[[asyncio.Task[ModelEngine]], None]:
        def done(task: asyncio.Task[ModelEngine]) -> None:
            self._loading.pop(key, None)
            if not task.cancelled():
                task.exception()  # retrieved here, so a load nobody waits for any more logs no warning

        return done

    async def _load(self, key: str) -> ModelEngine:
        started = time.perf_counter()
        try:
            replicas = await asyncio.to_thread(self._load_blocking, key)
        except HalkSpeechError as exc:  # its message goes to a client: no paths of this machine's cache
            exc.args = (_without_cache_dir(str(exc), self.settings.model.cache_dir),)
            raise
        if self._closed:
            await asyncio.to_thread(replicas.close)
            raise EngineStopped("the server is shutting down")
        self._entries[key] = _Entry(replicas, time.time(), time.monotonic())
        devices = ", ".join(str(m.device) for m in replicas.models)
        log.info("loaded model %s on %s in %.1f s", key, devices, time.perf_counter() - started)
        return replicas.pick()

    def _load_blocking(self, key: str) -> Replicas:
        try:
            loaded = self._loader(key)
        except HalkSpeechError:
            raise
        except Exception as exc:  # out of memory, a CUDA error ...: say which model and why, one line
            raise ModelLoadError(f"loading model {key!r} failed: {type(exc).__name__}: {exc}") from exc
        if self.settings.server.freeze_heap:
            settle_heap()
        return loaded if isinstance(loaded, Replicas) else Replicas([loaded])

    def _load_weights_and_start(self, key: str) -> Replicas:
        engine = self.settings.engine
        device = resolve_device(engine.device, engine.device_index[0])
        weights = self.registry.load(key, dtype=resolve_dtype(engine.dtype, device), device=device)
        return start_engines(weights, engine)

    def load_now(self, name: str | None = None) -> ModelEngine:
        """Load synchronously, before the event loop runs (the CLI's preload: errors before serving)."""
        key = self.key(name)
        if key not in self._entries:
            self._check(name, key, fetch=True)
            self._entries[key] = _Entry(self._load_blocking(key), time.time(), time.monotonic())
        return self._entries[key].replicas.first

    async def preload(self) -> None:
        for name in self.settings.server.preload:
            await self.get(name, fetch=True)

    # --- listing and unloading -------------------------------------------------------------------------
    def loaded(self) -> list[LoadedModel]:
        now = time.monotonic()
        return [LoadedModel(k, e.replicas, e.loaded_at, now - e.last_used, e.users) for k, e in self._entries.items()]

    def is_loaded(self, name: str | None) -> bool:
        return self.key(name) in self._entries

    def is_loading(self, name: str | None) -> bool:
        return self.key(name) in self._loading

    async def unload(self, name: str | None, *, force: bool = False) -> bool:
        """Stop a model's engine and free its memory; False if it was not loaded.

        A model that requests are using stays loaded (ModelInUse), so nothing accepted is lost; `force`
        unloads it anyway (shutdown, a dead engine), failing those requests (EngineStopped)."""
        key = self.key(name)
        entry = self._entries.get(key)
        if entry is None and key in self._loading and not force:  # its requests are waiting for the load
            raise ModelInUse(f"model {key} is loading; retry when it has loaded")
        if entry is None:
            return False
        if entry.users > 0 and not force:
            raise ModelInUse(
                f"model {key} is in use by {entry.users} request{'s' if entry.users > 1 else ''}; retry when it is idle"
            )
        del self._entries[key]
        await asyncio.to_thread(self._close, entry.replicas)
        log.info("unloaded model %s", entry.replicas.first.name)
        return True

    def _close(self, replicas: Replicas) -> None:
        replicas.close()
        if self.settings.server.freeze_heap:
            gc.unfreeze()  # the model's objects were frozen with everything else (settle_heap): collectable again
        if self.settings.server.freeze_heap and not self._closed:
            settle_heap()
        else:
            # a closed pool leaves nothing frozen: objects still frozen at the interpreter's exit are never
            # freed, and Triton's bindings (nanobind) then print ~40 lines of "leaked" warnings at every shutdown
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- the idle reaper -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the TTL reaper (in the running event loop); nothing to do when models never expire."""
        if self.settings.server.model_ttl_s >= 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="model reaper")

    async def _reap_forever(self) -> None:
        ttl = self.settings.server.model_ttl_s
        interval = min(max(ttl / 4, 0.05), 10.0)  # unloads within ttl + ttl/4 (at most 10 s late)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # a failed unload must not end the reaper
                log.exception("unloading idle models failed")

    async def reap(self) -> list[str]:
        """Unload every model idle for longer than the TTL; returns their names."""
        ttl = self.settings.server.model_ttl_s
        if ttl < 0:
            return []
        now = time.monotonic()
        idle = [k for k, e in self._entries.items() if not e.busy and now - e.last_used >= ttl]
        unloaded = []
        for key in idle:
            entry = self._entries.get(key)
            if entry is not None and not entry.busy:  # a request may have taken it during an earlier unload
                await self.unload(key)
                unloaded.append(key)
        return unloaded

    async def close(self) -> None:
        """Stop the reaper and every engine."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for key in list(self._entries):
            await self.unload(key, force=True)

    def close_now(self) -> None:
        """`close` without an event loop (after the server stopped, or when it never started)."""
        self._closed = True
        for entry in self._entries.values():
            self._close(entry.replicas)
        self._entries.clear()


def _local(key: str) -> bool:
    """Whether a name is (or looks like) a path on this machine."""
    if not key or key.startswith((".", "~", "/")) or "\\" in key:
        return True
    try:
        return Path(key).expanduser().exists()
    except (OSError, ValueError):  # too long, a NUL byte ...: not a usable path
        return False


def cached_path(settings: Settings, key: str) -> Path:
    """Where the registry keeps `key` in its cache."""
    return settings.model.cache_dir / key.replace("/", "--")


def _in_cache(settings: Settings, key: str) -> bool | None:
    """Whether the cache has a directory for `key`; None if `key` cannot name one here (too long, a NUL ...)."""
    try:
        return cached_path(settings, key).is_dir()
    except (OSError, ValueError):
        return None


def _without_cache_dir(message: str, cache_dir: Path) -> str:
    """`message` with the cache's absolute paths replaced by "<entry> in the model cache": clients see the
    answer, and this machine's directories are none of their business."""
    absolute = cache_dir.expanduser().absolute()
    spellings = {str(absolute).rstrip("/\\"), str(absolute.resolve()).rstrip("/\\")} - {""}  # "" if it is /
    if not spellings:
        return message
    roots = "|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))
    pattern = re.compile(rf"(?:\bcache )?(?:{roots})(?:[/\\](?P<entry>[^\s:;,()'\"]+))?")
    return pattern.sub(lambda m: f"{m['entry']} in the model cache" if m["entry"] else "the model cache", message)
