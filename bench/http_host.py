"""The server's HTTP path under the H100 server bench's load, with the GPU taken out: runs on a CPU machine.

`halkspeech serve` (tiny.en on the CPU, loaded and idle) runs in a subprocess with `Transcriber.transcribe`
replaced by a stub that waits `--latency-s` (a window's time in the engine under that load, ~1.2 s on an H100)
and returns one segment, so everything else a request does runs as served: the upload, the form parse,
admission, the audio's decode, the answer, the middleware and metrics. A thread in the server holds the GIL
`--gil-busy` of each millisecond in pure Python, standing in for the engine thread's launches and bookkeeping.
`--concurrency` kept-alive connections from this process post a 30 s 16 kHz WAV in a closed loop, as the
OpenAI client does, over raw sockets (httpx's own Python would be the limit on two cores).

Reported: requests/s (256 clients over 1.2 s allow at most 213), the mean latency above the stub's, the
server's stage means from its /metrics (as `bench server` reads them), and its CPU per request from
/proc/PID/task/*/stat: the event loop's thread (the main one) and the others but the GIL holder.

    PYTHONPATH=src python bench/http_host.py [--json OUT] [--concurrency 256] [--gil-busy 0.5]

With `--in-process` (`--requests 300 --warmup 50`): the app alone, built in this process and called through
ASGI one request at a time, its CPU ms a request (no uvicorn, sockets or GIL holder); `HTTP_HOST_PROFILE`
writes a cProfile of the timed calls.

Linux only (/proc). The clients and the server share this machine's cores: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stub_transcription(latency_s: float) -> None:
    """Replace `Transcriber.transcribe` (in this process) by a wait of `latency_s` and one segment."""
    from halkspeech.transcription import pipeline
    from halkspeech.transcription.types import Segment, Transcript

    async def transcribe(self: Any, audio: np.ndarray, options: Any, on_segment: Any = None) -> Transcript:
        await asyncio.sleep(latency_s)
        duration = len(audio) / 16000
        segment = Segment(0, 0, 0.0, duration, " stub", (1, 2, 3), 0.0, -0.1, 1.0, 0.01)
        if on_segment is not None:
            on_segment(segment)
        return Transcript(text=" stub", language="en", duration=duration, segments=(segment,))

    pipeline.Transcriber.transcribe = transcribe  # type: ignore[method-assign]


def _stub_server(latency_s: float, gil_busy: float, argv: list[str]) -> int:
    """Run `halkspeech ARGV` with the transcription replaced by a wait of `latency_s` (in this process), and a
    thread standing in for the engine's: Python work holding the GIL `gil_busy` of each millisecond."""
    from halkspeech.cli import main

    _stub_transcription(latency_s)
    if gil_busy > 0:
        threading.Thread(target=_hold_gil, args=(gil_busy,), daemon=True, name="gil-load").start()
    profile_path = os.environ.get("HTTP_HOST_PROFILE")  # cProfile of the main thread (the event loop) to here
    if not profile_path:
        return main(argv)
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(main, argv)
    finally:
        profiler.dump_stats(profile_path)


def _hold_gil(busy: float) -> None:
    """Pure Python for `busy` of every millisecond, asleep (GIL released) for the rest: the engine thread's
    launches and bookkeeping between its waits for the GPU."""
    tid_file = os.environ.get("HTTP_HOST_GIL_TID")
    if tid_file:  # so the bench leaves this thread's CPU out of the server's
        Path(tid_file).write_text(str(threading.get_native_id()))
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < busy * 1e-3:
            pass
        time.sleep((1 - busy) * 1e-3)


