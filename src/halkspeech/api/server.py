"""How uvicorn serves the app: its options in one place (`uvicorn_config`, used by `halkspeech serve` and the
tests' live server), its HTTP protocol with a deadline for each request's headers (`HeaderDeadline`), and a
shutdown that answers every request and live turn in flight within its time (`Server`).

uvicorn times nothing out before a request's headers are complete: a connection that sends nothing, or sends
its headers a byte at a time (slowloris), holds a socket forever, and a few thousand of them exhaust the
process's file descriptors. Its keep-alive timeout starts only after a response, and the body limits
(limits.BodyLimitMiddleware) only once the app has the request. Here a request's header block must be
complete within `server.header_timeout_s` of the connection opening, or of the request's first byte on a
kept-alive connection; otherwise the client gets a 408 and the connection is closed (nginx's
client_header_timeout, Apache mod_reqtimeout's `header=`).

Over TLS the server sends no TLS 1.3 session tickets unless `server.ssl_session_tickets` asks for them
(`Config`; Python sends 2 by default). websockets' threaded client (`websockets.sync.client`, 17.4; the OpenAI
SDK's synchronous realtime client is one) reads its socket on one thread while it writes its upgrade request
on another, and with tickets up to one connection in 100 waited for the upgrade's answer until its timeout,
against this server and websockets' own alike (none without tickets, over TLS 1.2 or over plain ws://). The
price of none: tickets also carry the server's acknowledgement of the client's last handshake message at
once, so a client that leaves Nagle's algorithm on (no TCP_NODELAY, which browsers, curl, httpx, requests and
websockets set) holds its first request until the server's delayed acknowledgement: a new connection's
GET /health took 44.0 ms against 1.9 ms with tickets (`bench/tls_tickets.py`, which also counts the hangs).
A hang fails a session; 40 ms on a connection's first request does not, so none is the default.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from halkspeech.api.live import cut_live, max_frame_bytes, shut_down_live
from halkspeech.config import ServerSettings

log = logging.getLogger(__name__)

_ANSWER_S = 1.0  # of the shutdown's time, kept for answering the work that could not finish

_TIMEOUT_BODY = b"request headers not complete in time\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools', or h11's where httptools is missing) with a deadline for each
    request's headers. The protocol starts a new request cycle (`self.cycle`) when a header block is complete,
    so the deadline's check is whether the cycle it was armed under is still the current one."""

    header_timeout_s = 30.0  # set per server by `uvicorn_config`, on a subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        # bytes of a kept-alive connection's next request: its headers' deadline starts at the first of them
        # (a deadline still pending from an earlier request is replaced)
        between = self.cycle is None or self.cycle.response_complete
        if between and (self._deadline is None or self._waiting_under is not self.cycle):
            self._disarm()
            self._arm()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # the upgraded connection belongs to the WebSocket protocol (its own ping and idle timeouts) from here
        self._disarm()
        super().handle_websocket_upgrade(*args)

    def _arm(self) -> None:
        self._waiting_under = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is self._waiting_under and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


class Config(uvicorn.Config):
    """uvicorn's configuration; over TLS, its context sends `session_tickets` TLS 1.3 session tickets."""

    def __init__(self, app: Any, *, session_tickets: int = 0, **options: Any) -> None:
        super().__init__(app, **options)
        self.session_tickets = session_tickets

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.num_tickets = self.session_tickets


