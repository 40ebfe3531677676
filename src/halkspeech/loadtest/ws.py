"""`halkspeech loadtest ws`: many simulated users doing push-to-talk turns against a running server's /ws, or
(`--protocol realtime`) its OpenAI Realtime transcription endpoint /v1/realtime.

Each user opens `sessions_per_user` connections one after another and speaks `turns_per_session` turns on
each: it streams a clip as 20 ms PCM frames at `speed` × real time, sends `end`, and waits for the final.
Users start spread over `ramp_s`. Reported: latency from `end` to the final (p50/p95/p99), how far partials
lag behind the audio they cover, turns and audio per second, errors and dropped connections. Every loop is
bounded: by the counts, by `turn_timeout_s` per turn and by `max_duration_s` overall.

Over /v1/realtime a session is set up once per connection (`session.update`: PCM16 at 24 kHz as OpenAI's
clients send it, no turn detection); each
turn is base64 `input_audio_buffer.append` events paced the same way, then `input_audio_buffer.commit`, timed
to `...transcription.completed`; `error` and `...transcription.failed` events count as errors by their code.
Deltas carry no audio position, so only the first one is timed (first audio → first partial).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from halkspeech.cli.argtypes import finite_float
from halkspeech.errors import HalkSpeechError, InvalidRequest
from halkspeech.loadtest import realtime_common as realtime
from halkspeech.loadtest.clips import read_audio
from halkspeech.loadtest.ws_common import (
    END_MESSAGE,
    SAMPLE_RATE,
    TURN_ENDED,
    TURN_GOES_ON,
    open_ws,
    paced,
    parse,
    pcm_frames,
    start_message,
    to_pcm16,
    ws_url,
)

LiveProtocol = Literal["ws", "realtime"]
PROTOCOLS: tuple[LiveProtocol, ...] = ("ws", "realtime")
TITLES = {"ws": "WebSocket push-to-talk load", "realtime": "Realtime API (/v1/realtime) load"}


@dataclass(frozen=True)
class WsLoadConfig:
    url: str
    audio: tuple[Path, ...]
    users: int = 10
    ramp_s: float = 0.0
    sessions_per_user: int = 1
    turns_per_session: int = 3
    speed: float = 1.0
    frame_ms: float = 20.0
    think_s: float = 0.5  # pause between a final and the user's next turn
    partials: bool = False
    language: str | None = "en"
    model: str | None = None
    api_key: str | None = None
    turn_timeout_s: float = 60.0  # wait for a final at most this long after `end`
    max_duration_s: float = 900.0  # the whole run stops after this
    json_path: str | None = None
    protocol: LiveProtocol = "ws"  # realtime: /v1/realtime, where `model` is the session's transcription model

    def __post_init__(self) -> None:
        from halkspeech.bench.common import check_output  # as write_json below: imported when used

        check_output(self.json_path)
        if self.protocol not in PROTOCOLS:
            raise InvalidRequest(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.users < 1 or self.sessions_per_user < 1 or self.turns_per_session < 1:
            raise InvalidRequest("--users, --sessions-per-user and --turns-per-session must be at least 1")
        if self.speed < 0 or self.ramp_s < 0 or not 5 <= self.frame_ms <= 1000:
            raise InvalidRequest("--speed and --ramp-s must be ≥ 0, --frame-ms between 5 and 1000")
        if not self.audio:
            raise InvalidRequest("give at least one --audio file")
        if not self.url.startswith(("ws://", "wss://")):
            raise InvalidRequest(f"--url must be a ws:// or wss:// URL: {self.url!r}")
        ws_url(self.url)  # a port out of range, no host: one line now, not a failure per user later
        if self.turn_timeout_s <= 0 or self.max_duration_s <= 0:
            raise InvalidRequest("--turn-timeout-s and --max-duration-s must be positive")


@dataclass
class Tally:
    """Everything measured, from every user."""

    end_to_final_ms: list[float] = field(default_factory=list)
    partial_lag_ms: list[float] = field(default_factory=list)  # receipt − when its last audio was sent
    first_partial_ms: list[float] = field(default_factory=list)  # first audio frame → first partial
    server_end_to_final_ms: list[float] = field(default_factory=list)  # as the server measured it
    partials: int = 0  # partials (deltas over /v1/realtime) received
    turns_ok: int = 0
    turns_failed: int = 0
    audio_s: float = 0.0  # audio of the successful turns
    errors: Counter[str] = field(default_factory=Counter)  # error code → count
    error_messages: dict[str, str] = field(default_factory=dict)  # error code → the first message with it
    dropped: int = 0  # connections closed by the server or the network in the middle of a session
    connect_failures: int = 0
    users_failed: int = 0  # simulated users stopped by an error in this tester, or by the overall deadline


@dataclass
class _Turn:
    """Timing of the turn in flight on one connection."""

    sent_at: list[float] = field(default_factory=list)  # send time of each frame
    samples: list[int] = field(default_factory=list)  # cumulative samples after each frame
    ended: float = 0.0
    result: asyncio.Future[dict[str, Any]] | None = None
    first_partial: bool = True
    number: int | None = None  # the server's number for it, from `started`: later messages carry it
    ended_by_server: bool = False  # audio_too_long / turn_timeout: its final follows without our `end`


class _User:
    """One simulated /ws user; `_RealtimeUser` overrides what /v1/realtime says differently."""

    def __init__(self, index: int, cfg: WsLoadConfig, clips: list[list[bytes]], tally: Tally, deadline: float):
        self.index, self.cfg, self.clips, self.tally, self.deadline = index, cfg, clips, tally, deadline
        self.turn: _Turn | None = None
        self.url = cfg.url
        self.sample_rate = sample_rate(cfg.protocol)  # of the clips' frames

    async def run(self) -> None:
        await asyncio.sleep(self.cfg.ramp_s * self.index / max(1, self.cfg.users))
        for session in range(self.cfg.sessions_per_user):
            if time.perf_counter() >= self.deadline:
                return
            try:
                ws = await open_ws(self.url, self.cfg.api_key)
            except HalkSpeechError:
                self.tally.connect_failures += 1
                continue
            await self._session(ws, session)

    async def _session(self, ws: ClientConnection, session: int) -> None:
        receiver = asyncio.create_task(self._receive(ws))
        try:
            if not await self._opened(ws, receiver):
                return
            for turn in range(self.cfg.turns_per_session):
                if time.perf_counter() >= self.deadline or receiver.done():
                    break
                clip = self.clips[(self.index + session + turn) % len(self.clips)]
                if not await self._turn(ws, clip):
                    break
                await asyncio.sleep(self.cfg.think_s)
        except ConnectionClosed:  # a send failed: the server or the network closed the connection mid-turn
            self.tally.dropped += 1
            self.tally.turns_failed += 1
        finally:
            with contextlib.suppress(Exception):
                await ws.close()
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver

    async def _opened(self, ws: ClientConnection, receiver: asyncio.Task[None]) -> bool:
        """Set the connection up before its first turn; False when it cannot be used (counted). /ws: nothing."""
        return True

    async def _begin(self, ws: ClientConnection) -> None:
        """What opens a turn."""
        await ws.send(start_message(language=self.cfg.language, model=self.cfg.model, partials=self.cfg.partials))

    def _audio(self, frame: bytes) -> str | bytes:
        return frame

    async def _end(self, ws: ClientConnection, turn: _Turn) -> None:
        await ws.send(END_MESSAGE)

    def _parse(self, raw: str | bytes) -> dict[str, Any]:
        """A server message in /ws's words."""
        return parse(raw)

    async def _turn(self, ws: ClientConnection, clip: list[bytes]) -> bool:
        """One turn; False when the connection is unusable afterwards."""
        result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        turn = self.turn = _Turn(result=result)
        await self._begin(ws)
        total = 0
        async for _, frame in paced(clip, self.cfg.speed, self.cfg.frame_ms / 1000):
            if turn.ended_by_server or result.done():
                break  # the server would drop the rest
            await ws.send(self._audio(frame))
            total += len(frame) // 2
            turn.sent_at.append(time.perf_counter())
            turn.samples.append(total)
        await self._end(ws, turn)
        turn.ended = time.perf_counter()
        try:
            async with asyncio.timeout(min(self.cfg.turn_timeout_s, max(0.0, self.deadline - turn.ended) + 1)):
                message = await result
        except TimeoutError:
            self.tally.turns_failed += 1
            self.tally.errors["no_final_in_time"] += 1
            return False
        if message["type"] == "final":
            self.tally.turns_ok += 1
            duration = message.get("duration")
            self.tally.audio_s += duration if isinstance(duration, int | float) else total / self.sample_rate
            if not turn.ended_by_server:  # else our `end` did not end it: no end → final to time
                self.tally.end_to_final_ms.append((message["_at"] - turn.ended) * 1000)
                server = message.get("timings_ms", {}).get("end_to_final")
                if isinstance(server, int | float):
                    self.tally.server_end_to_final_ms.append(float(server))
            return True
        self.tally.turns_failed += 1
        if message["type"] == "closed":
            self.tally.dropped += 1
            return False
        return True

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self._on_message(self._parse(raw), time.perf_counter())
        except ConnectionClosed:
            pass
        turn = self.turn
        if turn is not None and turn.result is not None and not turn.result.done():
            turn.result.set_result({"type": "closed"})

    def _on_message(self, message: dict[str, Any], at: float) -> None:
        turn, kind, code = self.turn, message["type"], message.get("code")
        if kind == "error":
            self.tally.errors[str(code)] += 1
            self.tally.error_messages.setdefault(str(code), str(message.get("message")))
        if turn is None or turn.result is None or turn.result.done():
            return
        number = message.get("turn")
        if kind == "started":
            turn.number = number
        elif number is not None and number != turn.number:
            return  # an earlier turn's message (a final after its turn was given up on), or one before `started`
        elif kind == "partial":
            self._partial(turn, message, at)
        elif kind == "final":
            turn.result.set_result(message | {"_at": at})
        elif kind == "error" and code in TURN_ENDED:
            turn.ended_by_server = True  # its final follows
        elif kind == "error" and code not in TURN_GOES_ON:
            turn.result.set_result(message | {"_at": at})  # the start was refused, or the turn failed

    def _partial(self, turn: _Turn, message: dict[str, Any], at: float) -> None:
        self.tally.partials += 1
        if not turn.samples:
            return
        if turn.first_partial:
            turn.first_partial = False
            self.tally.first_partial_ms.append((at - turn.sent_at[0]) * 1000)
        covered = message.get("audio_s")  # /ws only: a realtime delta does not say what audio it covers
        if isinstance(covered, int | float):
            index = int(np.searchsorted(turn.samples, covered * self.sample_rate - 1))  # the frame that completed it
            if index < len(turn.sent_at):
                self.tally.partial_lag_ms.append((at - turn.sent_at[index]) * 1000)


