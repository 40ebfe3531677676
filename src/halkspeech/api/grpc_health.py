"""The standard gRPC health service (grpc.health.v1.Health) beside Triton's gRPC API (api/triton_grpc.py), for
Kubernetes' gRPC probes, grpc_health_probe and load balancers that check a gRPC port so.

The server ("") and `inference.GRPCInferenceService` are SERVING while the server takes requests (ServerReady's
answer) and NOT_SERVING once it is stopping; any other service is NOT_FOUND to Check and SERVICE_UNKNOWN to
Watch, as the protocol says. Open, as /health and Triton's health calls are. Watch streams end when the server
stops, so an open one never holds the shutdown. Needs grpcio-health-checking (the grpc extra); without it the
gRPC API runs without this service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from halkspeech.api import triton_model
from halkspeech.api.deps import AppState

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:  # the grpc extra without its health part
    health_pb2 = health_pb2_grpc = None

SERVICES = frozenset({"", "inference.GRPCInferenceService"})
WATCH_POLL_S = 0.5  # how often an open Watch looks again (and how long a stopping server waits for it at most)


def add_health(server: Any, state: AppState, stopping: Callable[[], bool]) -> bool:
    """Serve grpc.health.v1 on `server` (not yet started); False where grpcio-health-checking is missing."""
    if health_pb2_grpc is None:
        return False
    health_pb2_grpc.add_HealthServicer_to_server(_Health(state, stopping), server)
    return True


class _Health(health_pb2_grpc.HealthServicer if health_pb2_grpc is not None else object):  # type: ignore[misc]
    def __init__(self, state: AppState, stopping: Callable[[], bool]) -> None:
        self.state = state
        self.stopping = stopping

    def _status(self, service: str, stopping: bool) -> int:
        if service not in SERVICES:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        serving = triton_model.server_ready(self.state) and not stopping
        return int(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status(request.service, self.stopping()))

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The status now, then each change, until the client leaves or the server stops."""
        last = None
        while True:
            # read once a round: read again for the return, a stop between the two reads ended the stream
            # without its NOT_SERVING
            stopping = self.stopping()
            status = self._status(request.service, stopping)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if stopping:
                return
            await asyncio.sleep(WATCH_POLL_S)
