"""Where a serving GPU sits idle, for the benchmarks only (not imported by the server).

`python -m halkspeech.bench.gpu_timeline --seconds S --json PATH [halkspeech CLI args...]` runs the CLI (e.g.
`serve ...`); SIGUSR1 then records the next S seconds of the process's CUDA activity with PyTorch's profiler
(CUPTI: every kernel and copy on the device, and every CUDA runtime call with the thread that made it) and
writes `summarize(trace)` to PATH.

The summary answers one question: when the device had nothing to run, who was it waiting for? Each idle gap
between device operations is charged to the call that launched the operation after it:
- `after_wait`: its launching thread sat in a synchronising call (an event or stream wait, a copy to the host)
  that returned during the gap: the host read a result and then took this long to queue the next work;
- `host`: its launching thread was elsewhere (Python bookkeeping, waiting for the GIL, launching other work);
- `queued`: it had been launched before the gap began: the device waited on a dependency (another stream).
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from halkspeech.cli.argtypes import finite_float

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
GAP_BUCKETS_US = (10, 50, 200, 1000, 5000)


def _is_wait(name: str) -> bool:
    """A runtime call that blocks the calling thread until the device has done some work."""
    return "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2", "cudaMemcpy2D")


def _short(name: str) -> str:
    """A kernel's name without its template arguments and parameter list, at most 60 characters."""
    for stop in ("<", "("):
        name = name.split(stop, 1)[0]
    return name.removeprefix("void ")[:60]


