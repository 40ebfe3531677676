"""The event loop's lag (api/loop_lag.py): a loop held by blocking work shows as a late timer, and a served app
exports the series that `bench server` reads."""

from __future__ import annotations

import asyncio
import time

import httpx

from api.conftest import api_settings, live_server, wait_until
from halkspeech.api.loop_lag import watch_loop_lag
from halkspeech.bench import server_bench
from halkspeech.engine.factory import ModelEngine


def test_a_held_loop_shows_as_a_late_timer() -> None:
    lags: list[float] = []

    async def hold_the_loop() -> None:
        watcher = asyncio.create_task(watch_loop_lag(lags.append, 0.01))
        await asyncio.sleep(0.05)
        ticks_before = len(lags)
        time.sleep(0.3)  # blocking work on the loop: the timer due 10 ms in cannot wake before it ends
        await asyncio.sleep(0.05)
        watcher.cancel()
        assert ticks_before >= 1 and len(lags) > ticks_before

    asyncio.run(hold_the_loop())
    assert max(lags) >= 0.29  # woke at least 0.3 s after a timer set at most 10 ms before the hold was due
    assert min(lags) >= 0.0


def test_a_served_app_exports_the_lag_and_the_bench_reads_it(shared_tiny_en: ModelEngine) -> None:
    settings = api_settings(loop_lag_interval_ms=10)
    with live_server(settings, shared_tiny_en, lifespan=True) as server:  # the lifespan starts the watch

        def scrape() -> str:
            return httpx.get(f"{server.url}/metrics", timeout=30).text

        before = scrape()
        assert "# TYPE halkspeech_event_loop_lag_seconds histogram" in before
        wait_until(lambda: server_bench._batch_means(before, scrape()).get("loop_lag_ms") is not None, 30, "ticks")
        means = server_bench._batch_means(before, scrape())
        assert means["loop_lag_ms"] is not None and means["loop_lag_ms"] >= 0
        assert means["loop_late_share"] is not None and 0 <= means["loop_late_share"] <= 1


def test_the_watch_is_off_at_zero(shared_tiny_en: ModelEngine) -> None:
    with live_server(api_settings(loop_lag_interval_ms=0), shared_tiny_en, lifespan=True) as server:
        time.sleep(0.2)
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert server_bench._metric(text, "halkspeech_event_loop_lag_seconds_count") == 0
