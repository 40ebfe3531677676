"""The server's side of a load on Triton's APIs, as perf_analyzer's "Server:" lines give it: Triton's statistics
of the model (`GET /v2/models/{model}/stats`, gRPC ModelStatistics) read before and after the run, and what
they grew by, per request. Triton + TensorRT-LLM serves them, and so does this server (api/triton_stats.py),
so a run against either says where the server spent a request's time: its queue, reading the inputs,
inference, writing the output.

They count everything the server did for the model meanwhile, other clients' requests too. A server that does
not serve them, or refuses, leaves the run's results as they are, with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from halkspeech.loadtest.clips import TRITON_MODEL
from halkspeech.loadtest.triton_grpc import tritonclient_grpc, uses_tls

if TYPE_CHECKING:
    from halkspeech.loadtest.http import HttpLoadConfig

TRITON_APIS = ("triton", "triton-grpc", "triton-grpc-stream")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
_TIMEOUT_S = 30.0

#: One reading: a phase's (count, ns), or a count; or why there is none.
Reading = dict[str, Any] | str


def with_server_side(cfg: HttpLoadConfig, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run`'s results, and for a Triton API the server's side of them under `server`."""
    if cfg.api not in TRITON_APIS:
        return run()
    before = asyncio.run(read(cfg))
    results = run()
    results["server"] = difference(before, asyncio.run(read(cfg)))
    return results


class _Unavailable(Exception):
    """The server answered, but not with the statistics."""


async def read(cfg: HttpLoadConfig) -> Reading:
    """The model's statistics now, or why they cannot be read."""
    model = cfg.model or TRITON_MODEL
    try:
        entry = await (_over_http(cfg, model) if cfg.api == "triton" else _over_grpc(cfg, model))
        return _numbers(entry)
    except _Unavailable as exc:
        return str(exc)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    except (ValueError, LookupError, TypeError, AttributeError) as exc:  # an answer, but not Triton's statistics
        return f"not Triton's statistics ({type(exc).__name__}: {exc})"


async def _over_http(cfg: HttpLoadConfig, model: str) -> Any:
    url = httpx.URL(cfg.url).copy_with(path=f"/v2/models/{model}/stats", query=None)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, headers=headers) as client:
        response = await client.get(url)
    if response.status_code != 200:
        raise _Unavailable(f"HTTP {response.status_code}: {response.text[:200]}")
    return response.json()["model_stats"][0]


async def _over_grpc(cfg: HttpLoadConfig, model: str) -> Any:
    triton = tritonclient_grpc()
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    try:
        async with triton.aio.InferenceServerClient(url=cfg.endpoint, ssl=uses_tls(cfg)) as client:
            found = await client.get_inference_statistics(model, headers=headers, as_json=True)
    except triton.error as exc:  # a gRPC status
        status = str(exc.status() or "error").removeprefix("StatusCode.")
        raise _Unavailable(f"{status}: {str(exc.message())[:200]}") from None
    return found["model_stats"][0]


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's numbers as ints (gRPC's JSON writes uint64 as strings, and leaves zeros out)."""
    stats = entry.get("inference_stats", {})
    out: dict[str, Any] = {key: int(entry.get(key, 0)) for key in ("inference_count", "execution_count")}
    for phase in ("success", "fail", *PHASES):
        out[phase] = (int(stats.get(phase, {}).get("count", 0)), int(stats.get(phase, {}).get("ns", 0)))
    return out


def difference(before: Reading, after: Reading) -> dict[str, Any]:
    """What the statistics grew by over the run: requests, failures, inferences (rows), executions, and the
    mean milliseconds of a successful request and of each of its phases."""
    if isinstance(before, str) or isinstance(after, str):
        return {"unavailable": before if isinstance(before, str) else after}
    requests = after["success"][0] - before["success"][0]
    out: dict[str, Any] = {
        "requests": requests,
        "failures": after["fail"][0] - before["fail"][0],
        "inferences": after["inference_count"] - before["inference_count"],
        "executions": after["execution_count"] - before["execution_count"],
    }
    if requests > 0:
        out["mean_ms"] = {
            phase: round((after[phase][1] - before[phase][1]) / requests / 1e6, 3) for phase in ("success", *PHASES)
        }
    return out


def describe(server: dict[str, Any]) -> str:
    """One line for the results table."""
    if "unavailable" in server:
        return f"server statistics: unavailable ({server['unavailable']})"
    line = f"server statistics: {server['requests']} requests, {server['failures']} failed"
    mean = server.get("mean_ms")
    if mean:
        phases = ", ".join(f"{phase.removeprefix('compute_')} {mean[phase]:.1f}" for phase in PHASES)
        line += f"; a request's mean ms: {mean['success']:.1f} ({phases})"
    return line