class _RealtimeUser(_User):
    """A /v1/realtime user: one `session.update` per connection, appends and a commit per turn."""

    def __init__(self, index: int, cfg: WsLoadConfig, clips: list[list[bytes]], tally: Tally, deadline: float):
        super().__init__(index, cfg, clips, tally, deadline)
        self.url = realtime.realtime_url(cfg.url)
        self.model = realtime.transcription_model(cfg.model, cfg.partials)
        self.ready: asyncio.Future[bool] | None = None  # the session update: taken (True) or refused

    async def _opened(self, ws: ClientConnection, receiver: asyncio.Task[None]) -> bool:
        """Send the session's settings and wait for `session.updated`. Refused (a model the server does not
        offer, a wrong key: their `error` is counted), closed or unanswered: the session's turns fail."""
        ready = self.ready = asyncio.get_running_loop().create_future()
        with contextlib.suppress(ConnectionClosed):  # refused at once (a wrong key): its error is read below
            update = realtime.session_update(model=self.model, language=self.cfg.language, sample_rate=self.sample_rate)
            await ws.send(update)
        await asyncio.wait({ready, receiver}, timeout=self.cfg.turn_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.result():
            return True
        self.tally.turns_failed += self.cfg.turns_per_session
        if receiver.done() and not ready.done():
            self.tally.dropped += 1
        elif not ready.done():
            self.tally.errors["no_session_in_time"] += 1
        return False

    async def _begin(self, ws: ClientConnection) -> None:
        pass  # the buffer opens with the first append

    def _audio(self, frame: bytes) -> str | bytes:
        return realtime.append(frame)

    async def _end(self, ws: ClientConnection, turn: _Turn) -> None:
        if not turn.ended_by_server:  # else the server committed the buffer itself: a commit would find it empty
            await ws.send(realtime.COMMIT)

    def _parse(self, raw: str | bytes) -> dict[str, Any]:
        return realtime.as_ws_message(parse(raw), deltas=self.model != realtime.NON_STREAMING_MODEL)

    def _on_message(self, message: dict[str, Any], at: float) -> None:
        if self.ready is not None and not self.ready.done() and message["type"] in ("session.updated", "error"):
            self.ready.set_result(message["type"] == "session.updated")
        super()._on_message(message, at)


def sample_rate(protocol: LiveProtocol) -> int:
    """The PCM the simulated users send: /ws's 16 kHz, or the 24 kHz of OpenAI's realtime clients."""
    return realtime.SAMPLE_RATE if protocol == "realtime" else SAMPLE_RATE


async def run_ws_load_async(cfg: WsLoadConfig) -> dict[str, Any]:
    """Run the load; returns the results (also printed as a table and written as JSON when asked)."""
    rate = sample_rate(cfg.protocol)
    clips = [pcm_frames(to_pcm16(read_audio(path, sample_rate=rate)), cfg.frame_ms, rate) for path in cfg.audio]
    tally = Tally()
    started = time.perf_counter()
    deadline = started + cfg.max_duration_s
    user = _RealtimeUser if cfg.protocol == "realtime" else _User
    users = [user(i, cfg, clips, tally, deadline) for i in range(cfg.users)]
    tasks = [asyncio.create_task(u.run()) for u in users]
    _, late = await asyncio.wait(tasks, timeout=cfg.max_duration_s + cfg.turn_timeout_s + 10)
    for task in late:
        task.cancel()
    for task, outcome in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
        if task in late:
            tally.users_failed += 1
            tally.errors["stopped_at_deadline"] += 1
        elif isinstance(outcome, BaseException):  # a bug here or an unexpected network error: counted, not lost
            tally.users_failed += 1
            tally.errors[f"tester_{type(outcome).__name__}"] += 1
    return summarize(cfg, tally, time.perf_counter() - started)


def run_ws_load(cfg: WsLoadConfig) -> dict[str, Any]:
    results = asyncio.run(run_ws_load_async(cfg))
    print_results(results)
    if cfg.json_path:
        from halkspeech.bench.common import write_json

        write_json(cfg.json_path, results)
    return results


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    from halkspeech.bench.common import percentile

    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "mean": round(statistics.fmean(values), 2),
        "max": round(max(values), 2),
    }


