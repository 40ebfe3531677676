"""Server-sent events for `stream=true`: a `transcript.text.delta` per segment as soon as it is final, then one
closing event (`transcript.text.done`, as OpenAI sends them: `data: {"type": ..., ...}` lines).

Everything that can fail before decoding starts (admission, model, audio) fails as a normal HTTP error; a
failure after the stream started is an `error` event, and so is the server's shutdown running out of time for
it (engine_stopped). However the stream ends (done, client gone, server stopping) the transcription is
cancelled if it is still going.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from halkspeech.api.deps import AppState
from halkspeech.api.errors import error_fields, status_for
from halkspeech.api.jobs import Job, Outcome, cancel, run_job, until_disconnect
from halkspeech.api.stopping import STOPPED, StopSignal
from halkspeech.errors import Cancelled, EngineStopped, HalkSpeechError

log = logging.getLogger(__name__)

Event = dict[str, Any]
FinalEvent = Callable[[Outcome], Event]


async def stream(request: Request, state: AppState, job: Job, final: FinalEvent) -> StreamingResponse:
    """Start the job; answer with its event stream once decoding starts, or with its error if it failed first."""
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(run_job(state, job, on_segment=lambda s: deltas.put_nowait(s.text), ready=ready))
    try:
        await until_disconnect(request.receive, _first_done(ready, task), state.stopping)
    except BaseException:
        await cancel(task)
        raise
    if not ready.done():  # the job ended before decoding started, so with an error: raise it
        return EventStream(_single(final(task.result())), cleanup=lambda: cancel(task))
    task.add_done_callback(lambda _: deltas.put_nowait(None))  # after the last delta
    stopper = asyncio.ensure_future(_cancel_when(state.stopping, task))  # the shutdown cannot wait: an error event
    task.add_done_callback(lambda _: stopper.cancel())
    return EventStream(_events(task, deltas, final, state.stopping), cleanup=lambda: cancel(task))


async def _first_done(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


async def _cancel_when(stop: StopSignal, task: asyncio.Future[Any]) -> None:
    await stop.wait()
    task.cancel()


async def _single(event: Event) -> AsyncGenerator[Event, None]:
    yield event


async def _events(
    task: asyncio.Future[Outcome], deltas: asyncio.Queue[str | None], final: FinalEvent, stop: StopSignal
) -> AsyncGenerator[Event, None]:
    first = True
    while (text := await deltas.get()) is not None:
        if first:  # the concatenated deltas equal the final (stripped) text
            text = text.lstrip()
        if text:
            first = False
            yield {"type": "transcript.text.delta", "delta": text}
    try:
        outcome = task.result()
    except asyncio.CancelledError:
        if stop.is_set:  # cut by the server's shutdown (a client that left hears nothing anyway)
            yield {"type": "error", "error": error_fields(503, STOPPED, EngineStopped.code, None)}
        return
    except HalkSpeechError as exc:  # the body of the error response it would have been (api/errors.py)
        yield {"type": "error", "error": error_fields(status_for(exc), str(exc), exc.code, exc.param)}
        return
    except Exception:
        log.exception("streamed transcription failed")
        yield {"type": "error", "error": error_fields(500, "internal server error", "internal_error", None)}
        return
    yield final(outcome)


class EventStream(StreamingResponse):
    """text/event-stream of JSON events; `cleanup` runs however the stream ends."""

    def __init__(self, events: AsyncGenerator[Event, None], *, cleanup: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._cleanup = cleanup
        self._lines = self._encoded()
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the deltas
        super().__init__(self._lines, media_type="text/event-stream", headers=headers)

    async def _encoded(self) -> AsyncGenerator[bytes, None]:
        async for event in self._events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._pump(send))
        except Cancelled:
            pass  # the client went away mid-stream: nobody to tell
        finally:
            await self._lines.aclose()
            await self._events.aclose()
            await self._cleanup()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._lines:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
