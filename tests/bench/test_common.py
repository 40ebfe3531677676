"""bench/common.py: the statistics every benchmark and load tester reports."""

from __future__ import annotations

import pytest

from halkspeech.bench.common import percentile


@pytest.mark.parametrize(
    ("n", "q", "expected"),
    [
        (2, 50, 1),
        (10, 50, 5),
        (10, 90, 9),
        (10, 95, 10),
        (100, 95, 95),
        (100, 99, 99),
        (100, 99.5, 100),
        (1000, 99.9, 999),
        (3, 50, 2),
        (1, 95, 1),
        (7, 0, 1),
        (7, 100, 7),
    ],
)
def test_percentile_is_the_nearest_rank(n: int, q: float, expected: int) -> None:
    """Of 1..n, the q-th percentile is ceil(q n / 100). Rounding q n / 100 + 0.5 to even gave one rank too
    high whenever q n / 100 was an odd whole number: the p50 of two latencies was the larger, p99 of 100 the
    maximum."""
    values = list(range(n, 0, -1))  # unsorted on purpose
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert percentile([], 50) != percentile([], 50)
