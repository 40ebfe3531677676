"""Experiment: where turbo's mixed-workload run spends the GPU's time, continuous against padded static batching.

The engine's phase timers are host clocks that include the device work each phase waited for, so they cannot
say whether continuous batching's ~0.95 s on top of the encoder's 2.3 s (H200, bench/NOTES.md) is decode
steps, admissions, or an idle GPU waiting for the engine thread. This runs one timed run of each mode under
torch.profiler with the runner's and engine's calls annotated, and from the trace reports:
  - the GPU's busy time (the union of every kernel and copy) and its idle time, the idle time split by what
    the engine thread was doing when the gap began (waiting for a step, planning, launching, ...);
  - the device time of the kernels each annotated call launched (encoder runs, admissions, steps), per call.
Then, unprofiled and alternating over ROUNDS rounds, variants of continuous batching against padded static (the
last call's set; earlier sets are in bench/NOTES.md): the engine as it is, and with decode-step batch buckets of
40 and 56 added to 48 and 64 (a step runs its bucket's rows, live or not; steps over 16 rows read every row's
cross-attention keys and values); inline and ahead; and encoding ahead in runs of 8 and 4 windows instead of 16
(shorter encoder kernels on the side stream, so that a decode step waits less for SMs they hold; the encoder's
cost a window was flat from 8 to 64 windows on the H100, NOTES). Other variant keys: `steps_ahead` (steps launched ahead of
the one read, patched in here; the engine's is 1), and any EngineSettings field.

Run: PYTHONPATH=src python bench/gpu_mixed_timeline.py OUT.json [ROUNDS, 2] [--cpu: tiny.en, 24 requests, a
smoke test of the script itself]
Run twice in session 13 (H200; bench/results/timeline_h200_s13.json, _b.json) with the variants of then (admit_batch,
steps_ahead, decoding_encoder_batch); the per-call attribution (launch time and thread were swapped, so every
kernel fell to "loop") is fixed here, and it and the bucket variants have not run yet.
"""

from __future__ import annotations

import bisect
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from halkspeech.bench import mixed
from halkspeech.bench.common import device_info
from halkspeech.bench.engine_bench import _features
from halkspeech.config import EngineSettings
from halkspeech.engine import factory
from halkspeech.engine import runner as runner_module
from halkspeech.engine.cuda_graphs import GraphCache
from halkspeech.engine.engine import Engine, EngineStats
from halkspeech.engine.factory import start_engine
from halkspeech.engine.runner import Runner
from halkspeech.engine.scheduler import Scheduler
from halkspeech.engine.transfer import HostCopies
from halkspeech.model.weights import random_weights

args = [a for a in sys.argv[1:] if not a.startswith("--")]
OUT = args[0]
ROUNDS = int(args[1]) if len(args) > 1 else 2
CPU = "--cpu" in sys.argv
MODEL = "tiny.en" if CPU else "large-v3-turbo"
DEVICE = "cpu" if CPU else "cuda"
cfg = mixed.MixedConfig(
    models=(MODEL,), requests=24 if CPU else 512, device=DEVICE, dtype="float32" if CPU else "float16"
)
results: dict[str, Any] = {"device": device_info(torch.device(DEVICE)), "model": MODEL, "profiled": [], "rows": []}


SPANS: list[tuple[int, int, str, int, int]] = []  # (begin ns, end ns, label, native id, pthread id) of calls
RECORDING = [False]


def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """`fn`, its calls timed on the host clock while RECORDING. (torch.profiler's record_function records only
    the thread that started the profiler, not the engine's, even with profile_all_threads.)"""

    def wrapper(*a: Any, **k: Any) -> Any:
        if not RECORDING[0]:
            return fn(*a, **k)
        began = time.perf_counter_ns()
        try:
            return fn(*a, **k)
        finally:
            SPANS.append((began, time.perf_counter_ns(), label, threading.get_native_id(), threading.get_ident()))

    return wrapper


def annotate(cls: type, name: str, label: str) -> None:
    setattr(cls, name, timed(getattr(cls, name), label))


def calibration_marks() -> list[int]:
    """perf_counter_ns at 20 record_functions on this thread, named hs:calib<i>: the trace's timestamp of each,
    minus these, is the offset between the two clocks (`analyse` takes the median)."""
    marks = []
    for i in range(20):
        began = time.perf_counter_ns()
        with record_function(f"hs:calib{i}"):
            pass
        marks.append(began)
    return marks


