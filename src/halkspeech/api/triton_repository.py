"""Triton's model-repository extension (`POST /v2/repository/index`, `/v2/repository/models/{model}/load` and
`/unload`; gRPC RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload), as Triton's explicit model control
has clients list, load and unload models. The repository is the server's model pool: the examples' names (its
default model), its configured models and whatever is loaded.

Where it differs from Triton, and why:
- A model that is not loaded is UNAVAILABLE, as in Triton, but a request for it still loads it, as every
  request to this server does (and ModelReady says so: it takes requests).
- A load takes no `config` or `file:` parameters: a model's settings are the server's, and its weights come
  from the model registry, never from a client. They are refused, not ignored.
- An unload keeps a model that requests are using (409, gRPC FAILED_PRECONDITION), as DELETE /v1/models does,
  so nothing accepted is lost; Triton would wait for them.
- There is one repository, unnamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from halkspeech.api import json_input
from halkspeech.api.deps import AppState
from halkspeech.api.kserve import json_object
from halkspeech.api.triton_model import EXAMPLE_MODELS, VERSION, resolve
from halkspeech.errors import InvalidRequest

MAX_BODY_BYTES = 64 * 1024  # an index, load or unload request is a few bytes of JSON


def index(state: AppState, ready_only: bool = False) -> list[dict[str, str]]:
    """The repository's models: name, version, state (READY, LOADING, UNAVAILABLE) and why not ready."""
    pool = state.pool
    loaded = {item.name: item for item in pool.loaded()}
    entries = []
    for name in dict.fromkeys([*sorted(EXAMPLE_MODELS), *loaded, *pool.configured]):
        key = pool.key(None if name in EXAMPLE_MODELS else name)
        item = loaded.get(key)
        if item is not None and item.replicas.alive:
            status, reason = "READY", ""
        elif item is not None:
            status, reason = "UNAVAILABLE", "its engine stopped: the next request loads it again"
        elif pool.is_loading(key):
            status, reason = "LOADING", ""
        else:
            status, reason = "UNAVAILABLE", "unloaded: a load or a request loads it"
        if status == "READY" or not ready_only:
            entries.append({"name": name, "version": VERSION, "state": status, "reason": reason})
    return entries


async def load(state: AppState, model: str, parameters: Mapping[str, Any]) -> None:
    """Load a model (ModelNotFound for one the server does not offer; ModelLoadError)."""
    check_parameters(parameters, taken=())
    await state.pool.get(resolve(state, model))  # a client that leaves does not stop the load (the pool's rule)


async def unload(state: AppState, model: str, parameters: Mapping[str, Any]) -> None:
    """Unload a model; one not loaded is already unloaded. ModelInUse while requests hold it."""
    check_parameters(parameters, taken=("unload_dependents",))  # no model here depends on another
    await state.pool.unload(resolve(state, model))


def check_repository(name: str) -> None:
    if name:
        raise InvalidRequest(f"repository {name!r}: this server has one repository, unnamed")


def body_fields(body: bytes) -> dict[str, Any]:
    """An HTTP request's JSON object (an empty body: none), or InvalidRequest."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"the request is over {MAX_BODY_BYTES} bytes; a repository request is a few")
    if not body.strip():
        return {}
    try:
        fields = json_input.loads(body)
    except json_input.JSONInputError as exc:
        raise InvalidRequest(f"the request {exc.reason}") from None
    if not isinstance(fields, dict):  # the whole body, not one of its fields (json_object's wording)
        raise InvalidRequest("the request must be a JSON object")
    return fields


def http_ready(fields: Mapping[str, Any]) -> bool:
    """An index request's `ready` (only the models ready to serve)."""
    ready = fields.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequest("ready must be true or false", param="ready")
    return ready


def http_parameters(fields: Mapping[str, Any]) -> dict[str, Any]:
    return json_object(fields.get("parameters", {}), "parameters")


def check_parameters(parameters: Mapping[str, Any], taken: tuple[str, ...]) -> None:
    for name, value in parameters.items():
        if name not in taken:
            raise InvalidRequest(
                f"parameter {name!r} is not taken: models load with the server's settings and its registry's "
                "weights (no config or files from a client)",
                param=name,
            )
        if not isinstance(value, bool):
            raise InvalidRequest(f"parameter {name!r} must be true or false", param=name)
