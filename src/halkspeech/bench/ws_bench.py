"""Live push-to-talk latency through the real server: `halkspeech bench ws`.

Starts `halkspeech serve` in a subprocess (random weights of a released shape with a forced decode length, or
real weights), then drives it with the `/ws` load tester, over `/ws` or (`protocol="realtime"`) over
`/v1/realtime`, where end → final is commit → `...transcription.completed`:

  (a) one user, `turn_s` turns: p50 end → final (target on one H100/H200: ≤ 60 ms for 5 s turns);
  (b) `users` concurrent users while background clients post `file_s` files to /v1/audio/transcriptions
      without pause: p95 end → final (target: ≤ 250 ms with 200 users), and the file requests' latency.

Prints a table and writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from halkspeech.bench.common import (
    MAX_FORCED_TOKENS,
    check_output,
    check_ranges,
    device_info,
    percentile,
    print_table,
    write_json,
)
from halkspeech.bench.subprocess_server import free_port, serve
from halkspeech.loadtest.realtime_common import PATH as REALTIME_PATH
from halkspeech.loadtest.ws import LiveProtocol, WsLoadConfig, failures, print_results, run_ws_load_async

SAMPLE_RATE = 16_000
REPO_CLIP = Path(__file__).resolve().parents[3] / "tests" / "data" / "jfk.flac"


@dataclass(frozen=True)
class WsBenchConfig:
    model: str = "random:large-v3-turbo"
    #: Forced decoded tokens per window (random weights never reach end-of-text); None with real weights.
    tokens: int | None = 20
    device: str = "cuda"
    dtype: str = "float16"
    language: str = "en"
    turn_s: float = 5.0
    single_turns: int = 10  # scenario (a)
    users: int = 200  # scenario (b)
    ramp_s: float = 10.0
    turns_per_user: int = 3
    file_clients: int = 4  # concurrent posters of file_s files during (b)
    file_s: float = 30.0
    partials: bool = False  # also run (a) and (b) with partials on
    audio: Path | None = None  # speech to cut turns from (default: tests/data/jfk.flac, else a synthetic signal)
    port: int = 0  # 0: a free one
    startup_timeout_s: float = 900.0
    max_scenario_s: float = 600.0
    json_path: str | None = None
    protocol: LiveProtocol = "ws"  # realtime: the same scenarios over /v1/realtime
    frame_ms: float = 20.0  # audio per message (realtime clients often send 100 ms appends)

    def __post_init__(self) -> None:
        check_output(self.json_path)
        check_ranges(
            tokens=(self.tokens, 1, MAX_FORCED_TOKENS),
            turn_s=(self.turn_s, 0.1, 300),  # the server's longest turn by default
            single_turns=(self.single_turns, 1, 100_000),
            users=(self.users, 1, 100_000),
            ramp_s=(self.ramp_s, 0, 3600),
            turns_per_user=(self.turns_per_user, 1, 100_000),
            file_clients=(self.file_clients, 0, 1024),
            file_s=(self.file_s, 1, 3600),
            port=(self.port, 0, 65535),
            frame_ms=(self.frame_ms, 5, 1000),
        )


# -- audio ------------------------------------------------------------------------------------------------


def _speech(cfg: WsBenchConfig) -> np.ndarray:
    path = cfg.audio or (REPO_CLIP if REPO_CLIP.is_file() else None)
    if path is not None:
        from halkspeech.audio import decode_audio

        return decode_audio(path)
    rng = np.random.default_rng(0)  # no recording at hand: amplitude-modulated noise (random weights do not care)
    t = np.arange(SAMPLE_RATE * 10) / SAMPLE_RATE
    return (rng.standard_normal(t.size) * 0.1 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _looped(audio: np.ndarray, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    return np.tile(audio, -(-n // audio.size))[:n]


def _wav(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes())
    return buffer.getvalue()


# -- the server -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(cfg: WsBenchConfig, port: int, log: Path) -> Iterator[str]:
    """`halkspeech serve` in a subprocess (its flags, plus HALKSPEECH_* for what has no flag), logging warnings
    and errors to `log`; yields its URL."""
    env = dict(os.environ)
    env["HALKSPEECH_SERVER__WS_MAX_SESSIONS"] = str(max(1000, 2 * cfg.users))
    command = ["--model", cfg.model, "--preload", "--no-access-log"]
    command += ["--device", cfg.device, "--dtype", cfg.dtype]
    command += ["--max-concurrent-requests", str(max(256, 2 * cfg.file_clients))]
    if cfg.tokens:
        command += ["--force-decode-tokens", str(cfg.tokens)]
    with serve(command, port=port, env=env, log_path=log, startup_timeout_s=cfg.startup_timeout_s) as served:
        yield served.url


# -- background file traffic ------------------------------------------------------------------------------


async def _post_files(url: str, body: bytes, cfg: WsBenchConfig, stop: asyncio.Event) -> dict[str, Any]:
    """`file_clients` loops posting the same file until `stop`; latencies in ms and failures."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    data = {"model": cfg.model, "language": cfg.language, "response_format": "json"}

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await http.post("/v1/audio/transcriptions", files={"file": ("a.wav", body)}, data=data)
                key = None if response.status_code == 200 else f"http_{response.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key is None:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures[key] = failures.get(key, 0) + 1
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(cfg.file_clients)))
    return {
        "requests_ok": len(latencies),
        "failures": failures,
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
    }


# -- scenarios --------------------------------------------------------------------------------------------


