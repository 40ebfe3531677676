"""The HTTP server against the bare engine, in one run on one device.

1. Engine: `bench engine`'s measurement for one batch (random weights of `model`'s shapes, `tokens` forced
   tokens per window, all windows submitted at once) → windows/s.
2. Server: `halkspeech serve` in a subprocess on `random:<model>` with the same forced decode length
   (`--force-decode-tokens`, no timestamps) and slots; `concurrency` clients (spread over `client_processes`
   processes, so the clients' own Python is not the bottleneck) send a `clip_s`-second 16 kHz WAV (a real
   recording repeated) in a closed loop → windows/s. `api` picks the endpoint: /v1/audio/transcriptions,
   Triton's HTTP infer (binary tensors) or Triton's gRPC infer, unary or streamed (the server started with
   `--grpc-port`).
3. The ratio server / engine (the target is ≥ 0.8 at 256 clients), beside latency percentiles and errors.
With `closed_loop`, between 1 and 2: the same load from in-process clients calling the transcription the routes
call, on an engine with the server's settings (bench/closed_loop.py): what the closed loop costs without HTTP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import numpy as np
import torch

from halkspeech.audio import decode_audio
from halkspeech.bench.closed_loop import ClosedLoad, closed_loop_figure
from halkspeech.bench.common import (
    MAX_FORCED_TOKENS,
    check_output,
    check_ranges,
    check_shapes,
    device_info,
    free_device_memory,
    print_table,
    write_json,
)
from halkspeech.bench.engine_bench import EngineBenchConfig, bench_model
from halkspeech.bench.subprocess_server import BenchServer, free_port, serve
from halkspeech.config import MAX_ENCODER_BATCH, MAX_SLOTS, load_settings
from halkspeech.errors import InvalidRequest
from halkspeech.loadtest.http import GRPC_APIS, HttpLoadConfig, LoadTally, measure, summarize
from halkspeech.loadtest.server_stats import describe, with_server_side
from halkspeech.loadtest.triton_grpc import tritonclient_grpc
from halkspeech.model.weights import random_weights

log = logging.getLogger(__name__)
_REPO_CLIP = Path(__file__).resolve().parents[3] / "tests" / "data" / "jfk.flac"
PROFILE_DELAY_S = 4.0  # into the profiled load: past its start, when every client is posting


@dataclass(frozen=True)
class ServerBenchConfig:
    model: str = "large-v3-turbo"  # catalog shape, served as random:<model>
    tokens: int = 80
    concurrency: int = 256
    requests: int = 1024
    warmup_requests: int = 512
    client_processes: int = 4
    api: Literal["openai", "triton", "triton-grpc", "triton-grpc-stream"] = "openai"  # the clients' endpoint
    slots: int = 256
    encoder_batch: int = 64
    engine_batch: int | None = None  # the engine figure's batch (default: concurrency)
    engine_repeats: int = 3
    #: The server engine's admission batching while it decodes (None: the defaults), to tune arrivals that trickle
    admit_batch: int | None = None
    admit_wait_ms: float | None = None
    device: Literal["cuda", "cpu"] = "cuda"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    audio: Path | None = None  # a recording to repeat (default: tests/data/jfk.flac)
    clip_s: float = 30.0
    startup_timeout_s: float = 900.0
    json_path: str | None = None
    #: > 0: after the timed run, one more load of `warmup_requests` during which the server records this many
    #: seconds of its GPU timeline (bench/gpu_timeline.py); the summary goes into the results as "profile"
    profile_s: float = 0.0
    #: Also measure the load from in-process clients, without HTTP (bench/closed_loop.py)
    closed_loop: bool = False

    def __post_init__(self) -> None:
        check_output(self.json_path)
        check_shapes([self.model])
        check_ranges(
            tokens=(self.tokens, 1, MAX_FORCED_TOKENS),
            concurrency=(self.concurrency, 1, MAX_SLOTS),  # also the engine figure's batch by default
            requests=(self.requests, 1, 10_000_000),
            warmup_requests=(self.warmup_requests, 1, 10_000_000),  # also the profiled load's size
            client_processes=(self.client_processes, 1, 256),
            engine_repeats=(self.engine_repeats, 1, 100),
            slots=(self.slots, 1, MAX_SLOTS),
            encoder_batch=(self.encoder_batch, 1, MAX_ENCODER_BATCH),
            engine_batch=(self.engine_batch, 1, MAX_SLOTS),
            admit_batch=(self.admit_batch, 1, MAX_SLOTS),
            admit_wait_ms=(self.admit_wait_ms, 0, 60_000),
            clip_s=(self.clip_s, 1, 30),  # one window
            profile_s=(self.profile_s, 0, 600),
        )
        if self.api in GRPC_APIS:
            tritonclient_grpc()  # before the engine figure's minutes: the clients need it


def run_server_bench(cfg: ServerBenchConfig) -> dict[str, Any]:
    device = torch.device(cfg.device)
    engine_row = _engine_figure(cfg)
    print(f"engine figure: {engine_row['windows_per_s']:.1f} windows/s", flush=True)  # progress: minutes pass
    with tempfile.TemporaryDirectory(prefix="halkspeech-server-bench-") as tmp:
        clip = _write_clip(cfg, Path(tmp) / f"clip_{cfg.clip_s:g}s.wav")
        closed = _closed_loop(cfg, clip) if cfg.closed_loop else None
        if closed is not None:
            print(f"in-process clients: {closed['windows_per_s']:.1f} windows/s", flush=True)
        profile_path = Path(tmp) / "profile.json"
        grpc_port = free_port() if cfg.api in GRPC_APIS else None
        with _server(cfg, Path(tmp) / "server.log", profile_path, grpc_port) as served:
            url = served.url
            target = url if grpc_port is None else f"http://127.0.0.1:{grpc_port}"
            load = HttpLoadConfig(
                url=target, audio=(clip,), concurrency=cfg.concurrency, api=cfg.api, language="en", timeout_s=600.0
            )
            _load(replace(load, requests=cfg.warmup_requests), cfg.client_processes)  # graphs, allocator, sockets
            before = _scrape(url)
            server = _load(replace(load, requests=cfg.requests), cfg.client_processes)
            batches = _batch_means(before, _scrape(url))
            profile = _profile(cfg, served.process, profile_path, replace(load, requests=cfg.warmup_requests))
        if server.get("failed"):  # say why, from the server's own log
            print((Path(tmp) / "server.log").read_text(errors="replace")[-4000:], flush=True)
    ratio = server["windows_per_s"] / engine_row["windows_per_s"] if engine_row.get("windows_per_s") else None
    results = {
        "device": device_info(device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "engine": engine_row,
        "server": server,
        "server_batches": batches,
        "ratio": round(ratio, 3) if ratio is not None else None,
    }
    if closed is not None:
        closed["ratio"] = round(closed["windows_per_s"] / engine_row["windows_per_s"], 3)
        results["closed_loop"] = closed
    if profile is not None:
        results["profile"] = profile
    _print(cfg, results)
    write_json(cfg.json_path, results)
    return results


# --- the engine figure --------------------------------------------------------------------------------------
def _engine_figure(cfg: ServerBenchConfig) -> dict[str, Any]:
    batch = cfg.engine_batch or cfg.concurrency
    engine_cfg = EngineBenchConfig(
        models=(cfg.model,),
        batches=(batch,),
        tokens=cfg.tokens,
        repeats=cfg.engine_repeats,
        compare_hf=False,
        device=cfg.device,
        dtype=cfg.dtype,
        max_encoder_batch=cfg.encoder_batch,
    )
    rows = [r for r in bench_model(cfg.model, engine_cfg) if r["engine"] == "halkspeech"]
    return rows[0]


def _closed_loop(cfg: ServerBenchConfig, clip: Path) -> dict[str, Any]:
    """The load from in-process clients on an engine with the server's settings, the clip's samples as the
    server decodes them."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    weights = random_weights(cfg.model, dtype=dtype, device=cfg.device)
    # as the server's: this process's HALKSPEECH_ENGINE__* environment, then what _server passes it
    settings = load_settings(
        engine__device=cfg.device,
        engine__dtype=cfg.dtype,
        engine__max_slots=cfg.slots,
        engine__max_encoder_batch=cfg.encoder_batch,
        engine__admit_batch=cfg.admit_batch,  # None: not set
        engine__admit_wait_ms=cfg.admit_wait_ms,
    ).engine
    load = ClosedLoad(cfg.concurrency, cfg.requests, cfg.warmup_requests, cfg.tokens)
    result = closed_loop_figure(weights, settings, decode_audio(clip), load)
    del weights  # the server, started next in another process, needs the memory
    free_device_memory(cfg.device)
    return result


