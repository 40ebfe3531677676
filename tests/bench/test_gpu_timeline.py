"""The GPU-timeline summary on a hand-made trace: each idle gap charged to the right cause."""

from halkspeech.bench.gpu_timeline import summarize


def _op(cat: str, name: str, ts: float, dur: float, correlation: int, tid: int = 0) -> dict[str, object]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {"correlation": correlation}}


def test_gaps_are_charged_to_what_the_launching_thread_did() -> None:
    engine = 7
    trace = {
        "traceEvents": [
            # the engine thread: launches A, waits for it until 11, launches B at 12, later D at 45
            _op("cuda_runtime", "cudaLaunchKernel", 0, 1, 1, engine),
            _op("cuda_runtime", "cudaEventSynchronize", 2, 9, 0, engine),
            _op("cuda_runtime", "cudaLaunchKernel", 12, 1, 2, engine),
            _op("cuda_runtime", "cudaLaunchKernel", 5, 1, 3, engine),  # C, long before its gap
            _op("cuda_runtime", "cudaGraphLaunch", 45, 2, 4, engine),
            _op("kernel", "void gemm<float, 128>(float*)", 1, 9, 1),  # A: 1-10
            _op("kernel", "softmax_kernel", 15, 5, 2),  # B: 15-20, 5 µs after the wait (gap 10-15)
            _op("kernel", "layer_norm", 30, 10, 3),  # C: gap 20-30 with C queued since 6
            _op("kernel", "decode_step", 50, 5, 4),  # D: gap 40-50, launched at 45 with no wait before it
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 3, "tid": engine, "args": {}},
        ]
    }
    s = summarize(trace)
    assert s["window_ms"] == 0.054  # 1 µs → 55 µs
    assert s["device_busy_ms"] == 0.029
    assert s["device_idle_ms"] == 0.025
    assert s["idle_ms_by_cause"] == {"queued": 0.01, "host": 0.01, "after_wait": 0.005}
    assert s["gaps_by_size_us"]["<10"] == 1 and s["gaps_by_size_us"]["10-50"] == 2
    assert s["wake_to_launch_us"] == {"count": 1, "p50": 1.0, "p90": 1.0, "p99": 1.0}
    first = {(c["cause"], c["after"], c["next"]) for c in s["idle_by_context"]}
    assert ("after_wait", "gemm", "cudaLaunchKernel → softmax_kernel") in first
    assert ("host", "layer_norm", "cudaGraphLaunch → decode_step") in first
    assert s["device_ms_by_kernel"][0] == {"kernel": "layer_norm", "ms": 0.01}
    widest = s["largest_gaps"][0]  # 20-30 (C queued) and 40-50 (D) tie at 10 µs; the first one found leads
    assert widest["gap_us"] == 10.0 and widest["cause"] == "queued" and widest["launch"] == "cudaLaunchKernel @-15"
    assert [g["gap_us"] for g in s["largest_gaps"]] == [10.0, 10.0, 5.0]
    assert s["largest_gaps"][2]["launching_thread_calls"] == ["cudaEventSynchronize @-8 +9", "cudaLaunchKernel @2 +1"]


def test_overlapping_operations_count_once() -> None:
    trace = {
        "traceEvents": [
            _op("cuda_runtime", "cudaLaunchKernel", 0, 1, 1),
            _op("cuda_runtime", "cudaLaunchKernel", 0, 1, 2),
            _op("kernel", "a", 1, 10, 1),
            _op("gpu_memcpy", "Memcpy DtoH", 5, 10, 2),  # overlaps a on another stream
        ]
    }
    s = summarize(trace)
    assert s["device_busy_ms"] == 0.014 and s["device_idle_ms"] == 0.0 and s["busy_fraction"] == 1.0


def test_a_trace_without_device_work() -> None:
    assert summarize({"traceEvents": []}) == {"device_ops": 0}
