"""TLS 1.3 session tickets (`server.ssl_session_tickets`) against two kinds of clients, on one `halkspeech serve`
over TLS per setting (a subprocess; a CA and certificate made by trustme):

- websockets' threaded client (`websockets.sync.client`): THREADS threads open /ws connections one after another
  and start a turn on each; a connection whose upgrade gets no answer within 5 s counts as hung;
- the OpenAI SDK's synchronous realtime client (that same client underneath), likewise on /v1/realtime, each
  connection waiting for its session's first event; a connection that times out counts as hung;
- a new connection's first request (GET /health, read to its end) from a client that leaves Nagle's algorithm on
  and from one that sets TCP_NODELAY, median of 40 each.

  PYTHONPATH=src python bench/tls_tickets.py [--tickets 2,0] [--connections 400] [--threads 4]
      [--json bench/results/tls_tickets_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import trustme
from openai import OpenAI
from websockets.sync.client import connect

HUNG_S = 5.0  # an upgrade answered later than this hung (a turn's start takes milliseconds here)


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(certificate chain, key, CA) PEM files for 127.0.0.1."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, authority = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(authority))
    return cert, key, authority


def start(folder: Path, tickets: int, model: str, port: int) -> subprocess.Popen[bytes]:
    cert, key, authority = certificates(folder)
    env = {**os.environ, "HALKSPEECH_SERVER__SSL_SESSION_TICKETS": str(tickets)}
    command = [sys.executable, "-m", "halkspeech", "--log-level", "warning", "serve", "--model", model]
    command += ["--device", "cpu", "--preload", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    process = subprocess.Popen(command, stdout=(folder / "serve.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    context = ssl.create_default_context(cafile=authority)
    for _ in range(240):
        if process.poll() is not None:
            sys.exit(f"the server exited: {(folder / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=context, timeout=5).json().get("models"):
                return process
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
    sys.exit("the server did not come up")


def websockets_session(port: int, context: ssl.SSLContext) -> None:
    with connect(f"wss://127.0.0.1:{port}/ws", ssl=context, open_timeout=HUNG_S, close_timeout=2) as ws:
        ws.send(json.dumps({"type": "start", "language": "en"}))
        json.loads(ws.recv(HUNG_S))


def openai_session(port: int, context: ssl.SSLContext) -> None:
    # the SDK's websocket options reach websockets' connect; its client trusts SSL_CERT_FILE (set in main)
    client = OpenAI(
        api_key="unused", base_url=f"https://127.0.0.1:{port}/v1", websocket_base_url=f"wss://127.0.0.1:{port}/v1"
    )
    options = {"open_timeout": HUNG_S, "close_timeout": 2}
    with client.realtime.connect(model="whisper-1", websocket_connection_options=options) as connection:
        connection.recv()


CLIENTS = {"websockets": websockets_session, "openai": openai_session}


def threaded_clients(
    session: Any, port: int, context: ssl.SSLContext, connections: int, threads: int
) -> dict[str, Any]:
    hung: list[float] = []
    other: list[str] = []

    def run(count: int) -> None:
        for _ in range(count):
            began = time.monotonic()
            try:
                session(port, context)
            except TimeoutError:
                hung.append(time.monotonic() - began)
            except Exception as exc:  # any other failure is counted and shown
                other.append(repr(exc)[:100])

    workers = [threading.Thread(target=run, args=(connections // threads,)) for _ in range(threads)]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    total = connections // threads * threads
    return {"connections": total, "hung": len(hung), "other_failures": other, "seconds": time.monotonic() - began}


def first_request_ms(port: int, context: ssl.SSLContext, nodelay: bool, count: int = 40) -> float:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        raw = socket.create_connection(("127.0.0.1", port))
        if nodelay:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", default="2,0", help="server.ssl_session_tickets values, in turn")
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--port", type=int, default=8872)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for tickets in (int(value) for value in args.tickets.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            process = start(Path(folder), tickets, args.model, args.port)
            try:
                context = ssl.create_default_context(cafile=Path(folder) / "ca.pem")
                os.environ["SSL_CERT_FILE"] = str(Path(folder) / "ca.pem")
                row: dict[str, Any] = {"tickets": tickets}
                for name, session in CLIENTS.items():
                    row[name] = threaded_clients(session, args.port, context, args.connections, args.threads)
                row["first_request_ms_nagle"] = first_request_ms(args.port, context, nodelay=False)
                row["first_request_ms_nodelay"] = first_request_ms(args.port, context, nodelay=True)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
        rows.append(row)
        counts = {
            name: (row[name]["hung"], row[name]["connections"], len(row[name]["other_failures"])) for name in CLIENTS
        }
        hung = ", ".join(f"{name} {h} of {n} (other failures {f})" for name, (h, n, f) in counts.items())
        print(
            f"tickets {tickets}: hung {hung}; a new connection's first request: "
            f"{row['first_request_ms_nagle']:.1f} ms with Nagle, {row['first_request_ms_nodelay']:.1f} ms with "
            f"TCP_NODELAY (medians of 40)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "hung_s": HUNG_S}, indent=2) + "\n")


if __name__ == "__main__":
    main()