def _load(cfg: WsBenchConfig, ws_url: str, clip: Path, *, users: int, turns: int, partials: bool) -> WsLoadConfig:
    return WsLoadConfig(
        url=ws_url,
        audio=(clip,),
        users=users,
        ramp_s=cfg.ramp_s if users > 1 else 0.0,
        turns_per_session=turns,
        speed=1.0,
        think_s=0.5,
        partials=partials,
        language=cfg.language,
        max_duration_s=cfg.max_scenario_s,
        protocol=cfg.protocol,
        frame_ms=cfg.frame_ms,
    )


async def _scenario(name: str, load: WsLoadConfig, url: str, files: bytes | None, cfg: WsBenchConfig) -> dict[str, Any]:
    stop = asyncio.Event()
    posters = asyncio.create_task(_post_files(url, files, cfg, stop)) if files and cfg.file_clients else None
    try:
        result = await run_ws_load_async(load)
    finally:
        stop.set()
    file_stats = await posters if posters is not None else None
    print_results(result, title=f"({name})")
    return {"scenario": name, "ws": result, "files": file_stats}


async def _run(cfg: WsBenchConfig, url: str, clip: Path, files: bytes) -> list[dict[str, Any]]:
    ws_url = url.replace("http://", "ws://") + (REALTIME_PATH if cfg.protocol == "realtime" else "/ws")
    await run_ws_load_async(_load(cfg, ws_url, clip, users=2, turns=2, partials=True))  # warm-up, not reported
    runs = [("a", 1, cfg.single_turns, False, None), ("b", cfg.users, cfg.turns_per_user, False, files)]
    if cfg.partials:
        runs += [
            ("a+partials", 1, cfg.single_turns, True, None),
            ("b+partials", cfg.users, cfg.turns_per_user, True, files),
        ]
    results = []
    for name, users, turns, partials, body in runs:
        load = _load(cfg, ws_url, clip, users=users, turns=turns, partials=partials)
        results.append(await _scenario(name, load, url, body, cfg))
    return results


def _row(result: dict[str, Any], cfg: WsBenchConfig) -> dict[str, Any]:
    ws, files = result["ws"], result["files"] or {}
    e2f = ws["end_to_final_ms"]
    single = result["scenario"].startswith("a")
    target = 60.0 if single else 250.0
    value = e2f["p50"] if single else e2f["p95"]
    return {
        "scenario": result["scenario"],
        "users": ws["config"]["users"],
        "turns": ws["turns_ok"],
        "failed": failures(ws),  # a dropped connection is counted in its failed turn, not twice
        "p50": e2f["p50"],
        "p95": e2f["p95"],
        "p99": e2f["p99"],
        "server_p50": ws["server_end_to_final_ms"]["p50"],
        "partial_lag_p50": ws["partial_lag_ms"]["p50"],
        "files": files.get("requests_ok"),
        "file_p50": files.get("p50_ms"),
        "target": f"{'p50' if single else 'p95'} ≤ {target:g}",
        "met": None if value is None else ("yes" if value <= target and not failures(ws) else "NO"),
    }


SERVER_LOG_CHARS = 20_000  # of the server's log kept in the JSON: a failed turn's traceback is in it


def run_ws_bench(cfg: WsBenchConfig) -> dict[str, Any]:
    speech = _speech(cfg)
    with tempfile.TemporaryDirectory(prefix="halkspeech-bench-ws-") as tmp:
        clip = Path(tmp) / "turn.wav"
        clip.write_bytes(_wav(_looped(speech, cfg.turn_s)))
        files = _wav(_looped(speech, cfg.file_s))
        port = cfg.port or free_port()
        log = Path(tmp) / "server.log"
        with server(cfg, port, log) as url:
            health = httpx.get(f"{url}/health", timeout=10).json()
            device = device_info(torch.device(cfg.device))  # after the server planned its memory
            results = asyncio.run(_run(cfg, url, clip, files))
        server_log = log.read_text(errors="replace")[-SERVER_LOG_CHARS:]  # its warnings and errors, tracebacks
    rows = [_row(r, cfg) for r in results]
    columns = [
        ("scenario", "scenario"),
        ("users", "users"),
        ("turns", "turns"),
        ("failed", "failed"),
        ("p50", "end→final p50 ms"),
        ("p95", "p95 ms"),
        ("p99", "p99 ms"),
        ("server_p50", "server p50 ms"),
        ("partial_lag_p50", "partial lag p50 ms"),
        ("files", f"{cfg.file_s:g} s files"),
        ("file_p50", "file p50 ms"),
        ("target", "target"),
        ("met", "met"),
    ]
    title = "Realtime API (/v1/realtime)" if cfg.protocol == "realtime" else "WebSocket push-to-talk"
    title += f", {cfg.model}" + (f", {cfg.tokens} forced tokens" if cfg.tokens else "")
    print_table(rows, columns, title=f"{title}, {cfg.turn_s:g} s turns of {cfg.frame_ms:g} ms messages, {cfg.device}")
    payload: dict[str, Any] = {"protocol": cfg.protocol}
    payload |= {"config": asdict(cfg) | {"audio": str(cfg.audio) if cfg.audio else None}}
    payload |= {"device": device, "server_health": health}
    payload |= {"rows": rows, "results": results, "server_log_tail": server_log}
    if server_log.strip():
        print(f"the server logged (the end of it is in the JSON's server_log_tail):\n{server_log[-1500:]}")
    write_json(cfg.json_path, payload)
    return payload
