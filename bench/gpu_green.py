"""Experiment: the encoder, encoding ahead while sequences decode, confined to a CUDA green context of N SMs, so
that the decode steps on the engine's stream always find the other SMs free. gpu_carveout.py left SMs free in
cuBLAS's GEMMs only (session 8: 1.21-1.32× of padded static, within the runs' spread); a green context holds
every encoder kernel to its SMs: attention, LayerNorms and GELUs too. turbo's mixed workload, one lease.

First the mechanism: a 32-window encoder run on the engine's plain side stream against each green context (a
context of N SMs should take about 132/N times as long on an H100). Then the workload: padded static and
inline continuous batching, encoding ahead on the plain side stream, then on each green context, then padded
static again (the machine's drift).

Run: PYTHONPATH=src python bench/gpu_green.py OUT.json [SM counts, multiples of 8, e.g. 96,112,120]
Written in session 10 with no device lent; not yet run.
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


def start_engine(*args: Any, **kwargs: Any) -> ModelEngine:
    model = original_start(*args, **kwargs)
    if use_green[0]:
        runner = model.engine.runner
        assert runner.encode_stream is not None, "encoding ahead is off"
        runner.encode_stream = STREAMS[use_green[0]][1]
    return model


original_start = mixed.start_engine
mixed.start_engine = start_engine


def time_encoder() -> None:
    weights = random_weights(MODEL, dtype=torch.float16, device=device)
    model = original_start(weights, EngineSettings(device="cuda", dtype="float16", max_slots=16))
    try:
        runner = model.engine.runner
        features = _features(32, model.dims.n_mels, device)
        for n, stream in [(0, torch.cuda.Stream(device))] + [(n, s) for n, (_, s) in STREAMS.items()]:
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
            row = {"sms": n or "all", "encoder_32_ms": statistics.median(times[1:])}
            results["encoder"].append(row)
            print(row, flush=True)
    finally:
        model.close()


def run(modes: tuple[str, ...], sms: int) -> None:
    use_green[0] = sms
    try:
        for row in mixed.bench_mixed_model(MODEL, dataclasses.replace(cfg, modes=modes)):
            row["encoder_sms"] = sms or "all"
            results["rows"].append(row)
            keys = ("batching", "encoder_sms", "windows_per_s", "p95_s", "encode_s", "step_s", "busy_s")
            print({k: row.get(k) for k in keys}, flush=True)
    finally:
        use_green[0] = 0
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)


time_encoder()
run(("static-padded", "continuous", "continuous-ahead"), 0)
for count in SM_COUNTS:
    run(("continuous-ahead",), count)
run(("static-padded",), 0)