def _cpu_by_thread(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICK
    return out


def _write_clip(path: Path, seconds: float) -> Path:
    """The posted clip: `seconds` of noise as a 16 kHz WAV (its size is what matters, not its sound)."""
    from halkspeech.bench.longform import write_wav
    from halkspeech.model.dims import SAMPLE_RATE

    return write_wav(path, np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1)


def _request_bytes(port: int, clip: Path, model: str) -> bytes:
    """One POST /v1/audio/transcriptions of `clip` as multipart form data, as the OpenAI client sends it."""
    boundary = "halkspeechbench0123456789"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + clip.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _clients(port: int, request: bytes, concurrency: int, requests: int) -> tuple[list[float], int, float]:
    """`concurrency` kept-alive connections sending `request` in a closed loop: (latencies, failures, wall).
    Raw sockets, not httpx: the client's own Python stays far below the server's, so one core drives it."""
    left, latencies, failures = requests, [], 0

    async def client() -> None:
        nonlocal left, failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            sent = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if status.split()[1:2] == [b"200"]:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="http_host_") as tmp:
        return _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from halkspeech.bench.server_bench import _batch_means, _scrape
    from halkspeech.bench.subprocess_server import free_port, serve

    clip = _write_clip(work / "clip.wav", args.clip_s)
    port = free_port()
    tid_file = work / "gil_tid"
    env = dict(os.environ, HALKSPEECH_SERVER__MAX_CONCURRENT_REQUESTS=str(max(256, args.concurrency)),
               HTTP_HOST_GIL_TID=str(tid_file))  # fmt: skip
    server_args = ["--model", args.model, "--device", "cpu", "--preload", *args.serve_args]
    launcher = (str(Path(__file__).resolve()), "--stub-server", str(args.latency_s), str(args.gil_busy), "--")
    with serve(server_args, port=port, env=env, log_path=work / "server.log", startup_timeout_s=300,
               launcher=launcher) as server:  # fmt: skip
        request = _request_bytes(port, clip, args.model)
        asyncio.run(_clients(port, request, args.concurrency, args.warmup))
        before, metrics_before = _cpu_by_thread(server.process.pid), _scrape(server.url)
        latencies, failures, wall = asyncio.run(_clients(port, request, args.concurrency, args.requests))
        after, stages = _cpu_by_thread(server.process.pid), _batch_means(metrics_before, _scrape(server.url))
    pid = server.process.pid
    gil_tid = int(tid_file.read_text()) if tid_file.exists() else None
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop_s = used.get(pid, 0.0)
    other_s = sum(v for tid, v in used.items() if tid not in (pid, gil_tid))
    ok = len(latencies)
    return {
        "latency_s": args.latency_s,
        "concurrency": args.concurrency,
        "requests_ok": ok,
        "failures": failures,
        "requests_per_s": ok / wall,
        "gil_busy": args.gil_busy,
        "p50_ms": 1000 * statistics.median(latencies),
        "mean_overhead_ms": 1000 * (statistics.fmean(latencies) - args.latency_s),
        "wall_s": wall,
        "event_loop_cpu_ms_per_request": 1000 * loop_s / max(ok, 1),
        "other_threads_cpu_ms_per_request": 1000 * other_s / max(ok, 1),
        "event_loop_busy": loop_s / wall,
        **{f"server_{k}": v for k, v in stages.items() if k.endswith("_ms") or k == "loop_late_share"},
        "serve_args": args.serve_args,
    }


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """The app alone: `create_app` in this process (tiny.en on the CPU, the transcription stubbed with no wait)
    called through ASGI with the same request, its body in 64 KB chunks as uvicorn passes a client's, one
    request at a time: CPU ms a request (this process, all threads) without uvicorn, sockets or contention."""
    from halkspeech.api.app import create_app
    from halkspeech.config import EngineSettings, ModelSettings, ServerSettings, Settings
    from halkspeech.engine.pool import ModelPool
    from halkspeech.model.registry import ModelRegistry

    _stub_transcription(0.0)
    settings = Settings(
        model=ModelSettings(default=args.model, allow_download=False),
        engine=EngineSettings(device="cpu"),
        server=ServerSettings(max_concurrent_requests=max(256, args.concurrency)),
    )
    pool = ModelPool(settings, ModelRegistry(settings.model))
    app = create_app(settings, pool)
    pool.load_now()
    with tempfile.TemporaryDirectory(prefix="http_host_") as tmp:
        request = _request_bytes(0, _write_clip(Path(tmp) / "clip.wav", args.clip_s), args.model)
    head, body = request.split(b"\r\n\r\n", 1)
    headers = [tuple(line.lower().split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/audio/transcriptions", "raw_path": b"/v1/audio/transcriptions",
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}  # fmt: skip

    async def call() -> None:
        parts = iter(chunks)

        async def receive() -> dict[str, Any]:
            chunk = next(parts, None)
            if chunk is None:  # the body is read: the client stays connected
                await asyncio.Event().wait()
            return {"type": "http.request", "body": chunk, "more_body": chunk is not chunks[-1]}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(dict(scope), receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"the app answered {sent[0]['status']}: {sent[1:]}")

    async def run() -> list[float]:
        for _ in range(args.warmup):
            await call()
        profile_path = os.environ.get("HTTP_HOST_PROFILE")
        profiler = None
        if profile_path:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        rounds = []
        for _ in range(3):
            start = time.process_time()
            for _ in range(args.requests // 3):
                await call()
            rounds.append(1000 * (time.process_time() - start) / (args.requests // 3))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        return rounds

    try:
        rounds = asyncio.run(run())
    finally:
        pool.close_now()
    return {"in_process_cpu_ms_per_request": min(rounds), "rounds_ms": rounds, "requests": args.requests,
            "clip_s": args.clip_s}  # fmt: skip


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--stub-server":
        return _stub_server(float(sys.argv[2]), float(sys.argv[3]), sys.argv[sys.argv.index("--") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--latency-s", type=float, default=1.2, help="the stub transcription's wait")
    parser.add_argument("--gil-busy", type=float, default=0.5, help="share of the time a thread holds the GIL")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--clip-s", type=float, default=30.0)
    parser.add_argument("--in-process", action="store_true", help="the app alone, called in this process")
    parser.add_argument("serve_args", nargs="*", help="more `halkspeech serve` arguments (after --)")
    args = parser.parse_args()
    result = in_process(args) if args.in_process else measure(args)
    for key, value in result.items():
        print(f"{key:>36}: {value:.3f}" if isinstance(value, float) else f"{key:>36}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
