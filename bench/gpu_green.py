"""Experiment: the encoder, encoding ahead while sequences decode, confined to a CUDA green context of N SMs, so
that the decode steps on the engine's stream always find the other SMs free. gpu_carveout.py left SMs free in
cuBLAS's GEMMs only (session 8: 1.21-1.32× of padded static, within the runs' spread); a green context holds
every encoder kernel to its SMs: attention, LayerNorms and GELUs too. turbo's mixed workload, one lease.

First the mechanism: a 32-window encoder run (eager launches) and a 16-window one (the engine's captured
encoder graph) on the engine's plain side stream against each green context (a context of N SMs should take
about 132/N times as long on an H100). Whether a graph captured in the primary context may be replayed into a
green context's stream, and whether its kernels then keep to the context's SMs, is not something this was
sure of when written: if the replay fails or does not slow down with the context, the green rows run with the
encoder graphs off, beside a plain-stream row with them off too, so that the comparison stays like for like.
Then the workload, in ROUNDS alternating rounds (single runs spread ±8%): padded static, inline continuous
batching, encoding ahead on the plain side stream, then on each green context. Printed last: each variant's
median round (`mixed.median_runs`: the lower middle of an even count) and its ratio to padded static's.

Run: PYTHONPATH=src python bench/gpu_green.py OUT.json [SM counts, multiples of 8, e.g. 96,112,120] [ROUNDS, 2]
Written in session 10 with no device lent; run in session 12 (H200, one round, bench/results/green_h200_s12.json):
the graphs did not keep to the green SMs, and no green context beat the plain side stream (bench/NOTES.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import statistics
import sys
from typing import Any

import torch

from halkspeech.bench import mixed
from halkspeech.bench.common import device_info
from halkspeech.bench.engine_bench import _features
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import ModelEngine
from halkspeech.model.weights import random_weights

OUT = sys.argv[1]
SM_COUNTS = [int(n) for n in (sys.argv[2] if len(sys.argv) > 2 else "96,112,120").split(",")]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
MODEL = "large-v3-turbo"
cfg = mixed.MixedConfig(models=(MODEL,), requests=512)
device = torch.device("cuda")
results: dict[str, Any] = {"device": device_info(device), "encoder": [], "rows": []}


def green_stream(num_sms: int) -> tuple[object, torch.cuda.Stream]:
    """A green context of num_sms SMs and a stream whose work runs on them only (keep the context alive)."""
    from torch.cuda.green_contexts import GreenContext

    try:
        context = GreenContext.create(num_sms=num_sms, device_id=device.index or 0)
    except TypeError:  # earlier bindings take them by position
        context = GreenContext.create(num_sms, device.index or 0)
    if hasattr(context, "Stream"):
        return context, context.Stream()
    # bindings without Stream(): a stream created while the green context is current belongs to it
    context.set_context()
    try:
        handle = ctypes.c_void_p()
        status = ctypes.CDLL("libcuda.so.1").cuStreamCreate(ctypes.byref(handle), 1)  # CU_STREAM_NON_BLOCKING
        if status:
            raise RuntimeError(f"cuStreamCreate: CUresult {status}")
    finally:
        context.pop_context()
    return context, torch.cuda.ExternalStream(handle.value, device=device)


STREAMS = {n: green_stream(n) for n in SM_COUNTS}
use_green: list[int] = [0]  # the SM count whose stream the next engine encodes ahead on (0: the plain one)
encoder_graphs: list[bool] = [True]  # whether the next engine replays encoder graphs


def start_engine(weights: Any, settings: EngineSettings, **kwargs: Any) -> ModelEngine:
    if not encoder_graphs[0]:
        settings = settings.model_copy(update={"encoder_graphs": False})
    model = original_start(weights, settings, **kwargs)
    if use_green[0]:
        runner = model.engine.runner
        assert runner.encode_stream is not None, "encoding ahead is off"
        runner.encode_stream = STREAMS[use_green[0]][1]
    return model


original_start = mixed.start_engine
mixed.start_engine = start_engine


def _time(runner: Any, features: torch.Tensor, stream: torch.cuda.Stream) -> float:
    """Median of five timed encoder runs on `stream`, after one untimed (ms)."""
    times = []
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(6):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            runner.encode(features)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
    return statistics.median(times[1:])


def time_encoder() -> bool:
    """Each stream's encoder times, eager (32 windows) and graph-replayed (16); True if the graphs keep to the
    green contexts' SMs (replayed without error and slowed by the smallest context at least half as much as
    the eager run)."""
    weights = random_weights(MODEL, dtype=torch.float16, device=device)
    model = original_start(weights, EngineSettings(device="cuda", dtype="float16", max_slots=16))
    try:
        runner = model.engine.runner
        assert runner.encoder_graph_batch >= 16, runner.encoder_graph_batch
        eager_in, graph_in = (_features(n, model.dims.n_mels, device) for n in (32, 16))
        for n, stream in [(0, torch.cuda.Stream(device))] + [(n, s) for n, (_, s) in STREAMS.items()]:
            row: dict[str, Any] = {"sms": n or "all", "encoder_32_eager_ms": _time(runner, eager_in, stream)}
            try:
                row["encoder_16_graph_ms"] = _time(runner, graph_in, stream)
            except Exception as exc:  # recorded: whether graphs may be replayed into a green context at all
                row["encoder_16_graph_error"] = repr(exc)
                torch.cuda.synchronize(device)
            results["encoder"].append(row)
            print(row, flush=True)
    finally:
        model.close()
    rows = results["encoder"]
    if any("encoder_16_graph_error" in r for r in rows):
        return False
    smallest = min(rows[1:], key=lambda r: int(r["sms"]))
    eager_slowdown = smallest["encoder_32_eager_ms"] / rows[0]["encoder_32_eager_ms"]
    graph_slowdown = smallest["encoder_16_graph_ms"] / rows[0]["encoder_16_graph_ms"]
    return graph_slowdown - 1 >= (eager_slowdown - 1) / 2


def run(modes: tuple[str, ...], sms: int, graphs: bool = True, round_: int = 0) -> None:
    use_green[0], encoder_graphs[0] = sms, graphs
    try:
        for row in mixed.bench_mixed_model(MODEL, dataclasses.replace(cfg, modes=modes)):
            row["encoder_sms"], row["encoder_graphs"], row["round"] = sms or "all", graphs, round_
            results["rows"].append(row)
            keys = ("round", "batching", "encoder_sms", "encoder_graphs", "windows_per_s", "p95_s", "encode_s")
            print({k: row.get(k) for k in keys}, flush=True)
    finally:
        use_green[0], encoder_graphs[0] = 0, True
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)


def summary() -> list[dict[str, Any]]:
    """Each variant (batching, encoder SMs, encoder graphs) by its median round, and its ratio to padded static's
    median round: the summary `bench mixed --repeats` gives its modes."""
    variants: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        label = f"{row['batching']} sms={row['encoder_sms']} graphs={row['encoder_graphs']}"
        variants.setdefault(label, []).append(row)
    return mixed.median_runs(variants)


graphs_follow = time_encoder()
results["encoder_graphs_keep_to_green_sms"] = graphs_follow
print("encoder graphs keep to the green contexts' SMs:", graphs_follow, flush=True)
for round_ in range(ROUNDS):
    run(("static-padded", "continuous", "continuous-ahead"), 0, round_=round_)
    if not graphs_follow:
        run(("continuous-ahead",), 0, graphs=False, round_=round_)
    for count in SM_COUNTS:
        run(("continuous-ahead",), count, graphs=graphs_follow, round_=round_)
results["summary"] = summary()
for line in results["summary"]:
    keys = ("batching", "encoder_sms", "encoder_graphs", "windows_per_s", "spread", "p95_s", "vs_padded")
    print({k: line.get(k) for k in keys}, flush=True)
with open(OUT, "w") as f:
    json.dump(results, f, indent=1)
