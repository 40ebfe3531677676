"""Where the engine's word-timing passes spend their time inside a real long-form run (GPU).

`bench/gpu_align.py` times the pass alone (~1 ms a window on an H100); inside `bench longform`'s words
comparison the same passes took ~140 ms per batch of ~9 windows. This runs that comparison's words run once
(8 concurrent 5-minute files, random large-v3-turbo weights, 4 forced tokens per speech second) with the
pass's parts wrapped in timers that synchronize the device around each part, and prints their totals.
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
from halkspeech.bench.longform import DEV_DIR, LongformConfig, _options, build_audio, run_concurrent
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.registry import ModelRegistry

TOTALS: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(device)
        TOTALS[name] += time.perf_counter() - started
        TOTALS[name + " calls"] += 1
        return out

    return wrapper


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
        audio, _ = build_audio(Path(DEV_DIR), 2.4 * minutes, seed=0)
        size = int(minutes * 60 * SAMPLE_RATE)
        files = [audio[s : s + size] for s in range(0, len(audio) - size, (len(audio) - size) // 7)][:8]
        run_concurrent(model, files, _options(cfg, True))  # warm-up
        runner.align = timed("align (whole)", runner.align, device)  # type: ignore[method-assign]
        runner._align_chunk = timed("  chunk", runner._align_chunk, device)  # type: ignore[method-assign]
        decoder = runner.model.decoder
        decoder.align = timed("    decoder pass", decoder.align, device)  # type: ignore[method-assign]
        runner._cost_matrices = timed("    cost matrices", runner._cost_matrices, device)  # type: ignore[method-assign]
        result = run_concurrent(model, files, _options(cfg, True))
    finally:
        model.close()
    report = {"run": result, "parts_s": dict(TOTALS)}
    print(json.dumps(report, indent=1), flush=True)
    (out / "align_insitu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
