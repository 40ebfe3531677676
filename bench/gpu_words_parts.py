"""Where word timestamps' throughput loss goes: 8 concurrent 5-minute files (random large-v3-turbo weights, 4
forced tokens a second, batched mode), in variants run alternately for ROUNDS rounds through one engine:

- off: no word timestamps;
- on: word timestamps;
- no_pass: word timestamps asked, but the engine completes each request without its alignment pass (so no
  words, and no host word timing either);
- no_host: the alignment pass runs, but the transcription skips the host half of word timing (DTW, words).

The engine's alignment graphs are on with `graphs`, off with `eager`. Medians per variant and the loss against
`off` are printed and written as JSON. A diagnostic: it replaces the engine's and the transcription's methods.

    PYTHONPATH=src python bench/gpu_words_parts.py OUT.json ROUNDS graphs|eager [VARIANT,...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from halkspeech.bench import longform
from halkspeech.config import EngineSettings, ModelSettings
from halkspeech.engine.engine import Engine
from halkspeech.engine.factory import start_engine
from halkspeech.engine.scheduler import Group
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription.batched import BatchedTranscription


def _no_pass(self: Engine, wanted: list[Group]) -> None:
    for group in wanted:
        self.scheduler.release_held(group)
        self._complete(group, release=False)


async def _no_host(self: BatchedTranscription, *args: Any, **kwargs: Any) -> None:
    return None


def main() -> None:
    out, rounds, graphs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "graphs"
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else ["off", "on", "no_pass", "no_host"]
    cfg = longform.LongformConfig(
        model="random:large-v3-turbo", minutes=5, compare_minutes=5, force_tokens_per_second=4
    )
    weights = ModelRegistry(ModelSettings()).load(cfg.model, dtype=torch.float16, device="cuda")
    started = time.perf_counter()
    model = start_engine(weights, EngineSettings(device="cuda", dtype="float16", alignment_graphs=graphs))
    runner = model.engine.runner
    print(
        f"graphs={graphs}: engine started in {time.perf_counter() - started:.1f} s, "
        f"{len(runner.aligner.graphs or ())} alignment graphs, {torch.cuda.memory_reserved() / 1e9:.2f} GB reserved"
    )
    files = [longform.build_audio(longform.clip_source(None), 5, 1 + i)[0] for i in range(8)]
    align, words = Engine._align, BatchedTranscription._time_words
    variants: dict[str, tuple[bool, Callable[..., Any], Callable[..., Any]]] = {
        "off": (False, align, words),
        "on": (True, align, words),
        "no_pass": (True, _no_pass, words),
        "no_host": (True, align, _no_host),
    }
    for on in (False, True):  # every graph and bucket the runs reach
        longform.run_concurrent(model, files, longform._options(cfg, on))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for r in range(rounds):
            for name in names:
                on, Engine._align, BatchedTranscription._time_words = variants[name]  # type: ignore[method-assign]
                row = longform.run_concurrent(model, files, longform._options(cfg, on))
                results[name].append(row)
                print(
                    f"{r} {name:8s} {row['rtfx']:6.0f}x  wall {row['wall_s']:.3f} s  busy {row['busy_s']:.3f} s  "
                    f"align {row['align_s']:.3f} s",
                    flush=True,
                )
    finally:
        Engine._align, BatchedTranscription._time_words = align, words  # type: ignore[method-assign]
        model.close()
    summary = {
        name: {
            "rtfx": statistics.median(r["rtfx"] for r in rows),
            "busy_s": statistics.median(r["busy_s"] for r in rows),
        }
        for name, rows in results.items()
    }
    for name, s in summary.items():
        s["loss_pct"] = 100 * (1 - s["rtfx"] / summary["off"]["rtfx"]) if "off" in summary else float("nan")
        print(f"{name:8s} {s['rtfx']:6.0f}x  busy {s['busy_s']:.3f} s  loss {s['loss_pct']:5.1f}%")
    with open(out, "w") as f:
        json.dump({"graphs": graphs, "summary": summary, "runs": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
