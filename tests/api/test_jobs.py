"""api/jobs.py: a request's audio decodes in a worker thread that ends with the request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import halkspeech.api.jobs as jobs
from conftest import long_opus
from halkspeech.errors import Cancelled


def test_a_cancelled_decode_stops_its_thread_before_the_task_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves (or a request timeout) cancels the job; the thread decoding its audio cannot be
    cancelled, and kept decoding, holding a core and memory outside the admission limit (hours of Opus went on
    for minutes after the 499). Now it is told to stop and waited for."""
    data = long_opus(tmp_path / "ten_minutes.ogg", 600).read_bytes()  # ~3 s to decode here
    decode_upload = jobs.decode_upload
    ended: list[tuple[float, BaseException | None]] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        try:
            return decode_upload(*args, **kwargs)
        except BaseException as exc:
            ended.append((time.perf_counter(), exc))
            raise
        finally:
            if not ended:
                ended.append((time.perf_counter(), None))

    monkeypatch.setattr(jobs, "decode_upload", recorded)

    async def main() -> float:
        task = asyncio.ensure_future(jobs.decode_in_thread(data, 4 * 3600))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter()

    task_ended = asyncio.run(main())
    assert len(ended) == 1
    thread_ended, error = ended[0]
    assert isinstance(error, Cancelled) and thread_ended <= task_ended
