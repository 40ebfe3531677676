"""`halkspeech loadtest http`: many concurrent clients posting real files to a running server.

`concurrency` clients each post one file after another (closed loop) until `requests` have been sent or
`max_duration_s` has passed; each request may take `timeout_s` at most. With `rate`, requests arrive instead at
that many a second (open loop, Poisson arrivals, as perf_analyzer's --request-rate-range), at most `concurrency`
in flight: one that arrives while all are busy waits, and its latency counts from its arrival, so an overloaded
server shows as latency, not as a quietly lower rate. Reported: requests/s, audio seconds/s, 30 s windows/s,
latency p50/p95/p99 of the successful requests, and errors by status (or by failure: timeout, connect_error
...), as a table and as JSON.

The APIs: OpenAI's, the simple one, and Triton's HTTP and gRPC APIs (`triton-grpc`: unary calls, as
TensorRT-LLM's Whisper client makes them; `triton-grpc-stream`: one stream a client process, as perf_analyzer's
--streaming; loadtest/triton_grpc.py), so the same load can be put on this server and on a Triton +
TensorRT-LLM one. On Triton's APIs the server's own statistics of the run are reported too, as perf_analyzer's
"Server:" lines (loadtest/server_stats.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from halkspeech.api.kserve import serialize_bytes
from halkspeech.bench.common import check_output, percentile, print_table, write_json
from halkspeech.cli.argtypes import finite_float
from halkspeech.errors import InvalidRequest
from halkspeech.loadtest.clips import TRITON_MODEL, Clip, Send, load_clips, text_prefix
from halkspeech.loadtest.server_stats import describe, with_server_side
from halkspeech.loadtest.triton_grpc import grpc_sender, grpc_stream_sender

WINDOW_S = 30.0
_PATHS = {"openai": "/v1/audio/transcriptions", "simple": "/transcribe", "triton": "/v2/models/{model}/infer"}
GRPC_PORT = 8001  # Triton's gRPC port, when the URL names none
Api = Literal["openai", "simple", "triton", "triton-grpc", "triton-grpc-stream"]
GRPC_APIS = ("triton-grpc", "triton-grpc-stream")
MAX_RATE = 100_000.0  # requests a second: past what one client process can send


@dataclass(frozen=True)
class HttpLoadConfig:
    url: str  # the server's base URL, or the full URL of the endpoint
    audio: tuple[Path, ...]
    concurrency: int = 16
    requests: int = 100
    api: Api = "openai"
    model: str | None = None
    response_format: str = "json"
    language: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    max_duration_s: float = 900.0
    json_path: str | None = None
    rate: float | None = None  # requests a second, arriving open-loop; None: closed loop
    seed: int = 0  # of the arrivals (a benchmark's client processes each take another)

    def __post_init__(self) -> None:
        check_output(self.json_path)
        if self.concurrency < 1 or self.requests < 1:
            raise InvalidRequest("--concurrency and --requests must be at least 1")
        if not self.timeout_s > 0 or not self.max_duration_s > 0:
            raise InvalidRequest("--timeout-s and --max-duration-s must be positive")
        if self.rate is not None and not 0 < self.rate <= MAX_RATE:
            raise InvalidRequest(f"--rate must be above 0 and at most {MAX_RATE:g} requests a second")
        if not self.audio:
            raise InvalidRequest("give at least one --audio file")
        try:
            url = httpx.URL(self.url)
            port_ok = url.port is None or 0 < url.port < 65536
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"--url is not a valid URL: {self.url!r} ({exc})") from None
        schemes = ("http", "https", "grpc") if self.api in GRPC_APIS else ("http", "https")
        if url.scheme not in schemes:
            names = [f"{scheme}://" for scheme in schemes]
            raise InvalidRequest(f"--url must be an {', '.join(names[:-1])} or {names[-1]} URL: {self.url!r}")
        if not url.host or not port_ok:
            raise InvalidRequest(f"--url needs a host and a port from 1 to 65535: {self.url!r}")

    @property
    def endpoint(self) -> str:
        base = httpx.URL(self.url)
        if self.api in GRPC_APIS:  # host:port, as gRPC channels take it
            return f"{base.host}:{base.port or GRPC_PORT}"
        path = _PATHS[self.api].format(model=self.model or TRITON_MODEL)
        return str(base) if base.path not in ("", "/") else str(base.copy_with(path=path))


@dataclass
class LoadTally:
    """What one client process saw (picklable, so a benchmark can merge several processes' tallies)."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: Counter[str] = field(default_factory=Counter)
    audio_s: float = 0.0
    windows: int = 0
    sent: int = 0
    waited: int = 0  # open loop: arrivals that found every client busy (their wait is in their latency)
    started: float = 0.0  # time.time() of the first request
    ended: float = 0.0  # time.time() when the last one finished


@functools.cache  # every request of a clip is the same: built once (the client's loop is what 256 clients load)
def triton_body(clip: Clip, language: str | None) -> tuple[bytes, int]:
    """A KServe v2 inference request for TensorRT-LLM's Whisper model in Triton's binary form, as
    tritonclient.http sends it: (the body, its JSON header's length)."""
    prefix_data = serialize_bytes([text_prefix(language)])
    n = len(clip.samples) // 4
    header = {
        "inputs": [
            {"name": "WAV", "datatype": "FP32", "shape": [1, n], "parameters": {"binary_data_size": n * 4}},
            {"name": "TEXT_PREFIX", "datatype": "BYTES", "shape": [1, 1],
             "parameters": {"binary_data_size": len(prefix_data)}},
        ],
        "outputs": [{"name": "TRANSCRIPTS", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    head = json.dumps(header).encode()
    return head + clip.samples + prefix_data, len(head)


def run_http_load(cfg: HttpLoadConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run the load, print the table (unless quiet), write the JSON; returns the results."""
    results = with_server_side(cfg, lambda: summarize(cfg, [measure(cfg)]))
    if not quiet:
        print_results(results)
    write_json(cfg.json_path, results)
    return results


def measure(cfg: HttpLoadConfig) -> LoadTally:
    """Run the load from this process (its own event loop) and return what it saw."""
    return asyncio.run(_drive(cfg, load_clips(cfg.audio)))


async def _drive(cfg: HttpLoadConfig, clips: list[Clip]) -> LoadTally:
    tally = LoadTally(started=time.time())
    started = time.perf_counter()
    deadline = started + cfg.max_duration_s
    async with _sender(cfg) as send:

        async def one(clip: Clip, began: float) -> None:
            """A request, timed from `began` (its arrival, open loop; its sending, closed)."""
            failure = await send(clip)
            if failure is not None:
                tally.errors[failure] += 1
                return
            tally.latencies.append(time.perf_counter() - began)
            tally.audio_s += clip.seconds
            tally.windows += max(1, math.ceil(clip.seconds / WINDOW_S - 1e-6))

        async def worker() -> None:
            while tally.sent < cfg.requests and time.perf_counter() < deadline:
                tally.sent += 1
                await one(clips[(tally.sent - 1) % len(clips)], time.perf_counter())

        if cfg.rate is None:
            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.requests))))
        else:
            await _arrivals(cfg, clips, one, tally, deadline)
    tally.ended = time.time()
    return tally


async def _arrivals(
    cfg: HttpLoadConfig,
    clips: list[Clip],
    one: Callable[[Clip, float], Awaitable[None]],
    tally: LoadTally,
    deadline: float,
) -> None:
    """Open loop: `cfg.rate` arrivals a second (exponential gaps, seeded), each sent by a free client of
    `cfg.concurrency` or, when all are busy, as soon as one is free, timed from its arrival."""
    assert cfg.rate is not None
    gaps = random.Random(cfg.seed)
    clients = asyncio.Semaphore(cfg.concurrency)
    requests: set[asyncio.Task[None]] = set()

    async def arrive(clip: Clip, arrival: float) -> None:
        if clients.locked():
            tally.waited += 1
        async with clients:
            await one(clip, arrival)

    arrival = time.perf_counter()
    for i in range(cfg.requests):
        arrival += gaps.expovariate(cfg.rate)
        if arrival >= deadline:
            break
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        tally.sent += 1
        task = asyncio.create_task(arrive(clips[i % len(clips)], arrival))
        requests.add(task)
        task.add_done_callback(requests.discard)
    if requests:
        await asyncio.gather(*requests)


def _sender(cfg: HttpLoadConfig) -> contextlib.AbstractAsyncContextManager[Send]:
    if cfg.api == "triton-grpc":
        return grpc_sender(cfg)
    if cfg.api == "triton-grpc-stream":
        return grpc_stream_sender(cfg)
    return _http_sender(cfg)


@contextlib.asynccontextmanager
async def _http_sender(cfg: HttpLoadConfig) -> AsyncIterator[Send]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(30.0, cfg.timeout_s))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:

        async def send(clip: Clip) -> str | None:
            try:
                response = await _post(client, cfg, clip)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as exc:
                return _failure_name(exc)
            return None if response.status_code == 200 else str(response.status_code)

        yield send


async def _post(client: httpx.AsyncClient, cfg: HttpLoadConfig, clip: Clip) -> httpx.Response:
    files = {"file": (clip.name, clip.data, "application/octet-stream")}
    if cfg.api == "openai":
        form = {"model": cfg.model or "", "response_format": cfg.response_format}
        if cfg.language:
            form["language"] = cfg.language
        return await client.post(cfg.endpoint, files=files, data=form)
    if cfg.api == "triton":
        body, head = triton_body(clip, cfg.language)
        headers = {"Inference-Header-Content-Length": str(head), "Content-Type": "application/octet-stream"}
        return await client.post(cfg.endpoint, content=body, headers=headers)
    params = {k: v for k, v in (("language", cfg.language), ("model", cfg.model)) if v}
    return await client.post(cfg.endpoint, files=files, params=params)


def _failure_name(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection_dropped"
    return type(exc).__name__


def summarize(cfg: HttpLoadConfig, tallies: list[LoadTally]) -> dict[str, Any]:
    """Results of one or more tallies run side by side (wall time: first start to last end)."""
    tally = LoadTally(started=min(t.started for t in tallies), ended=max(t.ended for t in tallies))
    for part in tallies:
        tally.latencies += part.latencies
        tally.errors += part.errors
        tally.audio_s += part.audio_s
        tally.windows += part.windows
        tally.sent += part.sent
        tally.waited += part.waited
    wall = tally.ended - tally.started
    lat_ms = [s * 1000 for s in tally.latencies]
    ok = len(lat_ms)
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "api_key"}
        | {"audio": [str(p) for p in cfg.audio], "endpoint": cfg.endpoint},
        "sent": tally.sent,
        "ok": ok,
        "failed": tally.sent - ok,
        "errors": dict(sorted(tally.errors.items())),
        "wall_s": round(wall, 3),
        "requests_per_s": round(ok / wall, 3) if wall else 0.0,
        "audio_s_per_s": round(tally.audio_s / wall, 2) if wall else 0.0,
        "windows_per_s": round(tally.windows / wall, 3) if wall else 0.0,
        "offered_rate": cfg.rate,  # None: closed loop
        "waited": tally.waited,
        "latency_ms": {
            "p50": round(percentile(lat_ms, 50), 1) if ok else None,
            "p95": round(percentile(lat_ms, 95), 1) if ok else None,
            "p99": round(percentile(lat_ms, 99), 1) if ok else None,
            "mean": round(statistics.fmean(lat_ms), 1) if ok else None,
            "max": round(max(lat_ms), 1) if ok else None,
        },
    }


def print_results(results: dict[str, Any], title: str | None = None) -> None:
    cfg, lat = results["config"], results["latency_ms"]
    title = title or ("gRPC load" if cfg["api"] in GRPC_APIS else "HTTP load")
    row = {
        "concurrency": cfg["concurrency"],
        "sent": results["sent"],
        "ok": results["ok"],
        "req_s": results["requests_per_s"],
        "audio_s_s": results["audio_s_per_s"],
        "windows_s": results["windows_per_s"],
        **{k: lat[k] for k in ("p50", "p95", "p99")},
    }
    columns = [(k, k) for k in row]
    print_table([row], columns, title=f"{title}: {cfg['endpoint']}, {results['wall_s']:.1f} s (latency in ms)")
    print(f"errors: {results['errors'] or 'none'}", flush=True)
    if results.get("offered_rate") is not None:
        offered, answered, waited = results["offered_rate"], results["requests_per_s"], results["waited"]
        print(
            f"open loop: {offered:g} requests/s offered, {answered:g} answered a second; {waited} arrivals "
            "waited for a free client (in their latency)",
            flush=True,
        )
    if "server" in results:
        print(describe(results["server"]), flush=True)


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = kinds.add_parser(
        "http",
        help="concurrent clients posting files: requests/s, audio s/s, latency percentiles, errors",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--url",
        default=None,
        help="server base URL, or the endpoint's URL (default: http://localhost:8000; triton-grpc: the gRPC "
        f"address, default http://localhost:{GRPC_PORT})",
    )
    parser.add_argument("--audio", type=Path, nargs="+", required=True, metavar="FILE", help="clips, used in turn")
    parser.add_argument("--concurrency", type=int, default=16, help="clients posting at once")
    parser.add_argument("--requests", type=int, default=100, help="requests in all")
    parser.add_argument(
        "--api",
        choices=("openai", "simple", "triton", *GRPC_APIS),
        default="openai",
        help="endpoint to drive (triton, triton-grpc: Triton's HTTP or gRPC API, as TensorRT-LLM's Whisper "
        "examples serve it; triton-grpc-stream: one gRPC stream a client process, as perf_analyzer --streaming)",
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's; triton APIs: whisper)")
    parser.add_argument("--response-format", default="json", help="openai API: json, text, verbose_json ...")
    parser.add_argument("--language", default=None, help="spoken language (default: detect)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--timeout-s", type=finite_float, default=600.0, help="per request")
    parser.add_argument("--max-duration-s", type=finite_float, default=900.0, help="no new requests after this")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    parser.add_argument(
        "--rate",
        type=finite_float,
        default=None,
        help="open loop: requests arriving this many a second (Poisson), at most --concurrency in flight; "
        "latency counts from each arrival (default: closed loop, each client sending its next when answered)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = HttpLoadConfig(
        url=args.url or f"http://localhost:{GRPC_PORT if args.api in GRPC_APIS else 8000}",
        audio=tuple(args.audio),
        concurrency=args.concurrency,
        requests=args.requests,
        api=args.api,
        model=args.model,
        response_format=args.response_format,
        language=args.language,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        max_duration_s=args.max_duration_s,
        json_path=args.json_path,
        rate=args.rate,
    )
    results = run_http_load(cfg)
    return 0 if results["ok"] and not results["failed"] else 1
