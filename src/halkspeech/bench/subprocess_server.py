"""`halkspeech serve` in a subprocess for the serving benchmarks: started, awaited until its models are loaded,
stopped; its log kept for when it fails."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from halkspeech.errors import HalkSpeechError


class BenchServerError(HalkSpeechError):
    """The benchmark's server exited or never became ready."""

    code = "bench_server_error"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BenchServer:
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def serve(
    args: Sequence[str],
    *,
    port: int,
    env: dict[str, str],
    log_path: Path,
    startup_timeout_s: float,
    launcher: Sequence[str] = ("-m", "halkspeech"),
) -> Iterator[BenchServer]:
    """Run `halkspeech serve --host 127.0.0.1 --port PORT ARGS…` (`launcher`: what follows the interpreter in
    place of `-m halkspeech`); yields it once /health lists a model."""
    command = [sys.executable, *launcher, "--log-level", "warning", "serve"]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, log_path, startup_timeout_s)
            yield BenchServer(url, process)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise BenchServerError(f"the server exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if httpx.get(f"{url}/health", timeout=5).json().get("models"):
                return
        time.sleep(0.5)
    raise BenchServerError(f"the server did not become ready within {timeout_s:g} s (log: {log_path})")