def uvicorn_config(app: Any, server: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` under `server`'s settings; `options` add to or override it."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": server.header_timeout_s})
    settings: dict[str, Any] = {
        "http": protocol,
        "log_config": None,
        "access_log": False,  # our middleware writes one structured line per request
        "ws_max_size": max_frame_bytes(server),  # a whole /ws turn fits in one frame (uvicorn's default: 16 MiB)
        "ws_per_message_deflate": server.ws_compression,
        "timeout_graceful_shutdown": server.shutdown_timeout_s,  # for the work in flight when asked to stop
        "timeout_keep_alive": server.keep_alive_timeout_s,
        **options,
    }
    if server.ssl_certfile is not None:
        settings |= {"ssl_certfile": str(server.ssl_certfile), "ssl_keyfile": str(server.ssl_keyfile)}
    return Config(app, session_tickets=server.ssl_session_tickets, **settings)


def tls_problem(server: ServerSettings) -> str | None:
    """Why server.ssl_certfile and ssl_keyfile cannot serve TLS (unreadable, not PEM, not a pair), or None."""
    if server.ssl_certfile is None or server.ssl_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
    except ssl.SSLError as exc:  # (an OSError too: first) not PEM, or a key that is not the certificate's
        why = exc.reason or str(exc)
    except OSError as exc:
        why = exc.strerror or str(exc)
    else:
        return None
    return f"cannot serve TLS with certificate {server.ssl_certfile} and key {server.ssl_keyfile}: {why}"


class Server(uvicorn.Server):
    """uvicorn's server with a shutdown that answers everything in flight within server.shutdown_timeout_s.

    uvicorn alone closes every WebSocket at once (1012), losing open turns and finals being computed, and at
    its deadline cancels the requests still running, which answers each with a bare 500 and logs a traceback.
    Here: no new connection is taken; HTTP connections take no further request (idle kept-alive ones close
    now); live sessions end their open turns as if `end` had come and send their finals, then `engine_stopped`
    and close 1001; requests in flight go on. Whatever is still running a second before the deadline is told
    to stop (`AppState.stopping`, `cut_live`): requests answer 503 engine_stopped themselves (an SSE stream
    with an error event), live turns get engine_stopped instead of their final. Then uvicorn's own shutdown
    closes what is left. A second Ctrl-C skips the waiting, as uvicorn's does."""

    grpc: Any = None  # Triton's gRPC API (api/triton_grpc.TritonGrpc), when server.grpc_port is set
    startup_error: str | None = None  # why the server stopped at once (the gRPC port could not be served)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        state = getattr(getattr(self.config.app, "state", None), "halkspeech", None)
        if state is None or state.settings.server.grpc_port is None or self.should_exit:
            return
        port = state.settings.server.grpc_port
        from halkspeech.api import triton_grpc

        try:
            self.grpc = await triton_grpc.start(state, state.settings.server.host, port)
        except (RuntimeError, OSError) as exc:  # no grpc extra, or the port is taken: stop, as for the HTTP port
            self.startup_error = f"cannot serve Triton's gRPC API on port {port}: {exc}"
            log.error("%s", self.startup_error)
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        budget = float(self.config.timeout_graceful_shutdown or 0)
        answer = min(_ANSWER_S, budget / 4)  # the time kept for answering what did not finish
        deadline = loop.time() + budget
        for server in self.servers:
            server.close()
        # gRPC takes no new call; the calls in flight get the same time (answered as HTTP's are, at the end)
        grpc_stopped = asyncio.ensure_future(self.grpc.stop(budget)) if self.grpc is not None else None
        for connection in list(self.server_state.connections):
            if isinstance(connection, HeaderDeadline):  # HTTP; uvicorn's shutdown() of a WebSocket closes it (1012)
                connection.shutdown()
        live = asyncio.ensure_future(shut_down_live(self.config.app))
        if not await self._drained(deadline - answer) and not self.force_exit:
            log.warning(
                "shutdown: %d requests or live sessions still running after %.1f s: answering them now",
                len(self.server_state.tasks),
                budget - answer,
            )
            _answer_now(self.config.app)
            await self._drained(deadline)
        if not live.done():
            live.cancel()
        if grpc_stopped is not None:
            await asyncio.wait([grpc_stopped], timeout=max(0.1, deadline - loop.time()))
        # uvicorn's part: the connections left close, and the lifespan's shutdown closes the engines
        # (what still runs at the deadline uvicorn cancels: errors.UnexpectedErrorMiddleware answers it 503)
        left = max(0.1, deadline - loop.time())  # uvicorn types it int; its asyncio.timeout takes any number
        self.config.timeout_graceful_shutdown = left  # type: ignore[assignment]
        await super().shutdown(sockets)
        if self.force_exit:  # a second signal skips the waiting, not the engines' stop (uvicorn skips both, and
            await self.lifespan.shutdown()  # the lifespan cancelled at exit logged a traceback)
            if self.server_state.tasks:  # requests answered, still cleaning up (their uploads' files)
                await asyncio.wait(list(self.server_state.tasks), timeout=1.0)

    async def _drained(self, until: float) -> bool:
        """Wait until no request or live session is running (True), `until` passes or a second signal came."""
        loop = asyncio.get_running_loop()
        while self._busy() and not self.force_exit and loop.time() < until:
            await asyncio.sleep(0.05)
        return not self._busy()

    def _busy(self) -> bool:
        return bool(self.server_state.tasks) or (self.grpc is not None and self.grpc.busy)


def _answer_now(app: object) -> None:
    """Tell `app`'s requests (AppState.stopping) and live sessions (cut_live) to stop and answer now."""
    state = getattr(getattr(app, "state", None), "halkspeech", None)
    if state is not None:
        state.stopping.set()
    cut_live(app)
