"""Host time the engine spends per decode step, with a runner that does no device work.

On the GPU a decode step returns its tokens to the host (a sync), and the engine thread then does its Python
bookkeeping (record the tokens, finish sequences, admit new ones, plan the next step) before it launches the
next step: that host time adds to every step's GPU time. This runs the real Engine and Scheduler on the mixed
workload of `halkspeech bench mixed` (512 windows, 10-150 forced tokens, 64 slots, all arriving at once) with
a runner that returns at once, so what it measures is that bookkeeping alone: the engine's busy time per step,
median of `--repeat` runs, continuous and static batching.

    python bench/engine_host.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from halkspeech.bench.common import device_info, median, print_table, write_json
from halkspeech.engine.batch import Admission, AdmitResult, DecodeStep, StepOutput
from halkspeech.engine.engine import Engine
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import EncodeJob
from halkspeech.engine.scheduler import Scheduler
from halkspeech.model.tokenizer import Tokenizer

TOKEN = 100  # what every "decoded" position holds: a plain text token, never end-of-text
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WINDOW_BUCKETS = (32, 64, 128, 224, 448)


class _Done:
    """A launched step whose output is known already."""

    def __init__(self, output: StepOutput) -> None:
        self.output = output

    def result(self) -> StepOutput:
        return self.output


class _Admitted:
    def __init__(self, results: list[AdmitResult]) -> None:
        self._results = results

    def results(self) -> list[AdmitResult]:
        return self._results


class NoDeviceRunner:
    """The Runner's interface, doing nothing: every step and admission returns TOKEN at once."""

    def __init__(self, slots: int) -> None:
        self.slots = slots

    def stream_context(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def encode_async(self, features: Sequence[torch.Tensor]) -> EncodeJob:
        return EncodeJob(audio=torch.empty(0), begin=None, done=None, inline=True)

    def launch_admit(self, admissions: Sequence[Admission], rows: object) -> _Admitted:
        return _Admitted(
            [AdmitResult((TOKEN,) * len(a.slots), (-0.1,) * len(a.slots), (), 0.0, None) for a in admissions]
        )

    def launch_step(self, step: DecodeStep) -> _Done:
        return _Done(StepOutput((TOKEN,) * step.size, (-0.1,) * step.size))

    def release(self, slots: Sequence[int]) -> None:
        pass

    def align(self, jobs: object) -> list[object]:
        return []


def run_once(*, static: bool, requests: int = 512, slots: int = 64, seed: int = 0) -> dict[str, float]:
    tokenizer = Tokenizer(multilingual=True, num_languages=100)
    scheduler = Scheduler(
        slots,
        eot=tokenizer.eot,
        timestamp_begin=tokenizer.timestamp_begin,
        max_encoder_batch=64,
        max_queue=4 * requests,
        batch_buckets=BATCH_BUCKETS,
        window_buckets=WINDOW_BUCKETS,
        static=static,
    )
    engine = Engine(NoDeviceRunner(slots), scheduler).start()  # type: ignore[arg-type]
    try:
        prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
        rng = random.Random(seed)
        features = torch.zeros(128, 3000)
        handles = []
        for _ in range(requests):
            options = SamplingOptions(max_new_tokens=rng.randint(10, 150), force_length=True, timestamps=False)
            handles.append(engine.submit(DecodeRequest(features, prompt, sot, options)))
        for handle in handles:
            handle.result(120)
        stats = engine.stats
        return {"steps": stats.steps, "tokens_per_step": stats.tokens / stats.steps, "busy_s": stats.busy_s}
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode; the median is kept (default 5)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = []
    for mode in ("continuous", "static"):
        runs = [run_once(static=mode == "static") for _ in range(args.repeat)]
        per_step = [r["busy_s"] / r["steps"] * 1e6 for r in runs]
        rows.append(
            {
                "mode": mode,
                "steps": runs[0]["steps"],
                "tokens_per_step": runs[0]["tokens_per_step"],
                "host_us_per_step": median(per_step),
                "runs_us_per_step": [round(x, 1) for x in per_step],
            }
        )
    print_table(
        rows,
        [("mode", "mode"), ("steps", "steps"), ("tokens_per_step", "tokens/step"), ("host_us_per_step", "host µs")],
    )
    write_json(args.json, {"repeat": args.repeat, "device": device_info(torch.device("cpu")), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
