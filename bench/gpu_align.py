"""The word-timing pass alone on the GPU: what `Runner.align` costs the engine thread, and where it goes.

On random weights of `--model`'s shapes, 8 slots are filled with encoded windows; then the alignment pass runs
for 1 and 8 finished windows of `--tokens` text tokens, with the cost matrix made on the device (batched
long-form) and with raw scores for the host (sequential mode). Wall time with a device sync, median of 10; a
profile of one 8-window pass lists the host ops and device kernels that take the time.

    PYTHONPATH=src python bench/gpu_align.py OUT_DIR [--model large-v3-turbo] [--tokens 120]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from halkspeech.bench.common import device_info, median, print_table, synchronize
from halkspeech.engine.batch import Admission, AlignJob
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="large-v3-turbo")
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    weights = random_weights(args.model, dtype=dtype, device=device)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=dtype, device=device)
    tokenizer = Tokenizer.for_model(weights.dims)
    ids = TokenIds.from_tokenizer(tokenizer, weights.dims.n_vocab)
    runner = Runner(model, ids, slots=8, cuda_graphs=False, alignment_heads=weights.alignment_heads)
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    features = torch.randn(8, weights.dims.n_mels, 3000, device=device)
    options = SamplingOptions(max_new_tokens=args.tokens, force_length=True, timestamps=False)
    admissions = [Admission(i, DecodeRequest(features[i], prompt, sot, options), (i,), 0) for i in range(8)]
    job = runner.encode_async([a.request.features for a in admissions])
    runner.admit(admissions, [(job, i) for i in range(8)])
    generator = torch.Generator().manual_seed(0)
    texts = [tuple(torch.randint(0, ids.eot, (args.tokens,), generator=generator).tolist()) for _ in range(8)]

    def jobs(n: int, frames: int | None) -> list[AlignJob]:
        return [AlignJob(i, prompt, texts[i], frames) for i in range(n)]

    def timed(n: int, frames: int | None) -> float:
        times = []
        for _ in range(10):
            synchronize(device)
            started = time.perf_counter()
            runner.align(jobs(n, frames))
            synchronize(device)
            times.append((time.perf_counter() - started) * 1000)
        return median(times)

    rows: list[dict[str, Any]] = []
    for n in (1, 8):
        for frames, what in ((1500, "cost matrix on the device"), (None, "scores to the host")):
            runner.align(jobs(n, frames))  # warm-up
            rows.append({"windows": n, "returns": what, "ms": timed(n, frames)})
            rows[-1]["ms_per_window"] = rows[-1]["ms"] / n
            print(rows[-1], flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        runner.align(jobs(8, 1500))
        synchronize(device)
    averages = prof.key_averages()
    host = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]
    kernels = sorted(averages, key=lambda e: -e.self_device_time_total)[:10]
    results = {
        "device": device_info(device),
        "model": args.model,
        "tokens": args.tokens,
        "rows": rows,
        "host_ops_ms": [(e.key[:80], e.count, round(e.self_cpu_time_total / 1000, 3)) for e in host],
        "kernels_ms": [(e.key[:80], e.count, round(e.self_device_time_total / 1000, 3)) for e in kernels],
    }
    print(json.dumps({k: results[k] for k in ("host_ops_ms", "kernels_ms")}, indent=1), flush=True)
    title = f"Word-timing pass, {args.model}, {args.tokens} text tokens a window, on {results['device'].get('gpu')}"
    results["table"] = print_table(
        rows,
        [("windows", "windows"), ("returns", "returns"), ("ms", "ms"), ("ms_per_window", "ms/window")],
        title=title,
    )
    (args.out / "align.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
