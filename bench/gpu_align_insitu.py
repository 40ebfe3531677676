"""Where the engine's word-timing passes spend their time inside a real long-form run (GPU).

`bench/gpu_align.py` times the pass alone (~1 ms a window on an H100); inside `bench longform`'s words
comparison the same passes took ~140 ms per batch of ~9 windows (cuDNN attention plans, built for each new
shape: fixed). This runs that comparison (8 concurrent 5-minute files, random large-v3-turbo weights, 4 forced
tokens per speech second) without words; with words, their host half (DTW, word split) in worker processes; with
that half in one thread of this process; and with it made a no-op. Then the words run once more with the pass's
parts wrapped in timers that synchronize the device around each part (one pass under the profiler).
Benchmark-only instrumentation: it patches the runner's methods on this process's engine.

    PYTHONPATH=src python bench/gpu_align_insitu.py OUT_DIR [MODEL DEVICE MINUTES]   (cpu: a smoke test)
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from halkspeech.bench.common import synchronize
from halkspeech.bench.longform import LongformConfig, _options, build_audio, clip_source, run_concurrent
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription import batched
from halkspeech.transcription.alignment import TimedSpan
from halkspeech.transcription.word_workers import WindowWords

TOTALS: dict[str, float] = defaultdict(float)


PROFILES: dict[str, Any] = {}


def timed(name: str, fn: Callable[..., Any], device: torch.device, profile_call: int = -1) -> Callable[..., Any]:
    """`fn` with its wall time and this thread's CPU time (wall ≫ CPU: the thread waits, for the GIL or the
    device) added to TOTALS; call number `profile_call` runs under the torch profiler."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        started, cpu = time.perf_counter(), time.thread_time()
        if TOTALS[name + " calls"] == profile_call:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                out = fn(*args, **kwargs)
                synchronize(device)
            averages = prof.key_averages()
            host = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:20]
            kernels = sorted(averages, key=lambda e: -e.self_device_time_total)[:12]
            PROFILES[name] = {
                "wall_ms": (time.perf_counter() - started) * 1000,
                "host_ops_ms": [(e.key[:70], e.count, round(e.self_cpu_time_total / 1000, 3)) for e in host],
                "kernels_ms": [(e.key[:70], e.count, round(e.self_device_time_total / 1000, 3)) for e in kernels],
            }
        else:
            out = fn(*args, **kwargs)
        synchronize(device)
        TOTALS[name] += time.perf_counter() - started
        TOTALS[name + " cpu"] += time.thread_time() - cpu
        TOTALS[name + " calls"] += 1
        return out

    return wrapper


async def _no_words(job: WindowWords, processes: int) -> tuple[list[TimedSpan], float]:
    return [TimedSpan(start, end, ()) for start, end, _ in job.spans], 0.0


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    name, where = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("random:large-v3-turbo", "cuda")  # cpu: smoke
    cfg = LongformConfig(model=name, compare_minutes=5, device=where)  # type: ignore[arg-type]
    dtype = torch.float16 if where == "cuda" else torch.float32
    weights = ModelRegistry(ModelSettings()).load(cfg.model, dtype=dtype, device=where)
    settings = EngineSettings(device=where, dtype="float16" if where == "cuda" else "float32", max_encoder_batch=64)
    model = start_engine(weights, settings)
    runner, device = model.engine.runner, model.device
    try:
        minutes = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
        audio, _ = build_audio(clip_source(None), 2.4 * minutes, seed=0)
        size = int(minutes * 60 * SAMPLE_RATE)
        files = [audio[s : s + size] for s in range(0, len(audio) - size, (len(audio) - size) // 7)][:8]
        run_concurrent(model, files, _options(cfg, True))  # warm-up
        # what the words cost; with the host half (DTW, word split) in worker processes (the default on a GPU),
        # in one thread of this process (holding the GIL the engine thread needs), and made a no-op
        processes = model.word_processes
        plain = run_concurrent(model, files, _options(cfg, False))
        words = run_concurrent(model, files, _options(cfg, True))
        model.word_processes = 0
        words_thread = run_concurrent(model, files, _options(cfg, True))
        real = batched.time_window_words
        batched.time_window_words = _no_words  # type: ignore[assignment]
        try:
            engine_only = run_concurrent(model, files, _options(cfg, True))
        finally:
            batched.time_window_words = real  # type: ignore[assignment]
            model.word_processes = processes
        runs = {
            "no words": plain,
            f"words, {processes} processes": words,
            "words, 1 thread": words_thread,
            "words, host half a no-op": engine_only,
        }
        for label, run in runs.items():
            run["loss_pct"] = round(100 * (1 - run["rtfx"] / plain["rtfx"]), 1)
            print(
                f"{label:>26}: RTFx {run['rtfx']:7.0f}  loss {run['loss_pct']:5.1f}%  align {run['align_s']}s",
                flush=True,
            )
        runner.align_async = timed("align (whole)", runner.align_async, device, profile_call=3)  # type: ignore[method-assign]
        runner.aligner._chunk = timed("  chunk", runner.aligner._chunk, device)  # type: ignore[method-assign]
        decoder = runner.model.decoder
        decoder.align = timed("    decoder pass", decoder.align, device)  # type: ignore[method-assign]
        runner.aligner._cost_matrices = timed("    cost matrices", runner.aligner._cost_matrices, device)  # type: ignore[method-assign]
        result = run_concurrent(model, files, _options(cfg, True))
    finally:
        model.close()
    report = {"runs": runs, "timed_run": result, "parts_s": dict(TOTALS), "profiles": PROFILES}
    print(json.dumps(report, indent=1), flush=True)
    (out / "align_insitu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
