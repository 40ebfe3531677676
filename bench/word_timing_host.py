"""Host (CPU) time of word timing per 30 s window, the part that runs outside the engine.

The engine hands each window's alignment-head scores [heads, prompt + text + 1, 1500] to the host; everything
after that (softmax, normalisation, median filter, DTW, word split) is `find_alignment` on the CPU, in worker
threads. On the GPU benchmark this is where the cost of word timestamps goes (bench/NOTES.md), so it is
measured here on its own: synthetic scores of the real shapes, single-threaded, median of `--repeat` runs.

    python bench/word_timing_host.py [--tokens 100] [--repeat 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from halkspeech.bench.common import device_info, median, print_table, write_json
from halkspeech.engine.request import Alignment
from halkspeech.model.dims import ALIGNMENT_HEADS
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.alignment import alignment_matrix, dtw, find_alignment, median_filter, normalised_weights

PROMPT = 4  # the alignment prompt: start-of-transcript, language, task, no-timestamps
FRAMES = 1500  # a full 30 s window


def _alignment(heads: int, text: list[int], seed: int) -> Alignment:
    generator = torch.Generator().manual_seed(seed)
    # float16, as the engine hands them over
    scores = (torch.randn(heads, PROMPT + len(text) + 1, FRAMES, generator=generator) * 4).half()
    probs = tuple(0.9 for _ in text)
    return Alignment(scores=scores, text_probs=probs, text_tokens=tuple(text), prompt_len=PROMPT)


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return median(times)


def _measure(model: str, text: list[int], tokenizer: Tokenizer, repeat: int) -> dict[str, object]:
    """One window of `model`'s alignment heads with `text`: each stage's time and the whole."""
    heads = len(ALIGNMENT_HEADS[model])
    alignment = _alignment(heads, text, seed=0)
    k, num_frames = len(text), FRAMES * 2  # num_frames counts mel frames: two per encoder position
    weights = normalised_weights(alignment, k, num_frames)[:, PROMPT - 1 : -1]
    matrix = alignment_matrix(alignment, k, num_frames)
    return {
        "model": model,
        "heads": heads,
        "tokens": k,
        "normalise_ms": _median_ms(lambda: normalised_weights(alignment, k, num_frames), repeat),
        "median_filter_ms": _median_ms(lambda: median_filter(weights).mean(axis=0), repeat),
        "dtw_ms": _median_ms(lambda: dtw(-matrix), repeat),
        "find_alignment_ms": _median_ms(
            lambda: find_alignment(alignment, tokenizer, "en", text_count=k, num_frames=num_frames), repeat
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100, help="text tokens per window (default 100)")
    parser.add_argument("--repeat", type=int, default=20, help="runs per measurement; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeat < 1:
        parser.error("--tokens and --repeat must be at least 1")

    torch.set_num_threads(1)
    tokenizer = Tokenizer(multilingual=True, num_languages=100)
    words = tokenizer.encode(" the quick brown fox jumps over the lazy dog, and then it rests.")
    text = (words * (args.tokens // len(words) + 1))[: args.tokens]
    rows = [_measure(model, text, tokenizer, args.repeat) for model in ("large-v3-turbo", "large-v3")]
    print_table(
        rows,
        [
            ("model", "model"),
            ("heads", "heads"),
            ("tokens", "tokens"),
            ("normalise_ms", "normalise ms"),
            ("median_filter_ms", "median filter ms"),
            ("dtw_ms", "DTW ms"),
            ("find_alignment_ms", "whole window ms"),
        ],
    )
    write_json(args.json, {"single_thread": True, "device": device_info(torch.device("cpu")), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