def summarize(cfg: WsLoadConfig, tally: Tally, wall_s: float) -> dict[str, Any]:
    config = asdict(cfg) | {"audio": [str(p) for p in cfg.audio], "api_key": "***" if cfg.api_key else None}
    return {
        "config": config,
        "wall_s": round(wall_s, 3),
        "turns_ok": tally.turns_ok,
        "turns_failed": tally.turns_failed,
        "turns_per_s": round(tally.turns_ok / wall_s, 3) if wall_s else None,
        "audio_s_per_s": round(tally.audio_s / wall_s, 3) if wall_s else None,
        "errors": dict(tally.errors),
        "error_messages": tally.error_messages,
        "dropped_connections": tally.dropped,
        "connect_failures": tally.connect_failures,
        "users_failed": tally.users_failed,
        "partials": tally.partials,
        "end_to_final_ms": _stats(tally.end_to_final_ms),
        "server_end_to_final_ms": _stats(tally.server_end_to_final_ms),
        "partial_lag_ms": _stats(tally.partial_lag_ms),
        "first_partial_ms": _stats(tally.first_partial_ms),
    }


def print_results(results: dict[str, Any], title: str | None = None) -> None:
    """The latency table and a line of counts; the title says the protocol unless one is given."""
    from halkspeech.bench.common import print_table

    title = title or TITLES[results["config"].get("protocol", "ws")]
    protocol = results["config"].get("protocol", "ws")
    end, final, partial = ("commit", "completed", "delta") if protocol == "realtime" else ("end", "final", "partial")
    rows = [
        {"metric": label} | results[key]
        for key, label in (
            ("end_to_final_ms", f"{end} → {final} (client), ms"),
            ("server_end_to_final_ms", f"{end} → {final} (server), ms"),
            ("partial_lag_ms", "partial lag behind audio, ms"),
            ("first_partial_ms", f"first audio → first {partial}, ms"),
        )
    ]
    columns = [("metric", "metric"), *((k, k) for k in ("count", "p50", "p95", "p99", "mean", "max"))]
    print_table(rows, columns, title=f"{title}: {results['config']['users']} users, {results['wall_s']:.1f} s")
    print(
        f"turns ok {results['turns_ok']}, failed {results['turns_failed']}, {results['turns_per_s']} turns/s, "
        f"{results['audio_s_per_s']} audio s/s; errors {results['errors'] or 'none'}; "
        f"dropped {results['dropped_connections']}; connect failures {results['connect_failures']}; "
        f"users failed {results['users_failed']}",
        flush=True,
    )
    for code, message in results.get("error_messages", {}).items():
        print(f"  first {code}: {message}", flush=True)


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = kinds.add_parser(
        "ws",
        help="push-to-talk users over /ws or /v1/realtime: end→final latency, partial lag, throughput",
        description="\n\n".join(__doc__.split("\n\n")[1:3]) if __doc__ else None,
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="ws",
        help="ws: /ws push-to-talk; realtime: OpenAI's Realtime transcription API at /v1/realtime",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="the server's /ws or /v1/realtime URL (default: ws://localhost:8000 and the protocol's path)",
    )
    parser.add_argument("--audio", type=Path, nargs="+", required=True, metavar="FILE", help="clips, used in turn")
    parser.add_argument("--users", type=int, default=10, help="users, each with one connection at a time")
    parser.add_argument("--ramp-s", type=finite_float, default=0.0, help="spread user starts over this many seconds")
    parser.add_argument("--sessions-per-user", type=int, default=1, help="connections each user opens in turn")
    parser.add_argument("--turns-per-session", type=int, default=3, help="turns on each connection")
    parser.add_argument("--speed", type=finite_float, default=1.0, help="× real time; 0 = as fast as possible")
    parser.add_argument("--frame-ms", type=finite_float, default=20.0, help="PCM frame length")
    parser.add_argument("--think-s", type=finite_float, default=0.5, help="pause between turns")
    parser.add_argument(
        "--partials",
        action="store_true",
        help="ask for partial results while speaking (realtime: session model gpt-4o-transcribe, else whisper-1)",
    )
    parser.add_argument("--language", default="en")
    parser.add_argument(
        "--model",
        default=None,
        help="model name (default: the server's); realtime: the session's model, and any but whisper-1 streams deltas",
    )
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument(
        "--turn-timeout-s", type=finite_float, default=60.0, help="wait for a final at most this long after end"
    )
    parser.add_argument("--max-duration-s", type=finite_float, default=900.0, help="the whole run stops after this")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.audio if not p.is_file()]
    if missing:
        raise InvalidRequest(f"no such file: {', '.join(missing)}")
    path = realtime.PATH if args.protocol == "realtime" else "/ws"
    cfg = WsLoadConfig(
        url=args.url or f"ws://localhost:8000{path}",
        audio=tuple(args.audio),
        users=args.users,
        ramp_s=args.ramp_s,
        sessions_per_user=args.sessions_per_user,
        turns_per_session=args.turns_per_session,
        speed=args.speed,
        frame_ms=args.frame_ms,
        think_s=args.think_s,
        partials=args.partials,
        language=args.language or None,
        model=args.model,
        api_key=args.api_key,
        turn_timeout_s=args.turn_timeout_s,
        max_duration_s=args.max_duration_s,
        json_path=args.json_path,
        protocol=args.protocol,
    )
    results = run_ws_load(cfg)
    return 0 if results["turns_ok"] and not failures(results) else 1


def failures(results: dict[str, Any]) -> int:
    """Turns that failed (a dropped connection fails its turn: counted there), connections never opened and
    users that could not finish."""
    return int(results["turns_failed"] + results["connect_failures"] + results["users_failed"])
