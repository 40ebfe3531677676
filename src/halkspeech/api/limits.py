"""Admission: at most `max_concurrent` transcriptions run, at most `max_queue` wait for a turn, and past that a
request is refused at once (Overloaded → 429 with Retry-After), never left hanging.

Waiters are served first come, first served (asyncio.Semaphore's FIFO). A waiter that is cancelled (its client
went away, its timeout passed) leaves the queue and takes nothing with it.

Retry-After says when a queue place is likely to free: at capacity one frees each time a request ends, about
every (mean time a request holds its slot) / max_concurrent seconds. So 256 slots of 2 s requests ask for the
1 s floor, and two slots held by 12-minute files for about a minute, not a retry every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from halkspeech.api.errors import error_response
from halkspeech.errors import Overloaded

MAX_RETRY_AFTER_S = 60  # what OpenAI's SDKs honour; a longer estimate is too unsure to ask clients to wait for
HELD_WEIGHT = 0.2  # of each ended request in the moving mean: the last ~5 requests count most


class AdmissionGate:
    """A concurrency limit with a bounded wait queue, for one event loop."""

    def __init__(
        self,
        max_concurrent: int,
        max_queue: int,
        *,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be at least 1 and max_queue not negative")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s  # the least a 429 asks for
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrent)
        self.active = 0  # requests holding a slot
        self.waiting = 0  # requests queued for one
        self.rejected = 0  # refused since start
        self._held_s: float | None = None  # moving mean of the seconds a request held its slot (None: none yet)

    def retry_after(self) -> int:
        """Whole seconds until a queue place likely frees (module docstring): at least retry_after_s, at most
        MAX_RETRY_AFTER_S; retry_after_s until a request has ended."""
        expected = 0.0 if self._held_s is None else self._held_s / self.max_concurrent
        return max(1, math.ceil(min(max(expected, self.retry_after_s), MAX_RETRY_AFTER_S)))

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a slot for the block; raises Overloaded at once when every slot and queue place is taken."""
        if self.active >= self.max_concurrent and self.waiting >= self.max_queue:
            self.rejected += 1
            wait = self.retry_after()
            raise Overloaded(
                f"the server is at capacity ({self.active} requests running, {self.waiting} waiting); "
                f"retry after {wait} s",
                retry_after=wait,
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        started = self._clock()
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            held = self._clock() - started
            self._held_s = held if self._held_s is None else self._held_s + HELD_WEIGHT * (held - self._held_s)


def keep_uploads_in_memory(max_bytes: int) -> None:
    """Parse uploads of up to `max_bytes` into memory (Starlette's MultiPartParser.spool_max_size: 1 MiB by
    default, process-wide, the only hook FastAPI's form parsing leaves). Past it Starlette spills the file to
    disk and writes every further chunk of the body, and reads the file back, through its thread pool: a hop
    to a worker thread and back each time, which under load waits for a thread and then for the GIL. On this
    repo's CPU machine (`bench/http_host.py --clip-s 60`: 256 clients posting 60 s WAVs, 1.9 MB) that gave
    87-94 requests/s with 1 MiB against 128-144 with 4 MB, and ~1 s more per request."""
    MultiPartParser.spool_max_size = max_bytes


class BodyLimitMiddleware:
    """Refuses request bodies over `max_upload_mb` (plus `overhead` bytes: the multipart framing around the
    file) with 413 payload_too_large: at once when Content-Length says so, else as soon as the streamed body
    passes the limit (chunked uploads), before the rest is read or stored. The message names the configured
    limit, not the overhead's sum. A body that stalls, no bytes for `idle_timeout_s`, is refused with 408, and
    so is one still arriving `idle_timeout_s` + received / `min_rate` seconds after it began (a trickle that
    never stalls; min_rate 0: no such limit)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_upload_mb: float,
        overhead: int = 0,
        idle_timeout_s: float = 60.0,
        min_rate: float = 0.0,
    ) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 1e6) + overhead
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate

    def _message(self) -> str:
        return f"the request body is larger than the upload limit of {self.max_upload_mb:g} MB"

    def _too_slow(self, received: int, seconds: float) -> str:
        return (
            f"the request body arrived too slowly: {received} bytes in {seconds:.0f} s (after the first "
            f"{self.idle_timeout_s:g} s, at least {self.min_rate:g} bytes a second)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(Request(scope), 413, self._message(), code="payload_too_large")
            await response(scope, receive, send)
            return
        received = 0
        body_done = False
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def limited() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() waits for the client to leave: no time limit on that
                return await receive()
            now = loop.time()
            earned = received / self.min_rate if self.min_rate else float("inf")  # seconds the bytes so far bought
            left = started + self.idle_timeout_s + earned - now
            try:
                async with asyncio.timeout(min(self.idle_timeout_s, left)):
                    message = await receive()
            except TimeoutError:
                # raised into the body parser, as the 413 below; nothing was accepted yet, so nothing is lost
                if left <= self.idle_timeout_s:
                    raise HTTPException(408, self._too_slow(received, loop.time() - started)) from None
                stalled = f"the request body stalled: no data for {self.idle_timeout_s:g} s"
                raise HTTPException(408, stalled) from None
            if message["type"] == "http.disconnect":
                # the client left mid-upload: 499 as for one that leaves mid-transcription (not the body
                # parser's 400 for a truncated form), so metrics and logs do not count it as a bad request
                raise HTTPException(499, "the client disconnected during the upload")
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Starlette's HTTPException: FastAPI re-raises it from body parsing, so it answers 413
                    # (api/errors.py gives it the code payload_too_large, as the Content-Length refusal has)
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
