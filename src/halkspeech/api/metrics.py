"""Prometheus metrics: HTTP requests by route and status with latency histograms, audio seconds transcribed,
live sessions and turns, the event loop's lag, and, read from the engines at scrape time, queue depth, running
sequences, encoder/decoder batch sizes, a window's queue wait and time in the engine, decoded tokens (rate()
gives tokens/s), admission state and GPU memory; and the Triton APIs' statistics under Triton's own metric names
(`nv_inference_*`), so dashboards built for Triton read them.

Each app has its own CollectorRegistry, so several apps (tests) never share or clash over series.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter as TallyCounter
from collections.abc import Iterator, Sequence

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from halkspeech.api.limits import AdmissionGate
from halkspeech.api.triton_stats import VERSION, TritonStats
from halkspeech.engine.engine import DURATION_BUCKETS, Durations
from halkspeech.engine.pool import ModelPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf"))
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf"))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The app's registry and the series the HTTP layer updates itself."""

    def __init__(self, pool: ModelPool, gate: AdmissionGate, triton: TritonStats) -> None:
        disable_created_metrics()  # no `_created` twin of every counter (process-wide; nothing here wants them)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "halkspeech_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "halkspeech_http_request_duration_seconds",
            "Wall time from the request's arrival to its last response byte, by route template.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "halkspeech_request_stage_seconds",
            "A transcription request's seconds in each stage of its job: admission (the wait for a slot), decode "
            "(its audio, and the URL fetch), transcribe (the model, the engine). Its duration above less these "
            "is the upload, the form's parse and the answer.",
            ("stage",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "halkspeech_audio_seconds",
            "Seconds of audio transcribed (HTTP requests and live turns' finals), by model.",
            ("model",),
            registry=self.registry,
        )
        self.ws_sessions = Gauge(
            "halkspeech_ws_sessions", "Open live connections (/ws and /v1/realtime).", registry=self.registry
        )
        self.ws_turns = Counter(
            "halkspeech_ws_turns", "Live turns started, by model.", ("model",), registry=self.registry
        )
        self.ws_finals = Counter(
            "halkspeech_ws_finals",
            "Live turns' finals sent, by model (turns started minus finals: turns that ended in an error or "
            "whose client left).",
            ("model",),
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "halkspeech_event_loop_lag_seconds",
            "How much later than asked a timer on the event loop woke (one every server.loop_lag_interval_ms): "
            "work that holds the loop, which every request and live connection shares, delays them all.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(pool, gate))
        self.registry.register(TritonCollector(triton))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Reads every loaded engine's stats and the admission gate when Prometheus scrapes."""

    def __init__(self, pool: ModelPool, gate: AdmissionGate) -> None:
        self.pool = pool
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        loaded = self.pool.loaded()
        yield _gauge("halkspeech_models_loaded", "Models loaded now.", [((), len(loaded))])
        queue = GaugeMetricFamily(
            "halkspeech_engine_queue_depth", "Windows waiting for a decoder slot.", labels=["model", "device"]
        )
        running = GaugeMetricFamily(
            "halkspeech_engine_running_sequences", "Sequences in decoder slots.", labels=["model", "device"]
        )
        steps = CounterMetricFamily("halkspeech_engine_steps", "Decode steps run.", labels=["model", "device"])
        tokens = CounterMetricFamily(
            "halkspeech_engine_tokens", "Tokens decoded (rate() is tokens/s).", labels=["model", "device"]
        )
        busy = CounterMetricFamily(
            "halkspeech_engine_busy_seconds", "Seconds the engine loop worked.", labels=["model", "device"]
        )
        windows = CounterMetricFamily(
            "halkspeech_engine_windows",
            "Windows by outcome (admitted, completed, cancelled, failed; rejected: refused with 429, the decode "
            "queue full).",
            labels=["model", "device", "outcome"],
        )
        phases = CounterMetricFamily(
            "halkspeech_engine_phase_seconds",
            "Seconds of the engine loop by phase (encode: encoder time on the device; admit, step, align: the "
            "loop's clock, including device work they waited for).",
            labels=["model", "device", "phase"],
        )
        encoder = HistogramMetricFamily(
            "halkspeech_engine_encoder_batch_size", "Windows per encoder call.", labels=["model", "device"]
        )
        decoder = HistogramMetricFamily(
            "halkspeech_engine_decode_batch_size", "Active sequences per decode step.", labels=["model", "device"]
        )
        queue_wait = HistogramMetricFamily(
            "halkspeech_engine_queue_wait_seconds",
            "A completed window's wait from its submission to its encoder run (the engine's queue).",
            labels=["model", "device"],
        )
        window_time = HistogramMetricFamily(
            "halkspeech_engine_window_seconds",
            "A completed window's time in the engine, from its submission to its result.",
            labels=["model", "device"],
        )
        for item in loaded:
            for model in item.replicas.models:
                engine, labels = model.engine, [item.name, str(model.device)]
                stats = engine.stats
                queue.add_metric(labels, engine.queue_depth)
                running.add_metric(labels, engine.running)
                steps.add_metric(labels, stats.steps)
                tokens.add_metric(labels, stats.tokens)
                busy.add_metric(labels, stats.busy_s)
                for phase, seconds in stats.phases().items():
                    if phase != "busy_s":
                        phases.add_metric([*labels, phase.removesuffix("_s")], seconds)
                for outcome in ("admitted", "completed", "cancelled", "failed", "rejected"):
                    windows.add_metric([*labels, outcome], getattr(stats, outcome))
                encoder.add_metric(labels, *_histogram(stats.encoder_batches))
                decoder.add_metric(labels, *_histogram(stats.decode_batches))
                queue_wait.add_metric(labels, *_duration_buckets(stats.queue_wait))
                window_time.add_metric(labels, *_duration_buckets(stats.window_time))
        yield from (queue, running, steps, tokens, busy, phases, windows, encoder, decoder, queue_wait, window_time)
        gate = self.gate
        yield _gauge("halkspeech_admission_active", "Requests holding a transcription slot.", [((), gate.active)])
        yield _gauge("halkspeech_admission_waiting", "Requests queued for a transcription slot.", [((), gate.waiting)])
        rejected = CounterMetricFamily(
            "halkspeech_admission_rejected",
            "Requests refused with 429 by the admission queue (server.max_queue_size full); a full decode queue's "
            'refusals are halkspeech_engine_windows{outcome="rejected"}.',
        )
        rejected.add_metric([], gate.rejected)
        yield rejected
        yield from _gpu_memory(self.pool.settings.engine.device_index)


#: Triton's metric name → (its help, the statistic: a count, or a duration's ns that Triton gives in µs).
_TRITON_METRICS = {
    "nv_inference_request_success": ("Number of successful inference requests.", ("success", "count")),
    "nv_inference_request_failure": ("Number of failed inference requests.", ("fail", "count")),
    "nv_inference_count": ("Number of inferences performed (a request's rows).", ("inference_count",)),
    "nv_inference_exec_count": ("Number of model executions (one a request here).", ("execution_count",)),
    "nv_inference_request_duration_us": ("Cumulative successful request duration in µs.", ("success", "ns")),
    "nv_inference_queue_duration_us": ("Cumulative wait (admission, engine queue) in µs.", ("queue", "ns")),
    "nv_inference_compute_input_duration_us": ("Cumulative input reading in µs.", ("compute_input", "ns")),
    "nv_inference_compute_infer_duration_us": ("Cumulative transcription in µs.", ("compute_infer", "ns")),
    "nv_inference_compute_output_duration_us": ("Cumulative output writing in µs.", ("compute_output", "ns")),
}


class TritonCollector(Collector):
    """The Triton APIs' statistics (api/triton_stats.py) for every model name called, by Triton's metric names
    and labels (model, version). Triton exposes them as counters without a `_total` suffix; prometheus_client
    would add one to a counter, so they go out untyped and keep the names dashboards query."""

    def __init__(self, stats: TritonStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests received and not yet answered (Triton's counts those not yet executing; here a request's "
            "rows queue and run inside the engine, so this is the load an autoscaler wants).",
            labels=["model", "version"],
        )
        for name, count in sorted(self.stats.in_flight().items()):
            pending.add_metric([name, VERSION], count)
        yield pending
        entries = self.stats.report(self.stats.names())
        for name, (doc, path) in _TRITON_METRICS.items():
            family = UnknownMetricFamily(name, doc, labels=["model", "version"])
            for entry in entries:
                stats = entry["inference_stats"]
                value = entry[path[0]] if len(path) == 1 else stats[path[0]][path[1]]
                family.add_metric([entry["name"], entry["version"]], value / 1000 if path[-1] == "ns" else value)
            yield family


def _gauge(name: str, doc: str, values: list[tuple[tuple[str, ...], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[] if not values or not values[0][0] else ["model"])
    for labels, value in values:
        family.add_metric(list(labels), value)
    return family


def _histogram(tally: TallyCounter[int]) -> tuple[list[tuple[str, float]], float]:
    """An engine Counter {batch size: calls} → cumulative Prometheus buckets and the sum of sizes."""
    for _ in range(5):  # the engine thread may add a key while we copy; try again
        try:
            items = sorted(tally.items())
            break
        except RuntimeError:
            time.sleep(0)
    else:
        items = []
    buckets, cumulative = [], 0
    for bound in _BATCH_BUCKETS:
        cumulative = sum(count for size, count in items if size <= bound)
        buckets.append((str(bound), float(cumulative)))
    buckets.append(("+Inf", float(sum(count for _, count in items))))
    return buckets, float(sum(size * count for size, count in items))


def _duration_buckets(durations: Durations) -> tuple[list[tuple[str, float]], float]:
    """An engine histogram → cumulative Prometheus buckets and the sum (a copy: the engine thread adds on)."""
    counts, total = list(durations.counts), durations.total_s
    bounds = [*(f"{bound:g}" for bound in DURATION_BUCKETS), "+Inf"]
    return [(bound, float(n)) for bound, n in zip(bounds, itertools.accumulate(counts), strict=True)], total


def _gpu_memory(indexes: Sequence[int]) -> Iterator[Metric]:
    """The memory of the GPUs of engine.device_index (as /health): mem_get_info makes a CUDA context, hundreds
    of MB, on a GPU this process has not used, and the others of a shared host are not this server's."""
    if not torch.cuda.is_available():
        return
    family = GaugeMetricFamily(
        "halkspeech_gpu_memory_bytes", "GPU memory by device and kind.", labels=["device", "kind"]
    )
    count = torch.cuda.device_count()
    for index in (i for i in indexes if i < count):
        free, total = torch.cuda.mem_get_info(index)
        device = f"cuda:{index}"
        family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
        family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
        family.add_metric([device, "free"], free)
        family.add_metric([device, "total"], total)
    yield family


class MetricsMiddleware:
    """Counts every HTTP request by route template (not the raw path: ids would explode the series)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
