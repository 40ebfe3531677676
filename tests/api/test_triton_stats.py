"""Triton's statistics, as api/triton_stats.py keeps them: a request's phases, its failure, the report's form.
(Served over HTTP and gRPC in test_triton.py.)"""

from __future__ import annotations

import asyncio

import pytest

from halkspeech.api.triton_stats import TritonStats


def test_a_success_adds_its_phases_and_the_admission_wait_moves_from_infer_to_queue() -> None:
    stats = TritonStats()
    with stats.measure("whisper") as clock:
        clock.input_read(3)
        clock.inferred(queue_s=3600.0)  # more than the whole lap: capped at it, so no phase is negative
        clock.output_written()
    [entry] = stats.report(["whisper"])
    inference = entry["inference_stats"]
    assert inference["success"]["count"] == 1 and inference["fail"] == {"count": 0, "ns": 0}
    assert inference["compute_infer"] == {"count": 1, "ns": 0} and inference["queue"]["ns"] >= 0
    parts = sum(inference[p]["ns"] for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= inference["success"]["ns"]
    assert (entry["inference_count"], entry["execution_count"]) == (3, 1)
    assert [b["batch_size"] for b in entry["batch_stats"]] == [3] and entry["last_inference"] > 0


def test_a_request_is_in_flight_from_its_start_to_its_end_whatever_the_end() -> None:
    stats = TritonStats()
    with stats.measure("whisper"):
        assert stats.in_flight() == {"whisper": 1}
        with stats.measure("whisper"):
            assert stats.in_flight() == {"whisper": 2}
    with pytest.raises(ValueError), stats.measure("whisper"):
        assert stats.in_flight() == {"whisper": 1}
        raise ValueError("a bad tensor")
    assert stats.in_flight() == {"whisper": 0}


def test_a_request_that_raises_or_is_cancelled_is_a_failure_and_goes_on_raising() -> None:
    stats = TritonStats()
    with pytest.raises(ValueError), stats.measure("whisper") as clock:
        clock.input_read(1)
        raise ValueError("a bad tensor")
    with pytest.raises(asyncio.CancelledError), stats.measure("whisper"):
        raise asyncio.CancelledError  # the client went away
    [entry] = stats.report(["whisper"])
    inference = entry["inference_stats"]
    assert inference["fail"]["count"] == 2 and inference["success"]["count"] == 0
    assert inference["compute_input"]["count"] == 0  # a failure's phases are not a success's
    assert entry["inference_count"] == entry["execution_count"] == 0 and entry["batch_stats"] == []


def test_the_report_gives_each_name_asked_for_sorted_with_zeros_for_one_never_called() -> None:
    stats = TritonStats()
    with stats.measure("whisper_bls") as clock:
        clock.input_read(1)
        clock.inferred(0.0)
        clock.output_written()
    assert stats.names() == {"whisper_bls"}
    report = stats.report(["whisper_bls", "infer_bls"])
    assert [e["name"] for e in report] == ["infer_bls", "whisper_bls"]
    assert report[0]["execution_count"] == 0 and report[0]["last_inference"] == 0 and report[0]["version"] == "1"
    assert set(report[0]["inference_stats"]) == {
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"
    }  # fmt: skip
