"""Word timing's alignment graphs on the GPU: the same results as the eager pass, and what they save.

On random weights of `--model`'s shapes, 8 slots are filled with encoded windows; 8 finished windows of random
text lengths (5-220 tokens) and frame counts are aligned through the alignment graphs and eagerly (the same
runner with its graphs turned off), on the same cache and in the same chunks of `--rows` windows (fp16 results
depend on how many windows share a pass's GEMMs, graphs or not). Printed: the largest difference of the cost matrices and
token probabilities, how many DTW paths are equal; the engine thread's time to queue a pass (host) and the
pass's time with a device sync (wall), medians of 20, for 1 and 8 windows; the graphs' count, capture time and
the memory their pool holds.

    PYTHONPATH=src python bench/gpu_align_graphs.py OUT.json [--model large-v3-turbo] [--rows 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from halkspeech.bench.common import device_info, median
from halkspeech.engine.batch import Admission, AlignJob
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper
from halkspeech.transcription.alignment import dtw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="large-v3-turbo")
    parser.add_argument("--rows", type=int, default=4, help="windows an alignment graph takes (default: 4)")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    weights = random_weights(args.model, dtype=dtype, device=device)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=dtype, device=device)
    tokenizer = Tokenizer.for_model(weights.dims)
    ids = TokenIds.from_tokenizer(tokenizer, weights.dims.n_vocab)
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    runner = Runner(
        model,
        ids,
        slots=8,
        cuda_graphs=True,
        alignment_heads=weights.alignment_heads,
        alignment_graph_rows=args.rows,
        alignment_prompt_len=len(prompt),
    )
    features = torch.randn(8, weights.dims.n_mels, 3000, device=device)
    options = SamplingOptions(max_new_tokens=4)
    admissions = [Admission(i, DecodeRequest(features[i], prompt, sot, options), (i,), 0) for i in range(8)]
    job = runner.encode_async([a.request.features for a in admissions])
    runner.admit(admissions, [(job, i) for i in range(8)])
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    started = time.perf_counter()
    count = runner.warm_up((), ())
    capture_s = time.perf_counter() - started
    pool_gb = (torch.cuda.memory_reserved() - reserved) / 1e9

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 221, 8)
    frames = rng.integers(100, 1501, 8)
    jobs = [
        AlignJob(i, tuple(prompt), tuple(int(t) for t in rng.integers(0, ids.eot, n)), int(f))
        for i, (n, f) in enumerate(zip(lengths, frames, strict=True))
    ]

    def run(graphs: bool, n: int) -> tuple[list, float, float]:
        runner.aligner.graph_rows = args.rows if graphs else 0
        hosts, walls, results = [], [], []
        with torch.cuda.stream(runner.stream):
            for _ in range(20):
                torch.cuda.synchronize()
                began = time.perf_counter()
                queued = runner.align_async(jobs[:n], max_jobs=args.rows)  # the same chunks either way
                hosts.append(time.perf_counter() - began)
                results = queued.results()
                walls.append(time.perf_counter() - began)
        return results, 1000 * median(hosts), 1000 * median(walls)

    graphed, eager = run(True, 8)[0], run(False, 8)[0]
    matrix_diff = max(float((g.matrix - e.matrix).abs().max()) for g, e in zip(graphed, eager, strict=True))
    prob_diff = max(
        max(abs(a - b) for a, b in zip(g.text_probs, e.text_probs, strict=True))
        for g, e in zip(graphed, eager, strict=True)
    )
    same_paths = sum(
        all(
            np.array_equal(a, b)
            for a, b in zip(dtw(g.matrix.double().numpy()), dtw(e.matrix.double().numpy()), strict=True)
        )
        for g, e in zip(graphed, eager, strict=True)
    )
    rows = []
    for n in (1, 8):
        for graphs in (True, False):
            _, host, wall = run(graphs, n)
            rows.append({"windows": n, "graphs": graphs, "host_ms": host, "wall_ms": wall})
            print(f"{n} windows, graphs={graphs}: queued in {host:.2f} ms, done in {wall:.2f} ms")
    result = {
        "device": device_info(device),
        "model": args.model,
        "graphs": count,
        "capture_s": capture_s,
        "pool_gb": pool_gb,
        "max_matrix_diff": matrix_diff,
        "max_prob_diff": prob_diff,
        "same_dtw_paths": f"{same_paths}/8",
        "timings": rows,
    }
    print(
        f"{count} graphs captured in {capture_s:.1f} s, pool {pool_gb:.2f} GB; matrices within {matrix_diff:.2e}, "
        f"probabilities within {prob_diff:.2e}, DTW paths equal {same_paths}/8"
    )
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
