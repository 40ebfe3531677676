"""`halkspeech ws-client`: push-to-talk against a server's /ws endpoint, from a file or the microphone.

A file is streamed as 20 ms frames of 16-bit PCM at real time (or `--speed` times faster) in one turn; with
`--mic` each press of Enter starts a turn and the next one ends it. Finals go to stdout, partials and
segments to stderr (or every server message as a JSON line with `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from halkspeech.audio import decode_audio
from halkspeech.cli.argtypes import finite_float
from halkspeech.errors import InvalidRequest
from halkspeech.loadtest.ws_common import (
    END_MESSAGE,
    SAMPLE_RATE,
    TURN_ENDED,
    TURN_GOES_ON,
    ConnectionFailed,
    EnergyGate,
    open_ws,
    paced,
    parse,
    pcm_frames,
    start_message,
    to_pcm16,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ws-client",
        help="push-to-talk over WebSocket from a file or the microphone",
        description="Stream 16-bit PCM to a HalkSpeech /ws endpoint and print partial and final transcripts.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, help="audio file to stream as one turn")
    source.add_argument("--mic", action="store_true", help="the microphone: Enter starts and ends each turn")
    parser.add_argument("--url", default="ws://localhost:8000/ws", help="server URL (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--model", default=None, help="model name (default: the server's)")
    parser.add_argument("--language", default=None, help="language code (default: detect)")
    parser.add_argument("--task", default="transcribe", choices=("transcribe", "translate"))
    parser.add_argument("--partials", action="store_true", help="ask for partial results while speaking")
    parser.add_argument("--segment-silence-ms", type=int, default=None, help="server cuts segments at such pauses")
    parser.add_argument("--server-vad", action="store_true", help="server skips audio without speech")
    parser.add_argument("--hotwords", metavar="TEXT", help="names and terms the server should favour")
    parser.add_argument("--vad", action="store_true", help="client-side energy gate: do not send silence")
    parser.add_argument("--vad-threshold-db", type=finite_float, default=-45.0, help="gate threshold in dBFS")
    parser.add_argument("--speed", type=finite_float, default=1.0, help="file pace: × real time; 0 = all at once")
    parser.add_argument("--frame-ms", type=finite_float, default=20.0, help="PCM frame length (default: 20)")
    parser.add_argument("--timeout", type=finite_float, default=120.0, help="seconds to wait for a final")
    parser.add_argument("--json", action="store_true", help="print every server message as a JSON line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.speed < 0 or not 5 <= args.frame_ms <= 1000:
        raise InvalidRequest("--speed must be ≥ 0 and --frame-ms between 5 and 1000")
    if args.timeout <= 0:
        raise InvalidRequest("--timeout must be more than 0 seconds")
    if args.segment_silence_ms is not None and not 100 <= args.segment_silence_ms <= 30000:
        raise InvalidRequest("--segment-silence-ms must be between 100 and 30000")  # the server's bounds
    if args.mic:
        return asyncio.run(_mic(args))
    if not args.file.is_file():
        raise InvalidRequest(f"no such file: {args.file}")
    return asyncio.run(_file(args))


class Printer:
    """Shows server messages; remembers the turn the client is waiting for."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty()
        self.errors = 0

    def show(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.as_json:
            print(json.dumps(message, ensure_ascii=False), flush=True)
        elif kind == "partial":
            line = f"… {message.get('text', '')}"
            print(f"\r\033[K{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        elif kind == "segment":
            self._clear()
            print(
                f"[{message.get('start', 0):.2f}–{message.get('end', 0):.2f}] {message.get('text', '')}",
                file=sys.stderr,
            )
        elif kind == "final":
            self._clear()
            print(message.get("text", ""), flush=True)
        if kind == "error":
            code = message.get("code")
            warning = code in TURN_ENDED  # the final still comes: the turn did not fail
            self.errors += not warning
            if not self.as_json:
                self._clear()
                what = "warning:" if warning else "server error"
                print(f"halkspeech: {what} {code}: {message.get('message')}", file=sys.stderr)

    def _clear(self) -> None:
        if self.tty and not self.as_json:
            print("\r\033[K", end="", file=sys.stderr)


async def _receive(ws: ClientConnection, printer: Printer, done: asyncio.Queue[dict[str, Any]]) -> None:
    """Print everything; hand finals and errors (which end a turn or the start) to the sender."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            message = parse(raw)
            printer.show(message)
            if message["type"] in ("final", "error"):
                done.put_nowait(message)
    done.put_nowait({"type": "closed"})


def _gate(args: argparse.Namespace) -> EnergyGate:
    """The client-side VAD, keeping 300 ms around speech whatever the frame length."""
    return EnergyGate(args.vad_threshold_db, pad_frames=max(1, round(300 / args.frame_ms)))


def _start(args: argparse.Namespace) -> str:
    return start_message(
        language=args.language,
        model=args.model,
        partials=args.partials,
        segment_silence_ms=args.segment_silence_ms,
        vad=args.server_vad,
        task=args.task,
        hotwords=args.hotwords,
    )


def _turn_ended(done: asyncio.Queue[dict[str, Any]]) -> bool:
    """The server has answered while audio is still being sent: the start was refused, the turn was ended
    (audio_too_long, turn_timeout: its final follows) or the connection closed. Either way, sending more audio
    is pointless; the server would drop it."""
    return not done.empty()


async def _await_final(done: asyncio.Queue[dict[str, Any]], timeout: float) -> bool:
    """True when the turn's final came; False on an error that ends the turn without one, or a closed
    connection."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await done.get()
                if message["type"] == "final":
                    return True
                if message["type"] == "closed" or message.get("code") not in TURN_GOES_ON:
                    return False  # the turn (or its start) failed, or the connection is gone
    except TimeoutError:
        print(f"halkspeech: no final within {timeout:g} s", file=sys.stderr)
        return False


@contextlib.asynccontextmanager
async def _session(args: argparse.Namespace) -> AsyncIterator[tuple[ClientConnection, Printer, asyncio.Queue]]:
    ws = await open_ws(args.url, args.api_key)
    printer = Printer(args.json)
    done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    receiver = asyncio.create_task(_receive(ws, printer, done))
    try:
        yield ws, printer, done
    finally:
        await ws.close()
        await receiver


async def _file(args: argparse.Namespace) -> int:
    audio = await asyncio.to_thread(decode_audio, args.file)
    frames = pcm_frames(to_pcm16(audio), args.frame_ms)
    if args.vad:
        frames = list(_gate(args).filter(frames))
    async with _session(args) as (ws, printer, done):
        try:
            await ws.send(_start(args))
            async for _, frame in paced(frames, args.speed, args.frame_ms / 1000):
                if _turn_ended(done):
                    break
                await ws.send(frame)
            await ws.send(END_MESSAGE)
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the server closed the connection: {exc}") from exc
        ok = await _await_final(done, args.timeout + len(audio) / SAMPLE_RATE)
    return 0 if ok and not printer.errors else 1


async def _mic(args: argparse.Namespace) -> int:
    try:
        import sounddevice  # type: ignore[import-not-found,unused-ignore]
    except (ImportError, OSError) as exc:  # OSError: the package is there but PortAudio is not
        raise InvalidRequest(
            f"--mic needs the sounddevice package and PortAudio: pip install 'halkspeech[mic]' ({exc})"
        ) from exc
    loop = asyncio.get_running_loop()
    captured: asyncio.Queue[bytes] = asyncio.Queue()
    block = int(SAMPLE_RATE * args.frame_ms / 1000)

    def callback(data: Any, frames: int, time: Any, status: Any) -> None:  # PortAudio's thread
        loop.call_soon_threadsafe(captured.put_nowait, bytes(data))

    gate = _gate(args) if args.vad else None
    failures = 0
    async with _session(args) as (ws, _, done):
        while True:
            print("Press Enter to talk (Ctrl-D quits) …", file=sys.stderr)
            if not await loop.run_in_executor(None, sys.stdin.readline):
                return 1 if failures else 0
            await ws.send(_start(args))
            print("Listening; press Enter to send.", file=sys.stderr)
            stream = sounddevice.RawInputStream(SAMPLE_RATE, block, channels=1, dtype="int16", callback=callback)
            with stream:
                stop = loop.run_in_executor(None, sys.stdin.readline)
                while not stop.done():
                    try:
                        frame = await asyncio.wait_for(captured.get(), 0.1)
                    except TimeoutError:
                        continue
                    for out in gate.push(frame) if gate else [frame]:
                        if not _turn_ended(done):  # else keep capturing until Enter, and send nothing
                            await ws.send(out)
            await ws.send(END_MESSAGE)
            if not await _await_final(done, args.timeout):
                failures += 1