# what the engine thread does: launches (their kernels are attributed to them), waits, host bookkeeping
annotate(Runner, "encode_async", "hs:encode")
annotate(Runner, "launch_admit", "hs:admit")
annotate(Runner, "launch_step", "hs:step")
annotate(Runner, "release", "hs:release")
annotate(Engine, "_record", "hs:wait_step")
annotate(Engine, "_record_admission", "hs:wait_admit")
annotate(Engine, "_collect_encoded", "hs:collect_encoded")
annotate(Scheduler, "schedule_decode", "hs:plan")
annotate(Scheduler, "schedule_admission", "hs:plan_admit")
annotate(Scheduler, "schedule_encode", "hs:plan_encode")
# inside an admission's launch
annotate(Runner, "_launch_admit_padded", "hs:admit_padded")
annotate(Runner, "_first_tokens", "hs:admit_first_tokens")
annotate(GraphCache, "run", "hs:graph_replay")
annotate(HostCopies, "queue", "hs:to_host")
annotate(Runner, "_prefill", "hs:admit_eager_prefill")
runner_module.to_device = timed(runner_module.to_device, "hs:to_device")
BUCKETS = factory.BATCH_BUCKETS  # decode-step batch buckets; a variant adds some (`extra_buckets`)
STEPS_AHEAD = [1]  # steps the engine keeps launched ahead of the one it reads (the engine's is 1)
_record_in_flight = Engine._record_in_flight


def _record_ahead(self: Engine, keep: int) -> Any:
    return _record_in_flight(self, keep=keep * STEPS_AHEAD[0])


Engine._record_in_flight = _record_ahead  # type: ignore[method-assign]


PHASES = ("hs:encode", "hs:admit", "hs:step", "hs:release")  # a kernel counts for the engine call launching it


def largest(values: dict[str, float], n: int | None = None) -> dict[str, float]:
    """`values` largest first (the first `n`), rounded for the JSON."""
    return {k: round(v, 4) for k, v in sorted(values.items(), key=lambda kv: -kv[1])[:n]}


def analyse(path: str, marks: list[int], spans_list: list[tuple[int, int, str, int, int]]) -> dict[str, Any]:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    calib = {e["name"]: e["ts"] for e in events if str(e.get("name", "")).startswith("hs:calib")}
    offsets = sorted(calib[f"hs:calib{i}"] - m / 1000 for i, m in enumerate(marks) if f"hs:calib{i}" in calib)
    if not offsets:
        return {"error": "no calibration marks in the trace"}
    offset = offsets[len(offsets) // 2]
    offset_spread_us = offsets[-1] - offsets[0]
    device_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {
        e["args"]["correlation"]: (e["ts"], e["tid"])
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    spans: dict[Any, list[tuple[float, float, str]]] = defaultdict(list)  # thread → annotated calls
    for began, ended, label, native, ident in spans_list:  # under both ids: CPU ops and CUDA calls differ
        for tid in {native, ident, ident & 0xFFFFFFFF}:
            spans[tid].append((began / 1000 + offset, ended / 1000 + offset, label))
    for calls in spans.values():
        calls.sort()
    starts = {tid: [c[0] for c in calls] for tid, calls in spans.items()}

    def label_at(tid: Any, ts: float, among: tuple[str, ...] = ()) -> str:
        """The innermost annotated call of thread `tid` running at `ts` (the latest begun that has not ended),
        or, given `among`, the innermost of those labels, if one runs."""
        calls = spans.get(tid, [])
        i = bisect.bisect_right(starts.get(tid, []), ts)
        running = [calls[j][2] for j in range(i - 1, max(-1, i - 64), -1) if calls[j][0] <= ts <= calls[j][1]]
        return next((label for label in running if label in among), running[0] if running else "loop")

    engine_tid = max(spans, key=lambda t: sum(1 for c in spans[t] if c[2] == "hs:step"), default=None)
    runtime_s: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime_s[label_at(e["tid"], e["ts"])][e["name"]] += e["dur"] / 1e6
    stream_s: dict[str, float] = defaultdict(float)
    for e in device_ops:
        stream_s[str(e.get("args", {}).get("stream"))] += e["dur"] / 1e6
    device_s: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in device_ops:
        launch = launches.get(e.get("args", {}).get("correlation"))
        label = label_at(launch[1], launch[0], PHASES) if launch else "unlaunched"
        device_s[label] += e["dur"] / 1e6
        kernels[label][e["name"][:60]] += e["dur"] / 1e6
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in device_ops)
    busy, gaps = 0.0, []
    if intervals:
        cur_start, cur_end = intervals[0]
        for s, t in intervals[1:]:
            if s > cur_end:
                busy += cur_end - cur_start
                gaps.append((cur_end, s))
                cur_start, cur_end = s, t
            else:
                cur_end = max(cur_end, t)
        busy += cur_end - cur_start
        window = intervals[-1][1] - intervals[0][0]
    else:
        window = 0.0
    idle_by: dict[str, float] = defaultdict(float)
    sizes = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, ">1ms": 0.0}
    for s, t in gaps:
        gap = t - s
        idle_by[label_at(engine_tid, s) if engine_tid is not None else "loop"] += gap / 1e6
        key = "<10us" if gap < 10 else "10-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else ">1ms"
        sizes[key] += gap / 1e6
    calls = defaultdict(int)
    host_s: dict[str, float] = defaultdict(float)
    for s, t, name in spans.get(engine_tid, []):
        calls[name] += 1
        host_s[name] += (t - s) / 1e6
    return {
        "clock_offset_spread_us": offset_spread_us,
        "window_s": window / 1e6,
        "gpu_busy_s": busy / 1e6,
        "gpu_idle_s": (window - busy) / 1e6,
        "idle_gaps_by_size_s": sizes,
        "idle_by_engine_thread_s": largest(idle_by),
        "device_s_by_launcher": largest(device_s),
        "device_ms_per_call": {k: 1000 * v / calls[k] for k, v in device_s.items() if calls.get(k)},
        "engine_thread_calls": dict(calls),
        "device_s_by_stream": dict(stream_s),
        "top_kernels_s_by_phase": {label: largest(names, 8) for label, names in kernels.items()},
        "runtime_api_s_by_label": {label: largest(apis, 6) for label, apis in runtime_s.items()},
        "engine_thread_host_s": largest(host_s),
    }


