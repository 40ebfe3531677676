"""Where a one-shot batch of the engine benchmark goes: the engine's phase timers, step count and encoder runs
for `halkspeech bench engine`'s batch of N windows (N = 64 by default), with the fused kernels off and on.

    PYTHONPATH=src python bench/gpu_oneshot.py OUT_DIR [--batch 64] [--model large-v3-turbo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from halkspeech.bench.engine_bench import OursRunner, _features
from halkspeech.config import EngineSettings
from halkspeech.engine.engine import EngineStats
from halkspeech.engine.factory import start_engine
from halkspeech.model.weights import random_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="large-v3-turbo")
    args = parser.parse_args()
    weights = random_weights(args.model, dtype=torch.float16, device=torch.device("cuda"))
    features = _features(args.batch, weights.dims.n_mels, torch.device("cuda"))
    out = {}
    for fused in (16, 0, 16, 0):
        settings = EngineSettings(device="cuda", dtype="float16", max_slots=256, max_encoder_batch=64,
                                  fused_kernels_max_batch=fused)  # fmt: skip
        model = start_engine(weights, settings)
        run = OursRunner(model, features, 80)
        for _ in range(2):
            run(args.batch)
        rows = []
        for _ in range(5):
            model.engine.stats = EngineStats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(args.batch)
            seconds = time.perf_counter() - start
            stats = model.engine.stats
            rows.append({"s": round(seconds, 4), "steps": stats.steps, "encoder_runs": dict(stats.encoder_batches),
                         "admits": stats.admit_calls, **{k: round(v, 4) for k, v in stats.phases().items()}})  # fmt: skip
        out.setdefault(f"fused{fused}", []).append(rows)
        print(fused, json.dumps(rows), flush=True)
        model.close()
        del model
        torch.cuda.empty_cache()
    (args.out / "oneshot.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
