"""Mixed workload: requests arrive over time (Poisson) with decode lengths drawn between 10 and 150 tokens.
Continuous batching (sequences join and leave at step boundaries) against static batching (a batch runs
until its longest member ends), with the same kernels, weights, arrivals and lengths."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from halkspeech.bench.common import (
    MAX_FORCED_TOKENS,
    check_output,
    check_ranges,
    check_shapes,
    device_info,
    free_device_memory,
    percentile,
    print_table,
    write_json,
)
from halkspeech.bench.engine_bench import _features
from halkspeech.config import MAX_ENCODER_BATCH, MAX_SLOTS, EngineSettings
from halkspeech.engine.engine import EngineStats
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.errors import InvalidRequest
from halkspeech.model.dims import CHUNK_LENGTH, KNOWN_DIMS
from halkspeech.model.weights import LoadedWeights, random_weights

MODES = ("continuous", "continuous-ahead", "static", "static-padded")


@dataclass(frozen=True)
class MixedConfig:
    models: tuple[str, ...] = ("large-v3-turbo", "large-v3")
    requests: int = 512
    min_tokens: int = 10
    max_tokens: int = 150
    #: Arrival rates in windows/s, each a run of the same requests and lengths (a throughput-latency curve);
    #: 0 = all requests arrive within one second (saturation).
    rates: tuple[float, ...] = (0.0,)
    slots: int = 64
    max_encoder_batch: int = 64
    device: Literal["cuda", "cpu"] = "cuda"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    seed: int = 0
    #: Continuous batching's admission batching (None: the engine's defaults)
    admit_batch: int | None = None
    #: Continuous batching: how long a window waits for company before an encoder run of fewer than the engine's
    #: `decoding_encoder_batch` windows starts while decoding (None: the engine's default, 0 ms)
    encoder_wait_ms: float | None = None
    #: Plain admissions replay captured graphs (the engine's default; off to compare)
    admission_graphs: bool = True
    #: "continuous" (encoder inline), "continuous-ahead" (encoder on a side stream, the engine's default), "static"
    #: (a batch runs until its longest member ends; finished rows leave the step), "static-padded" (textbook
    #: static batching: finished rows keep running until the batch ends, as in a padded batch).
    #: (bench/results/mixed_h200.json predates the rename: its "continuous" is today's "continuous-ahead" and its
    #: "continuous-inline" today's "continuous".)
    modes: tuple[str, ...] = ("continuous", "static", "static-padded")
    #: Runs of each mode, alternating (mode A, B, C, then A, B, C again), so that the machine's drift falls on every
    #: mode alike; each mode is reported by its median run (by windows/s), the ratios from those, every run in JSON.
    #: Single runs of one mode have spread ±8% on an H100 (bench/NOTES.md), as much as some differences measured.
    repeats: int = 1
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_output(self.json_path)
        check_shapes(self.models)
        check_ranges(
            requests=(self.requests, 1, 1_000_000),
            min_tokens=(self.min_tokens, 1, MAX_FORCED_TOKENS),
            max_tokens=(self.max_tokens, self.min_tokens, MAX_FORCED_TOKENS),
            rate=(self.rates, 0, float("inf")),
            slots=(self.slots, 1, MAX_SLOTS),
            encoder_batch=(self.max_encoder_batch, 1, MAX_ENCODER_BATCH),
            admit_batch=(self.admit_batch, 1, MAX_SLOTS),
            encoder_wait_ms=(self.encoder_wait_ms, 0, 10_000),
            repeats=(self.repeats, 1, 50),
        )
        for rate in self.rates:
            if rate and self.requests / rate > _MAX_SPAN_S:  # 1e-300 overflowed a timestamp; 1e-4 slept
                raise InvalidRequest(
                    f"--rate {rate:g} spreads {self.requests} requests over {self.requests / rate:.3g} s; "
                    f"at least {self.requests / _MAX_SPAN_S:.3g}/s keeps the arrivals within an hour"
                )
        if len(set(self.rates)) < len(self.rates):
            raise InvalidRequest("--rate names a rate twice: use --repeats to run rates again")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            given = ", ".join(unknown) or "(none given)"
            raise InvalidRequest(f"unknown --modes {given}: choose from {', '.join(MODES)}")
        if len(set(self.modes)) < len(self.modes):
            raise InvalidRequest("--modes names a mode twice: use --repeats to run modes again")


_MAX_SPAN_S = 3600.0  # the arrivals' expected span at most


def _workload(cfg: MixedConfig, rate: float) -> tuple[list[float], list[int]]:
    """Arrival times and decode lengths. Every rate draws the same numbers from the seed: the same lengths, and
    arrival times scaled by 1 / rate."""
    rng = random.Random(cfg.seed)
    rate = rate or cfg.requests  # saturation: everything within about a second
    arrivals, t = [], 0.0
    for _ in range(cfg.requests):
        arrivals.append(t)
        t += rng.expovariate(rate)
    lengths = [rng.randint(cfg.min_tokens, cfg.max_tokens) for _ in range(cfg.requests)]
    return arrivals, lengths


def _drive(model: ModelEngine, features: torch.Tensor, arrivals: list[float], lengths: list[int]) -> dict[str, Any]:
    """Submit each request at its arrival time; record completion latencies."""
    tok = model.tokenizer
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    suppress = tok.suppress_tokens()
    done: list[float] = [0.0] * len(arrivals)
    submitted: list[float] = [0.0] * len(arrivals)
    all_done = threading.Event()
    remaining = [len(arrivals)]
    lock = threading.Lock()

    def finished(i: int) -> None:
        done[i] = time.perf_counter()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    start = time.perf_counter()
    for i, (at, length) in enumerate(zip(arrivals, lengths, strict=True)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        options = SamplingOptions(max_new_tokens=length, force_length=True, timestamps=False, suppress_tokens=suppress)
        submitted[i] = time.perf_counter()
        handle = model.engine.submit(DecodeRequest(features[i % len(features)], prompt, sot, options))
        handle.future.add_done_callback(partial(_done, finished, i))
    all_done.wait()
    latencies = [d - s for d, s in zip(done, submitted, strict=True)]
    wall = max(done) - start
    stats = model.engine.stats
    return {
        "wall_s": wall,
        "arrivals_s": arrivals[-1],  # when the last request arrived (the offered span)
        "windows_per_s": len(arrivals) / wall,
        "tokens_per_s": sum(lengths) / wall,
        "rtfx": len(arrivals) * CHUNK_LENGTH / wall,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "steps": stats.steps,
        "mean_batch": stats.tokens / max(1, stats.steps),
        "encoder_runs": sum(stats.encoder_batches.values()),
        "admissions": stats.admit_calls,
        # where the engine thread's time went: encoder (GPU events), admissions and steps (host clocks;
        # each includes the inline encoder work it waited for), the rest of the loop (scheduling, idle waits)
        **{key: round(value, 3) for key, value in stats.phases().items()},
    }


def _done(callback: Callable[[int], None], index: int, _future: object) -> None:
    callback(index)


def bench_mixed_model(name: str, cfg: MixedConfig) -> list[dict[str, Any]]:
    device = torch.device(cfg.device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    dims = KNOWN_DIMS[name]
    weights: LoadedWeights = random_weights(name, dtype=dtype, device=device)
    features = _features(min(cfg.requests, 256), dims.n_mels, device)
    workloads = {rate: _workload(cfg, rate) for rate in cfg.rates}  # drawn once: every mode gets the same
    runs: dict[tuple[float, str], list[dict[str, Any]]] = {(rate, mode): [] for rate in cfg.rates for mode in cfg.modes}
    for repeat in range(cfg.repeats):
        for mode in cfg.modes:
            for run in _run_mode(name, mode, cfg, weights, features, workloads):
                runs[run["rate"], mode].append({**run, "repeat": repeat})
    return median_runs(runs)


def _run_mode(
    name: str,
    mode: str,
    cfg: MixedConfig,
    weights: LoadedWeights,
    features: torch.Tensor,
    workloads: dict[float, tuple[list[float], list[int]]],
) -> list[dict[str, Any]]:
    """The workload at each rate (its arrivals and lengths), one after another, on a fresh engine batching as
    `mode` says (one engine for every rate: starting one captures its graphs, seconds on a GPU)."""
    settings = EngineSettings(
        device=cfg.device,
        dtype=cfg.dtype,
        max_slots=cfg.slots,
        reserved_live_slots=0,  # file windows only: every mode gets all `slots` (the reserve left them 60 of 64)
        max_encoder_batch=cfg.max_encoder_batch,
        encode_ahead=mode == "continuous-ahead",
        admission_graphs=cfg.admission_graphs,
    )
    if cfg.admit_batch:
        settings = settings.model_copy(update={"admit_batch": cfg.admit_batch})
    if cfg.encoder_wait_ms is not None:
        settings = settings.model_copy(update={"decoding_encoder_wait_ms": cfg.encoder_wait_ms})
    model = start_engine(weights, settings, static=mode.startswith("static"), padded=mode == "static-padded")
    try:
        # Warm-up: a saturating run of the workload's first 2 × slots lengths, so that what a first run would meet
        # cold (the allocator's pools, the side stream's encoder runs, steps of every bucket, admissions while
        # decoding) is not timed. With 16 windows of equal length, the first timed continuous run on a fresh
        # process ran 137 against 160 windows/s for the second (turbo, H100, bench/NOTES.md, session 33).
        _, lengths = next(iter(workloads.values()))
        warm = lengths[: 2 * cfg.slots]
        _drive(model, features, [0.0] * len(warm), warm)
        runs = []
        for rate, (arrivals, lengths) in workloads.items():
            model.engine.stats = EngineStats()
            run = _drive(model, features, arrivals, lengths)
            runs.append({"model": name, "batching": mode, "rate": rate, **run})
        return runs
    finally:
        model.close()
        del model
        free_device_memory(cfg.device)


def median_runs(runs: Mapping[Any, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each variant's runs (here a rate and mode's) → its median run by windows/s (the lower middle of an even
    count), with every run's windows/s beside it; continuous modes get their ratios to the static modes' median
    runs at the same rate (runs without one: all at one rate)."""
    rows = []
    for mode_runs in runs.values():
        ordered = sorted(mode_runs, key=lambda r: r["windows_per_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["runs"] = len(mode_runs)
        row["windows_per_s_runs"] = [r["windows_per_s"] for r in mode_runs]
        if len(mode_runs) > 1:
            row["spread"] = f"{ordered[0]['windows_per_s']:.1f}-{ordered[-1]['windows_per_s']:.1f}"
            row["all_runs"] = mode_runs
        rows.append(row)
    for baseline, key in (("static", "vs_static"), ("static-padded", "vs_padded")):
        bases = {r.get("rate"): r for r in rows if r["batching"] == baseline}
        for row in rows:
            base = bases.get(row.get("rate"))
            if base and row["batching"].startswith("continuous"):
                row[key] = row["windows_per_s"] / base["windows_per_s"]
    return rows


def run_mixed_bench(cfg: MixedConfig) -> dict[str, Any]:
    rows = [row for name in cfg.models for row in bench_mixed_model(name, cfg)]
    info = device_info(torch.device(cfg.device))
    for row in rows:
        rate = row["rate"]
        row["offered"] = "saturating" if not rate else f"{rate:,.0f}/s" if rate == int(rate) else f"{rate:g}/s"
    title = (
        f"Mixed workload: {cfg.requests} windows, {cfg.min_tokens}-{cfg.max_tokens} tokens each, {cfg.slots} slots, "
        f"on {info.get('gpu', info['device'])}"
        + ("" if cfg.admission_graphs else ", admissions eager")
        + ("" if cfg.encoder_wait_ms is None else f", encoder runs wait up to {cfg.encoder_wait_ms:g} ms")
        + (f"; each mode's median of {cfg.repeats} alternating runs" if cfg.repeats > 1 else "")
    )
    columns = [
        ("model", "model"),
        ("offered", "arrivals"),
        ("batching", "batching"),
        ("windows_per_s", "windows/s"),
        *([("spread", "runs' windows/s")] if cfg.repeats > 1 else []),
        ("tokens_per_s", "tokens/s"),
        ("rtfx", "RTFx"),
        ("p50_s", "p50 s"),
        ("p95_s", "p95 s"),
        ("steps", "steps"),
        ("mean_batch", "seqs/step"),
        ("encoder_runs", "enc runs"),
        ("admissions", "admits"),
        ("encode_s", "enc s"),
        ("admit_s", "admit s"),
        ("step_s", "step s"),
        ("busy_s", "busy s"),
        ("vs_static", "× static"),
        ("vs_padded", "× padded"),
    ]
    table = print_table(rows, columns, title=title)
    payload = {"config": cfg.__dict__, "device": info, "rows": rows, "table": table}
    write_json(cfg.json_path, payload)
    return payload
