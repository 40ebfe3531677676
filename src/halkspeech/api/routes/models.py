"""Models: list what is served (OpenAI's GET /v1/models, /v1/models/{id}), load one (POST, fetching it into the
cache first if needed) and unload one (DELETE). Ids may contain a slash (`Systran/faster-whisper-small`)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter

from halkspeech.api.deps import StateDep
from halkspeech.api.schemas import MODEL_ERRORS, ModelDeleted, ModelList, ModelOut
from halkspeech.engine.pool import DEFAULT_ALIASES, cached_path
from halkspeech.errors import ModelNotFound
from halkspeech.model.registry import shown_name

router = APIRouter(prefix="/v1/models", tags=["Models"])

OPENAI_ALIAS = "whisper-1"


@router.get("", response_model=ModelList, summary="Models served: loaded, configured and cached")
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=list((await _known(state)).values()))


@router.get("/{model_id:path}", response_model=ModelOut, responses=MODEL_ERRORS, summary="One model")
async def get_model(model_id: str, state: StateDep) -> ModelOut:
    known = await _known(state)
    entry = known.get(model_id) or known.get(state.pool.key(model_id))
    if entry is None:
        state.pool.check(model_id, fetch=True)  # not one this server would fetch: that 404 says what it offers
        raise ModelNotFound(
            f"model {shown_name(model_id)} is not loaded, configured or cached; "
            "POST /v1/models/{id} fetches and loads it"
        )
    return entry


@router.post("/{model_id:path}", response_model=ModelOut, responses=MODEL_ERRORS, summary="Fetch (if needed) and load")
async def load_model(model_id: str, state: StateDep) -> ModelOut:
    if model_id.strip().lower() in DEFAULT_ALIASES:
        model_id = state.pool.default
    await state.pool.get(model_id, fetch=True)  # the load goes on if the client leaves
    return ModelOut(id=state.pool.key(model_id), created=int(time.time()), loaded=True)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=MODEL_ERRORS, summary="Unload a model")
async def unload_model(model_id: str, state: StateDep) -> ModelDeleted:
    if not await state.pool.unload(model_id):
        raise ModelNotFound(f"model {shown_name(model_id)} is not loaded")
    return ModelDeleted(id=state.pool.key(model_id), deleted=True)


async def _known(state: StateDep) -> dict[str, ModelOut]:
    """Loaded models, then configured ones, then whatever the cache holds (unless only configured models are
    served); plus the whisper-1 alias."""
    pool = state.pool
    loaded = {m.name: m for m in pool.loaded()}
    cached = []  # not listed when only configured models are served: they would answer 404
    if not state.settings.server.configured_models_only:
        cached = [pool.key(info.name) for info in await asyncio.to_thread(pool.registry.list) if info.cached]
    models: dict[str, ModelOut] = {}
    for name in dict.fromkeys([*loaded, *pool.configured, *cached]):
        if name in loaded:
            created = loaded[name].loaded_at
        else:
            path = cached_path(state.settings, name)
            created = path.stat().st_mtime if path.exists() else 0
        models[name] = ModelOut(id=name, created=int(created), loaded=name in loaded)
    default = models.get(pool.default)
    models[OPENAI_ALIAS] = ModelOut(
        id=OPENAI_ALIAS, created=default.created if default else 0, loaded=pool.default in loaded, alias_of=pool.default
    )
    return models
