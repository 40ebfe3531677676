"""GET /health: up or degraded, the loaded models and their engines, the device and GPU memory. Always open
(no API key), for load balancers and orchestrators."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from halkspeech import __version__
from halkspeech.api.deps import StateDep
from halkspeech.api.schemas import AdmissionOut, GPUInfo, Health, HealthModel
from halkspeech.engine.factory import resolve_device
from halkspeech.errors import HalkSpeechError

router = APIRouter(tags=["Health"])
_MB = 1e6


@router.get("/health", response_model=Health, summary="Liveness, models, device and GPU memory")
async def health(state: StateDep) -> Health:
    models = [
        HealthModel(
            name=item.name,
            device=str(item.model.device),
            dtype=item.model.precision,
            slots=item.model.engine.runner.slots,
            running=item.model.engine.running,
            queue_depth=item.model.engine.queue_depth,
            alive=item.model.engine.alive,
            idle_s=round(item.idle_s, 1),
        )
        for item in state.pool.loaded()
    ]
    gate = state.gate
    return Health(
        status="ok" if all(m.alive for m in models) else "degraded",
        version=__version__,
        device=_device(state),
        gpu=_gpu(state),
        default_model=state.pool.default,
        models=models,
        admission=AdmissionOut(
            active=gate.active, waiting=gate.waiting, max_concurrent=gate.max_concurrent, max_queue=gate.max_queue
        ),
    )


# HEAD /health, as load balancers probe (same answer, no body); one documented operation is enough
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)


def _device(state: StateDep) -> str:
    engine = state.settings.engine
    try:
        return str(resolve_device(engine.device, engine.device_index))
    except HalkSpeechError:
        return f"{engine.device} (unavailable)"


def _gpu(state: StateDep) -> GPUInfo | None:
    if not torch.cuda.is_available():
        return None
    index = state.settings.engine.device_index
    free, total = torch.cuda.mem_get_info(index)
    return GPUInfo(
        name=torch.cuda.get_device_name(index),
        memory_total_mb=round(total / _MB, 1),
        memory_free_mb=round(free / _MB, 1),
        memory_allocated_mb=round(torch.cuda.memory_allocated(index) / _MB, 1),
        memory_reserved_mb=round(torch.cuda.memory_reserved(index) / _MB, 1),
    )