def summarize(trace: dict[str, Any], top: int = 15, top_gaps: int = 8) -> dict[str, Any]:
    """Idle time of the device in a Chrome trace from torch.profiler, charged as the module docstring says."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: float(e["ts"]))
    runtime = sorted((e for e in events if e.get("cat") in RUNTIME_CATEGORIES), key=lambda e: float(e["ts"]))
    if not device:
        return {"device_ops": 0}
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    waits_by_thread: dict[Any, list[tuple[float, float, str]]] = defaultdict(list)
    for e in runtime:
        if _is_wait(e["name"]):
            waits_by_thread[e["tid"]].append((float(e["ts"]) + float(e["dur"]), float(e["ts"]), e["name"]))
    for waits in waits_by_thread.values():
        waits.sort()

    begin, end = float(device[0]["ts"]), float(device[0]["ts"]) + float(device[0]["dur"])
    busy, idle = 0.0, 0.0
    span_start, span_end = begin, end
    last = device[0]
    histogram: Counter[str] = Counter()
    charged: defaultdict[str, float] = defaultdict(float)
    contexts: defaultdict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    wake_latency: list[float] = []
    gaps: list[tuple[float, float, dict[str, Any], dict[str, Any], str]] = []  # (gap, start, before, after, cause)
    for e in device[1:]:
        ts, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if ts > span_end:  # a gap: nothing ran on the device from span_end to ts
            gap = ts - span_end
            busy += span_end - span_start
            idle += gap
            histogram[_bucket(gap)] += 1
            kind, launcher = _charge(e, span_end, launches, waits_by_thread, wake_latency)
            charged[kind] += gap
            gaps.append((gap, span_end, last, e, kind))
            key = (kind, _short(last["name"]), f"{launcher} → {_short(e['name'])}")
            contexts[key][0] += gap
            contexts[key][1] += 1
            span_start = ts
        if stop > span_end:
            span_end, last = stop, e
        end = max(end, stop)
    busy += span_end - span_start
    window = end - begin
    kernels: defaultdict[str, float] = defaultdict(float)
    for e in device:
        kernels[_short(e["name"])] += float(e["dur"])
    calls: Counter[tuple[Any, str]] = Counter()
    call_time: defaultdict[tuple[Any, str], float] = defaultdict(float)
    for e in runtime:
        calls[(e["tid"], e["name"])] += 1
        call_time[(e["tid"], e["name"])] += float(e["dur"])
    ms = 1e-3
    return {
        "window_ms": round(window * ms, 3),
        "device_busy_ms": round(busy * ms, 3),
        "device_idle_ms": round(idle * ms, 3),
        "busy_fraction": round(busy / window, 4) if window else None,
        "device_ops": len(device),
        "gaps_by_size_us": {b: histogram[b] for b in _bucket_names()},
        "idle_ms_by_cause": {k: round(v * ms, 3) for k, v in sorted(charged.items(), key=lambda kv: -kv[1])},
        "wake_to_launch_us": _percentiles(wake_latency),
        "idle_by_context": [
            {"cause": k[0], "after": k[1], "next": k[2], "idle_ms": round(v[0] * ms, 3), "gaps": int(v[1])}
            for k, v in sorted(contexts.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "largest_gaps": [_describe(g, launches, runtime) for g in heapq.nlargest(top_gaps, gaps, key=lambda g: g[0])],
        "device_ms_by_kernel": [{"kernel": k, "ms": round(v * ms, 3)} for k, v in _largest(kernels, top)],
        "host_calls": [
            {"thread": str(k[0]), "call": k[1], "count": calls[k], "ms": round(v * ms, 3)}
            for k, v in _largest(call_time, top)
        ],
    }


def _describe(
    gap: tuple[float, float, dict[str, Any], dict[str, Any], str],
    launches: dict[Any, dict[str, Any]],
    runtime: list[dict[str, Any]],
) -> dict[str, Any]:
    """One idle gap in detail: the device operations around it, and the runtime calls made during it (the
    launching thread's in order, with start and length in µs from the gap's start; other threads' counted).
    `runtime` is sorted by start."""
    length, start, before, after, cause = gap
    launch = launches.get(after.get("args", {}).get("correlation"))
    thread = launch["tid"] if launch else None
    mine, others = [], Counter[str]()
    for e in runtime:
        begin, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if end < start - 1 or begin > start + length:
            continue
        if e["tid"] == thread:
            mine.append(f"{e['name']} @{begin - start:.0f} +{end - begin:.0f}")
        else:
            others[f"{e['tid']}: {e['name']}"] += 1
    return {
        "gap_us": round(length, 1),
        "cause": cause,
        "before": _short(before["name"]),
        "after": _short(after["name"]),
        "launch": f"{launch['name']} @{float(launch['ts']) - start:.0f}" if launch else None,
        "launching_thread_calls": mine[:24],
        "other_threads_calls": dict(others.most_common(8)),
    }


def _largest(totals: dict[Any, float], n: int) -> list[tuple[Any, float]]:
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


def _charge(
    e: dict[str, Any],
    gap_start: float,
    launches: dict[Any, dict[str, Any]],
    waits_by_thread: dict[Any, list[tuple[float, float, str]]],
    wake_latency: list[float],
) -> tuple[str, str]:
    """(cause, launching call) of the gap before device op `e`; see the module docstring."""
    launch = launches.get(e.get("args", {}).get("correlation"))
    if launch is None:
        return "unknown", "?"
    launched = float(launch["ts"])
    if launched + float(launch["dur"]) <= gap_start:
        return "queued", launch["name"]
    waits = waits_by_thread.get(launch["tid"], [])
    i = bisect.bisect_right(waits, (launched, float("inf"), ""))  # the last wait that ended before the launch
    if i and waits[i - 1][0] >= gap_start:
        wake_latency.append(launched - waits[i - 1][0])
        return "after_wait", launch["name"]
    return "host", launch["name"]


def _bucket(gap_us: float) -> str:
    for edge, name in zip(GAP_BUCKETS_US, _bucket_names(), strict=False):
        if gap_us < edge:
            return name
    return _bucket_names()[-1]


def _bucket_names() -> list[str]:
    edges = GAP_BUCKETS_US
    return [f"<{edges[0]}", *(f"{a}-{b}" for a, b in itertools.pairwise(edges)), f">={edges[-1]}"]


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 1)  # noqa: E731
    return {"count": len(values), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def _record(seconds: float, json_path: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time.sleep(seconds)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        summary = summarize(json.loads(path.read_text()))
    summary["seconds"] = seconds
    partial = json_path.with_name(json_path.name + ".part")  # renamed when whole: a reader never sees half of it
    partial.write_text(json.dumps(summary, indent=1))
    os.replace(partial, json_path)
    print(f"gpu_timeline: wrote {json_path}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=finite_float, default=2.0, help="how long to record after SIGUSR1")
    parser.add_argument("--json", type=Path, required=True, help="where to write the summary")
    args, rest = parser.parse_known_args(argv)

    def start(*_: object) -> None:
        threading.Thread(target=_record, args=(args.seconds, args.json), daemon=True).start()

    signal.signal(signal.SIGUSR1, start)
    from halkspeech.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
