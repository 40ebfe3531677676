"""Triton's statistics extension for the Whisper model (`GET /v2/models[/{model}[/versions/1]]/stats`, gRPC
`ModelStatistics`), which perf_analyzer reads for the "Server:" part of its report and generic Triton dashboards
poll. Per model name (an example's as called, any other as the server names the model), the requests that
succeeded and failed, and where a successful one's time went, in Triton's terms:

    queue           waiting: for the server's admission (each row is a transcription of its own, under the
                    server's concurrency limit), then in the engine, its windows' time before their encoder
                    run (summed over a row's windows); the longest of its rows' waits
    compute_input   the request's tensors read and checked into rows
    compute_infer   the rows transcribed, less that wait (in the engine's batches, shared with every request)
    compute_output  the response's tensor written
    success, fail   the whole request, from its tensors' first read to its response built (fail: until it
                    failed, a client gone or timed out included)

An execution is one request, its rows its batch size: the engine batches windows across requests, so there is
no per-model execution to count as Triton's dynamic batcher does. Cache hits and misses stay 0 (no cache).
All of it runs on the server's event loop (HTTP and gRPC share it), so no lock is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

VERSION = "1"  # the model's one version, which every Triton module names
_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Clock:
    """One request's phases as it goes, each closed at the moment its method is called (ns)."""

    started: int = field(default_factory=time.perf_counter_ns)
    rows: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    last: int = 0

    def __post_init__(self) -> None:
        self.last = self.started

    def input_read(self, rows: int) -> None:
        self.rows = rows
        self._lap("compute_input")

    def inferred(self, queue_s: float) -> None:
        """compute_infer closes, less the wait the transcription reports (admission, the engine's queue): that
        part is queue."""
        infer = self._lap("compute_infer")
        queue = min(int(queue_s * 1e9), infer)
        self.phases["compute_infer"] = infer - queue
        self.phases["queue"] = queue

    def output_written(self) -> None:
        self._lap("compute_output")

    def elapsed(self) -> int:
        return time.perf_counter_ns() - self.started

    def _lap(self, phase: str) -> int:
        now = time.perf_counter_ns()
        self.phases[phase], self.last = now - self.last, now
        return self.phases[phase]


@dataclass
class _Batch:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class _Model:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    phases: dict[str, Duration] = field(default_factory=lambda: {phase: Duration() for phase in _PHASES})
    inference_count: int = 0  # rows
    execution_count: int = 0  # requests
    last_inference_ms: int = 0  # since the epoch
    batches: dict[int, _Batch] = field(default_factory=dict)
    in_flight: int = 0  # requests received and not yet answered

    def succeeded(self, clock: Clock) -> None:
        self.success.add(clock.elapsed())
        for phase, stat in self.phases.items():
            stat.add(clock.phases.get(phase, 0))
        self.inference_count += clock.rows
        self.execution_count += 1
        batch = self.batches.setdefault(clock.rows, _Batch())
        for phase in ("compute_input", "compute_infer", "compute_output"):
            getattr(batch, phase).add(clock.phases.get(phase, 0))
        self.last_inference_ms = int(time.time() * 1000)

    def failed(self, clock: Clock) -> None:
        self.fail.add(clock.elapsed())
        self.last_inference_ms = int(time.time() * 1000)


class TritonStats:
    """The server's statistics by model name (triton_model.stats_name: the examples' names and the pool's, so
    they are few)."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}

    @contextlib.contextmanager
    def measure(self, model: str) -> Iterator[Clock]:
        """Time one request to `model`: a success when the block ends, a failure when it raises (cancelled
        included, for a client that went away)."""
        clock = Clock()
        entry = self._models.setdefault(model, _Model())
        entry.in_flight += 1
        try:
            yield clock
        except BaseException:
            entry.failed(clock)
            raise
        else:
            entry.succeeded(clock)
        finally:
            entry.in_flight -= 1

    def in_flight(self) -> dict[str, int]:
        """Requests received and not yet answered, by model name."""
        return {name: model.in_flight for name, model in self._models.items()}

    def names(self) -> set[str]:
        """The model names with statistics so far."""
        return set(self._models)

    def report(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Triton's `model_stats`, one entry a name (zeros for a name not called yet), in the JSON of the HTTP
        API; the gRPC API parses the same into its ModelStatistics."""
        return [self._entry(name, self._models.get(name) or _Model()) for name in sorted(names)]

    @staticmethod
    def _entry(name: str, model: _Model) -> dict[str, Any]:
        inference = {phase: stat.as_json() for phase, stat in model.phases.items()}
        inference |= {"success": model.success.as_json(), "fail": model.fail.as_json()}
        inference |= {"cache_hit": Duration().as_json(), "cache_miss": Duration().as_json()}
        batches = [
            {"batch_size": size} | {phase: getattr(batch, phase).as_json() for phase in _PHASES[1:]}
            for size, batch in sorted(model.batches.items())
        ]
        return {
            "name": name,
            "version": VERSION,
            "last_inference": model.last_inference_ms,
            "inference_count": model.inference_count,
            "execution_count": model.execution_count,
            "inference_stats": inference,
            "batch_stats": batches,
        }
