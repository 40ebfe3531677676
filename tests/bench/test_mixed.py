"""The mixed benchmark's summary of repeated runs: each mode by its median run, ratios from those runs."""

from __future__ import annotations

from typing import Any

import pytest

from halkspeech.bench.mixed import median_runs


def runs_of(mode: str, *windows_per_s: float) -> list[dict[str, Any]]:
    return [{"batching": mode, "windows_per_s": w, "p95_s": 10 / w, "repeat": i} for i, w in enumerate(windows_per_s)]


def test_each_mode_is_its_median_run_and_ratios_come_from_those() -> None:
    rows = median_runs(
        {
            "continuous": runs_of("continuous", 150.0, 132.0, 141.0),
            "static-padded": runs_of("static-padded", 119.0, 125.0, 110.0),
        }
    )
    by_mode = {r["batching"]: r for r in rows}
    continuous, padded = by_mode["continuous"], by_mode["static-padded"]
    # the middle run, whole: its other figures belong to the same run
    assert (continuous["windows_per_s"], continuous["repeat"], continuous["p95_s"]) == (141.0, 2, 10 / 141.0)
    assert (padded["windows_per_s"], padded["repeat"]) == (119.0, 0)
    assert continuous["vs_padded"] == pytest.approx(141.0 / 119.0)
    assert "vs_padded" not in padded and "vs_static" not in continuous  # no static run to compare with
    assert continuous["runs"] == 3 and continuous["windows_per_s_runs"] == [150.0, 132.0, 141.0]
    assert continuous["spread"] == "132.0-150.0" and len(continuous["all_runs"]) == 3


def test_an_even_count_takes_the_lower_middle_and_one_run_is_itself() -> None:
    rows = median_runs({"continuous": runs_of("continuous", 4.0, 1.0, 3.0, 2.0), "static": runs_of("static", 2.0)})
    continuous, static = rows
    assert continuous["windows_per_s"] == 2.0 and continuous["vs_static"] == 1.0
    assert static["runs"] == 1 and "spread" not in static and "all_runs" not in static


def test_each_rate_is_compared_with_the_static_runs_at_that_rate() -> None:
    def at(rate: float, mode: str, windows_per_s: float) -> list[dict[str, Any]]:
        return [{**run, "rate": rate} for run in runs_of(mode, windows_per_s)]

    rows = median_runs(
        {
            (0.0, "continuous"): at(0.0, "continuous", 150.0),
            (0.0, "static-padded"): at(0.0, "static-padded", 120.0),
            (140.0, "continuous"): at(140.0, "continuous", 132.0),
            (140.0, "static-padded"): at(140.0, "static-padded", 110.0),
            (200.0, "continuous"): at(200.0, "continuous", 151.0),  # no static run at this rate
        }
    )
    ratios = {r["rate"]: r.get("vs_padded") for r in rows if r["batching"] == "continuous"}
    assert ratios == {0.0: pytest.approx(150 / 120), 140.0: pytest.approx(132 / 110), 200.0: None}
