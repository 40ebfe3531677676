"""The server's shutdown telling requests it can wait no longer (api/server.py sets it a second before its end).

Requests that watch it (jobs.until_disconnect, sse) answer 503 engine_stopped themselves; any other request
uvicorn then cancels is answered the same by errors.UnexpectedErrorMiddleware, instead of a bare 500.
"""

from __future__ import annotations

import asyncio

STOPPED = "the server is shutting down and this request could not finish in time; send it again"


class StopSignal:
    """Set once, when the server's shutdown has no more time for the work still in flight. Not tied to one
    event loop: each waiter is a future of its own loop."""

    def __init__(self) -> None:
        self.is_set = False
        self._waiters: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        self.is_set = True
        for waiter in list(self._waiters):
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait(self) -> None:
        if self.is_set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
