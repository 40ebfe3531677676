"""How uvicorn serves the app: its options in one place (`uvicorn_config`, used by `halkspeech serve` and the
tests' live server), its HTTP protocol with a deadline for each request's headers (`HeaderDeadline`), and a
shutdown that lets live WebSocket turns finish (`Server`).

uvicorn times nothing out before a request's headers are complete: a connection that sends nothing, or sends
its headers a byte at a time (slowloris), holds a socket forever, and a few thousand of them exhaust the
process's file descriptors. Its keep-alive timeout starts only after a response, and the body limits
(limits.BodyLimitMiddleware) only once the app has the request. Here a request's header block must be
complete within `server.header_timeout_s` of the connection opening, or of the request's first byte on a
kept-alive connection; otherwise the client gets a 408 and the connection is closed (nginx's
client_header_timeout, Apache mod_reqtimeout's `header=`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from halkspeech.api.routes.ws import max_frame_bytes, shut_down_live
from halkspeech.config import ServerSettings

log = logging.getLogger(__name__)

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


def uvicorn_config(app: Any, server: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` under `server`'s settings; `options` add to or override it."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": server.header_timeout_s})
    settings: dict[str, Any] = {
        "http": protocol,
        "log_config": None,
        "access_log": False,  # our middleware writes one structured line per request
        "ws_max_size": max_frame_bytes(server),  # a whole /ws turn fits in one frame (uvicorn's default: 16 MiB)
        "timeout_graceful_shutdown": 10,  # for requests and live turns in progress when asked to stop
        **options,
    }
    return uvicorn.Config(app, **settings)


class Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown first winds down live WebSocket sessions: uvicorn alone closes
    every WebSocket at once (1012), so an open turn and the finals still being computed were lost. Now no
    new connection is accepted, each session's open turn ends as if `end` had come, its finals go out, then
    `engine_stopped` and close 1001; within timeout_graceful_shutdown, then uvicorn's own shutdown."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new connections while live turns finish (uvicorn closes them again)
            server.close()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                await shut_down_live(self.config.app)
        except TimeoutError:
            log.warning("live turns still running after %s s of shutdown: cut", self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets)
