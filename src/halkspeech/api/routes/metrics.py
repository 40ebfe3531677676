"""GET /metrics in Prometheus' text format (behind the API key unless server.metrics_open)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from halkspeech.api.deps import StateDep
from halkspeech.api.metrics import CONTENT_TYPE

router = APIRouter(tags=["Metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
