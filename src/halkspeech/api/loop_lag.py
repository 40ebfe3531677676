"""How late the event loop runs what is due: a timer asks to wake every `interval_s` and notes how much later
than asked it did (`halkspeech_event_loop_lag_seconds`).

Every HTTP request and live connection of the process shares the one loop, so anything that holds it (Python
work too big for it, a call that waits for a lock or the GPU) delays all of them at once, and shows in no other
series directly: requests only seem slow. Session 38's GPU lease measured such a case, a log-mel launched from
the loop (since reverted): requests spent ~0.9 s outside their routes and p95 latency reached 7.7 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float) -> None:
    """Report each timer's lateness in seconds to `observe` (a histogram's), until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