weights = random_weights(MODEL, dtype=torch.float32 if CPU else torch.float16, device=torch.device(DEVICE))
features = _features(min(cfg.requests, 256), weights.dims.n_mels, torch.device(DEVICE))
arrivals, lengths = mixed._workload(cfg, 0.0)


def run(mode: str, updates: dict[str, Any], profiled: bool) -> dict[str, Any]:
    began = time.perf_counter()
    updates = dict(updates)
    STEPS_AHEAD[0] = updates.pop("steps_ahead", 1)
    factory.BATCH_BUCKETS = tuple(sorted({*BUCKETS, *updates.pop("extra_buckets", ())}))
    settings = EngineSettings(
        device=DEVICE,
        dtype=cfg.dtype,
        max_slots=cfg.slots,
        max_encoder_batch=cfg.max_encoder_batch,
        encode_ahead=mode == "continuous-ahead",
    ).model_copy(update=updates)
    model = start_engine(weights, settings, static=mode.startswith("static"), padded=mode == "static-padded")
    try:
        warm = min(cfg.slots, 16)
        mixed._drive(model, features, [0.0] * warm, [cfg.max_tokens] * warm)
        model.engine.stats = EngineStats()
        started = time.perf_counter() - began
        if not profiled:
            row = mixed._drive(model, features, arrivals, lengths)
        else:
            activities = [ProfilerActivity.CPU] + ([] if CPU else [ProfilerActivity.CUDA])
            SPANS.clear()
            RECORDING[0] = True
            with profile(activities=activities) as prof:
                row = mixed._drive(model, features, arrivals, lengths)
                marks = calibration_marks()
            RECORDING[0] = False
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "trace.json")
                prof.export_chrome_trace(path)
                row["timeline"] = analyse(path, marks, list(SPANS))
    finally:
        model.close()
        del model
        gc.collect()
        if not CPU:
            torch.cuda.empty_cache()
    row.update(batching=mode, settings=updates, profiled=profiled, start_s=round(started, 1))
    if STEPS_AHEAD[0] != 1:
        row["settings"] = {**updates, "steps_ahead": STEPS_AHEAD[0]}
    STEPS_AHEAD[0] = 1
    factory.BATCH_BUCKETS = BUCKETS
    return row


def save() -> None:
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)


# inline continuous profiled with two steps ahead: with one, the profiler's own host cost left the GPU idle
# 0.35 s in admissions (unprofiled, one and two steps ahead run alike: 159.5 and 158.5 windows/s)
PROFILED = (
    [("continuous", {})]
    if CPU
    else [("continuous", {"steps_ahead": 2}), ("continuous-ahead", {}), ("static-padded", {"steps_ahead": 2})]
)
KEYS = ("batching", "settings", "wall_s", "windows_per_s", "p95_s", "steps", "admissions", "encoder_runs", "start_s")
for mode, updates in PROFILED:
    row = run(mode, updates, profiled=True)
    results["profiled"].append(row)
    save()
    print({k: row[k] for k in KEYS}, flush=True)
    print(json.dumps(row["timeline"], indent=1), flush=True)

VARIANTS = [
    ("static-padded", {}),
    ("continuous-ahead", {}),
    ("continuous-ahead", {"extra_buckets": (40, 56)}),
    ("continuous", {}),
    ("continuous", {"extra_buckets": (40, 56)}),
    ("continuous-ahead", {"decoding_encoder_batch": 8}),
    ("continuous-ahead", {"decoding_encoder_batch": 4}),
]
for _ in range(ROUNDS if not CPU else 0):
    for mode, updates in VARIANTS:
        row = run(mode, updates, profiled=False)
        row["settings"] = updates
        results["rows"].append(row)
        save()
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in KEYS}, flush=True)

padded = sorted(r["windows_per_s"] for r in results["rows"] if r["batching"] == "static-padded")
if not padded:
    sys.exit(0)
base = padded[(len(padded) - 1) // 2]
for mode, updates in VARIANTS:
    runs = sorted(r["windows_per_s"] for r in results["rows"] if r["batching"] == mode and r["settings"] == updates)
    median = runs[(len(runs) - 1) // 2]
    print(f"{mode:17} {json.dumps(updates):22} {median:7.1f} windows/s  ×padded {median / base:.3f}  runs {runs}")