# --- the clip -----------------------------------------------------------------------------------------------
def _write_clip(cfg: ServerBenchConfig, path: Path) -> Path:
    """A real recording repeated to exactly clip_s seconds, as 16 kHz mono 16-bit WAV (one 30 s window)."""
    source = cfg.audio or _REPO_CLIP
    if not source.is_file():
        raise InvalidRequest(f"no recording to build the clip from: {source} (give --audio)")
    audio = decode_audio(source)
    n = round(cfg.clip_s * 16000)
    samples = np.tile(audio, -(-n // len(audio)))[:n]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# --- the server ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _server(cfg: ServerBenchConfig, log_path: Path, profile_path: Path, grpc_port: int | None) -> Iterator[BenchServer]:
    args = [
        "--model", f"random:{cfg.model}", "--preload",
        "--device", cfg.device, "--dtype", cfg.dtype,
        "--max-slots", str(cfg.slots), "--encoder-batch", str(cfg.encoder_batch),
        "--force-decode-tokens", str(cfg.tokens),
        "--max-concurrent-requests", str(max(2 * cfg.concurrency, 512)), "--max-queue-size", "8192",
        "--request-timeout", "900", "--no-access-log",
    ]  # fmt: skip
    if grpc_port is not None:
        args += ["--grpc-port", str(grpc_port)]
    env = dict(os.environ)
    if cfg.admit_batch is not None:
        env["HALKSPEECH_ENGINE__ADMIT_BATCH"] = str(cfg.admit_batch)
    if cfg.admit_wait_ms is not None:
        env["HALKSPEECH_ENGINE__ADMIT_WAIT_MS"] = str(cfg.admit_wait_ms)
    launcher = ["-m", "halkspeech"]
    if cfg.profile_s > 0:
        launcher = ["-m", "halkspeech.bench.gpu_timeline", "--seconds", str(cfg.profile_s), "--json", str(profile_path)]
    with serve(
        args, port=free_port(), env=env, log_path=log_path, startup_timeout_s=cfg.startup_timeout_s, launcher=launcher
    ) as served:
        yield served


def _profile(
    cfg: ServerBenchConfig, process: subprocess.Popen[bytes], path: Path, load: HttpLoadConfig
) -> dict[str, Any] | None:
    """One more load; PROFILE_DELAY_S into it, the server records its GPU timeline (a run of its own: recording
    slows the server, so the timed run's figures above are not taken with it)."""
    if cfg.profile_s <= 0:
        return None
    timer = threading.Timer(PROFILE_DELAY_S, process.send_signal, (signal.SIGUSR1,))
    timer.start()
    try:
        _load(load, cfg.client_processes)
    finally:
        timer.cancel()
    deadline = time.monotonic() + 180  # writing the trace and reading it back takes a while
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(1)
    if not path.exists():  # it appears whole (gpu_timeline renames it into place)
        log.warning("the server wrote no GPU timeline")
        return None
    return cast(dict[str, Any], json.loads(path.read_text()))


# --- the load -----------------------------------------------------------------------------------------------
def _load(cfg: HttpLoadConfig, processes: int) -> dict[str, Any]:
    """Split the clients and requests over `processes` processes started together; merge what they saw."""
    parts = split_load(cfg, processes)

    def run() -> dict[str, Any]:
        if len(parts) == 1:
            return summarize(cfg, [measure(parts[0])])
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            tallies: list[LoadTally] = pool.map(measure, parts)
        return summarize(cfg, tallies)

    return with_server_side(cfg, run)


def split_load(cfg: HttpLoadConfig, processes: int) -> list[HttpLoadConfig]:
    """The clients and requests of `cfg` shared out over at most `processes` parts, each with at least one of
    each: in all, exactly cfg's (one request a process used to be sent even where there were fewer). An open
    loop's rate is shared as its requests are (Poisson arrivals split so still sum to Poisson ones), and each
    part draws its own arrivals, or their bursts would line up."""
    processes = max(1, min(processes, cfg.concurrency, cfg.requests))
    parts = []
    for i in range(processes):
        requests = cfg.requests // processes + (i < cfg.requests % processes)
        parts.append(
            replace(
                cfg,
                concurrency=cfg.concurrency // processes + (i < cfg.concurrency % processes),
                requests=requests,
                rate=None if cfg.rate is None else cfg.rate * requests / cfg.requests,
                seed=cfg.seed + i,
            )
        )
    return parts


def _scrape(url: str) -> str:
    try:
        return httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return ""


def _batch_means(before: str, after: str) -> dict[str, float | None]:
    """Mean encoder and decoder batch sizes over the timed run, where the server's engine loop spent it
    (seconds) and where a request's time went (mean ms), from the server's /metrics before and after."""

    def delta(name: str, label: str = "") -> float:
        return _metric(after, name, label) - _metric(before, name, label)

    means: dict[str, float | None] = {}
    for key, name in (("encoder", "encoder_batch_size"), ("decoder", "decode_batch_size")):
        total, count = delta(f"halkspeech_engine_{name}_sum"), delta(f"halkspeech_engine_{name}_count")
        means[f"mean_{key}_batch"] = round(total / count, 1) if count else None
    for phase in ("encode", "admit", "step", "align"):
        means[f"{phase}_s"] = round(delta("halkspeech_engine_phase_seconds_total", f'phase="{phase}"'), 2)
    means["busy_s"] = round(delta("halkspeech_engine_busy_seconds_total"), 2)
    # Where a request's time went, in mean ms: HTTP (the server's duration, from arrival to last byte) and the
    # job's stages in it; HTTP less the stages is the upload, the form's parse and the answer.
    jobs = delta("halkspeech_request_stage_seconds_count", 'stage="transcribe"')
    answered = _route_total(after, "count") - _route_total(before, "count")
    if jobs and answered:
        means["http_ms"] = round(1000 * (_route_total(after, "sum") - _route_total(before, "sum")) / answered, 1)
        for stage in ("admission", "decode", "transcribe"):
            total = delta("halkspeech_request_stage_seconds_sum", f'stage="{stage}"')
            means[f"{stage}_ms"] = round(1000 * total / jobs, 1)
    # How late the event loop ran its timers (api/loop_lag.py): the mean, and the share later than 100 ms.
    ticks = delta("halkspeech_event_loop_lag_seconds_count")
    if ticks:
        means["loop_lag_ms"] = round(1000 * delta("halkspeech_event_loop_lag_seconds_sum") / ticks, 1)
        late = ticks - delta("halkspeech_event_loop_lag_seconds_bucket", 'le="0.1"')
        means["loop_late_share"] = round(late / ticks, 3)
    return means


def _route_total(text: str, part: str) -> float:
    """halkspeech_http_request_duration_seconds_{part} summed over every route but /metrics (the bench's own
    scrapes): the transcription requests of the load."""
    pattern = rf'^halkspeech_http_request_duration_seconds_{part}\{{route="([^"]*)"\}} ([0-9.e+]+)$'
    return sum(float(v) for route, v in re.findall(pattern, text, re.MULTILINE) if route != "/metrics")


def _metric(text: str, name: str, label: str = "") -> float:
    """The value of sample `name{..., label, ...}` (or of `name` with no labels, where `label` is empty) in
    Prometheus text (0 when absent)."""
    labels = rf"\{{[^}}]*{re.escape(label)}[^}}]*\}}" if label else r"(?:\{[^}]*\})?"
    match = re.search(rf"^{name}{labels} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _print(cfg: ServerBenchConfig, results: dict[str, Any]) -> None:
    engine, server = results["engine"], results["server"]
    rows = [{"path": f"engine (batch {engine['batch']})", "windows_s": engine["windows_per_s"], "ratio": 1.0}]
    if "closed_loop" in results:
        closed = results["closed_loop"]
        rows.append(
            {
                "path": f"in-process ({cfg.concurrency} clients)",
                "windows_s": closed["windows_per_s"],
                "req_s": closed["windows_per_s"],
                **{f"{q}_ms": closed["latency_ms"][q] for q in ("p50", "p95", "p99")},
                "failed": 0,
                "ratio": closed["ratio"],
            }
        )
    rows += [
        {
            "path": f"server ({cfg.concurrency} {cfg.api} clients)",
            "windows_s": server["windows_per_s"],
            "req_s": server["requests_per_s"],
            "p50_ms": server["latency_ms"]["p50"],
            "p95_ms": server["latency_ms"]["p95"],
            "p99_ms": server["latency_ms"]["p99"],
            "failed": server["failed"],
            "ratio": results["ratio"],
        },
    ]
    columns = [(k, k) for k in ("path", "windows_s", "req_s", "p50_ms", "p95_ms", "p99_ms", "failed", "ratio")]
    gpu = results["device"].get("gpu", results["device"]["device"])
    title = f"Server vs engine: random:{cfg.model}, {cfg.tokens} forced tokens, {cfg.clip_s:g} s clips, {gpu}"
    print_table(rows, columns, title=title)
    print(
        f"server errors: {server['errors'] or 'none'}; mean batches in the timed run: {results['server_batches']}; "
        "target: ratio ≥ 0.80",
        flush=True,
    )
    if "closed_loop" in results:
        closed = results["closed_loop"]
        print(
            f"in-process clients: mean encoder run {closed['mean_encoder_batch']}, "
            f"mean decoder batch {closed['mean_decoder_batch']}",
            flush=True,
        )
    if "server" in server:  # Triton's APIs: the server's own statistics of the timed run
        print(describe(server["server"]), flush=True)
