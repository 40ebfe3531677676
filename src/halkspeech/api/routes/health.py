"""GET /health: up or degraded, the loaded models and their engines (one per GPU), the devices and GPU memory.
Always open (no API key), for load balancers and orchestrators."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from halkspeech import __version__
from halkspeech.api.deps import StateDep
from halkspeech.api.schemas import AdmissionOut, GPUInfo, Health, HealthModel
from halkspeech.engine.factory import resolve_devices
from halkspeech.errors import HalkSpeechError

router = APIRouter(tags=["Health"])
_MB = 1e6


@router.get("/health", response_model=Health, summary="Liveness, models, devices and GPU memory")
async def health(state: StateDep) -> Health:
    models = [
        HealthModel(
            name=item.name,
            device=str(model.device),
            dtype=model.precision,
            slots=model.engine.runner.slots,
            running=model.engine.running,
            queue_depth=model.engine.queue_depth,
            alive=model.engine.alive,
            idle_s=round(item.idle_s, 1),
        )
        for item in state.pool.loaded()
        for model in item.replicas.models
    ]
    gate = state.gate
    devices = _devices(state)
    gpus = _gpus(state)
    return Health(
        status="ok" if all(m.alive for m in models) else "degraded",
        version=__version__,
        device=devices[0],
        devices=devices,
        gpu=gpus[0] if gpus else None,
        gpus=gpus,
        default_model=state.pool.default,
        models=models,
        admission=AdmissionOut(
            active=gate.active, waiting=gate.waiting, max_concurrent=gate.max_concurrent, max_queue=gate.max_queue
        ),
    )


# HEAD /health, as load balancers probe (same answer, no body); one documented operation is enough
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)


def _devices(state: StateDep) -> list[str]:
    engine = state.settings.engine
    try:
        return [str(d) for d in resolve_devices(engine.device, engine.device_index)]
    except HalkSpeechError:
        return [f"{engine.device} (unavailable)"]


def _gpus(state: StateDep) -> list[GPUInfo]:
    if not torch.cuda.is_available():
        return []
    return [_gpu(i) for i in state.settings.engine.device_index if i < torch.cuda.device_count()]


def _gpu(index: int) -> GPUInfo:
    free, total = torch.cuda.mem_get_info(index)
    return GPUInfo(
        index=index,
        name=torch.cuda.get_device_name(index),
        memory_total_mb=round(total / _MB, 1),
        memory_free_mb=round(free / _MB, 1),
        memory_allocated_mb=round(torch.cuda.memory_allocated(index) / _MB, 1),
        memory_reserved_mb=round(torch.cuda.memory_reserved(index) / _MB, 1),
    )
