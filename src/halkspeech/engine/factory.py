"""Builds a running engine for one model from its weights and the engine settings: device, dtype, memory
plan (how many slots fit), CUDA-graph buckets."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from halkspeech.config import EngineSettings
from halkspeech.engine.aligner import ALIGN_GRAPH_WIDTH
from halkspeech.engine.engine import Engine
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.engine.scheduler import Scheduler
from halkspeech.errors import InvalidRequest
from halkspeech.model.cache import KVCache
from halkspeech.model.dims import ModelDims
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
WINDOW_BUCKETS = (64, 128, 256, 448)
CPU_SLOTS = 16
ALIGN_GRAPH_ROWS = 4
MAX_GRAPH_ALIGNMENT_HEADS = 32  # the catalog's most: large-v2's 23
MAX_AUTO_WORD_PROCESSES = 4


@dataclass
class ModelEngine:
    """A loaded model and the engine serving it: everything the transcription layer needs."""

    name: str
    dims: ModelDims
    tokenizer: Tokenizer
    engine: Engine
    device: torch.device
    dtype: torch.dtype
    alignment_heads: tuple[tuple[int, int], ...]
    source: str
    word_processes: int = 0  # worker processes for the host half of word timing (0: a thread in this process)
    int8: bool = False  # int8 weights (model/int8.py) over a float32 model

    @property
    def precision(self) -> str:
        """What /health and the logs call the weights: int8, float16, float32 or bfloat16."""
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")

    def close(self) -> None:
        self.engine.stop()


class Replicas:
    """One model's engines, one per GPU (engine.device_index). A request (a file, a WebSocket turn) takes
    one with `take` and runs all its windows there, so its audio, VAD and log-mel stay on that GPU: the one with
    the least work per decoder slot, its windows running or queued plus one for each request holding it (so
    requests that have not yet submitted their windows count too)."""

    def __init__(self, models: Sequence[ModelEngine]) -> None:
        if not models:
            raise ValueError("no engines")
        self.models = tuple(models)
        self._holders = dict.fromkeys(range(len(self.models)), 0)  # requests holding each engine
        self._lock = threading.Lock()  # the CLI's and the server's event loops, and the pool's worker threads

    @property
    def first(self) -> ModelEngine:
        """The engine that speaks for all in /health and the logs: the same model, tokenizer and precision."""
        return self.models[0]

    @property
    def alive(self) -> bool:
        """Any engine running: requests go to the live ones, and /health says "degraded" while one is down
        (reloading the model would fail what the live engines are decoding)."""
        return any(m.engine.alive for m in self.models)

    @property
    def busy(self) -> bool:
        return any(self._holders.values()) or any(m.engine.running or m.engine.queue_depth for m in self.models)

    def pick(self) -> ModelEngine:
        """The least loaded live engine (the first on a tie), without holding it."""
        with self._lock:
            return self.models[self._least_loaded()]

    def take(self) -> ModelEngine:
        """The least loaded live engine, held until `release`: requests that start together spread out."""
        with self._lock:
            index = self._least_loaded()
            self._holders[index] += 1
            return self.models[index]

    def release(self, model: ModelEngine) -> None:
        with self._lock:
            index = self._index(model)
            self._holders[index] = max(0, self._holders[index] - 1)

    def __contains__(self, model: object) -> bool:
        return any(m is model for m in self.models)

    def _index(self, model: ModelEngine) -> int:
        return next(i for i, m in enumerate(self.models) if m is model)  # by identity: one engine each

    def _least_loaded(self) -> int:
        live = [i for i, m in enumerate(self.models) if m.engine.alive] or list(range(len(self.models)))
        return min(live, key=self._load)

    def _load(self, index: int) -> float:
        engine = self.models[index].engine
        return (engine.running + engine.queue_depth + self._holders[index]) / engine.runner.slots

    def close(self) -> None:
        for model in self.models:
            model.close()


def resolve_devices(setting: str, indexes: Sequence[int] = (0,)) -> tuple[torch.device, ...]:
    """The devices to run engines on: each GPU index asked for, or the one CPU. InvalidRequest names an index
    this machine does not have (torch would fail later, at the first copy, with less to say)."""
    first = resolve_device(setting, indexes[0])
    if first.type != "cuda":
        return (first,)
    count = torch.cuda.device_count()
    missing = [i for i in indexes if i >= count]
    if missing:
        raise InvalidRequest(
            f"engine.device_index asks for GPU {missing[0]}, but this machine has {count} "
            f"(indexes 0 to {count - 1}; CUDA_VISIBLE_DEVICES decides which are seen)"
        )
    return tuple(torch.device("cuda", i) for i in indexes)


def resolve_device(setting: str, index: int = 0) -> torch.device:
    if setting == "auto":
        return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest("device 'cuda' was asked for but no CUDA GPU is available")
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The float type the weights load as; int8 loads float32 on a CPU and quantizes after (start_engine)."""
    if setting == "int8" and device.type == "cpu":
        return torch.float32
    if setting == "int8":
        log.warning("int8 weights run on the CPU only; the GPU uses float16")
    if setting in ("auto", "int8"):
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 is slow and inexact on CPU; using float32")
        return torch.float32
    return dtype


def word_processes(setting: int, device: torch.device) -> int:
    """`word_timing_processes` → a count: -1 means a quarter of the cores (at most MAX_AUTO_WORD_PROCESSES) on a
    GPU, and 0 (a thread in this process) on a CPU, where the engine's torch calls release the GIL while they
    compute."""
    if setting >= 0:
        return setting
    return max(1, min(MAX_AUTO_WORD_PROCESSES, (os.cpu_count() or 4) // 4)) if device.type == "cuda" else 0


def encoder_graph_batch(settings: EngineSettings) -> int:
    """Encoder runs of up to this many windows replay a captured graph (0: none; the runner also needs a GPU)."""
    if not (settings.encoder_graphs and settings.cuda_graphs):
        return 0
    return min(settings.decoding_encoder_batch, settings.max_encoder_batch)


def task_prompt_widths(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Lengths of the plain task prompts (with and without timestamps): the admission graphs' widths."""
    return tuple(sorted({len(tokenizer.decoder_prompt("en", "transcribe", timestamps=t)[0]) for t in (False, True)}))


def admission_graph_batch(settings: EngineSettings) -> int:
    """Admissions of up to this many windows replay a captured graph (0: none; the runner also needs a GPU)."""
    if not (settings.admission_graphs and settings.cuda_graphs):
        return 0
    return min(settings.decoding_encoder_batch, settings.max_encoder_batch)


def alignment_graph_rows(settings: EngineSettings, heads: int) -> int:
    """Word-timing passes of up to this many windows replay a captured graph (0: none; the runner also needs a
    GPU). Four windows keep the graphs' pool small (see plan_slots); each pass is then a dozen launches. The pool
    grows with the alignment heads: past MAX_GRAPH_ALIGNMENT_HEADS (OpenAI's fallback for a checkpoint naming
    none is every head of the decoder's second half, 320 for large-v2's shape: a ~50 GB pool) the passes run
    eagerly instead, and the decoder keeps that memory for its slots."""
    if not (settings.alignment_graphs and settings.cuda_graphs) or heads > MAX_GRAPH_ALIGNMENT_HEADS:
        return 0
    return ALIGN_GRAPH_ROWS


def plan_slots(
    dims: ModelDims,
    dtype: torch.dtype,
    device: torch.device,
    settings: EngineSettings,
    alignment_heads: int = 0,
    *,
    audio: bool = False,
) -> int:
    """Decoder slots that fit in `gpu_memory_fraction` of free GPU memory, after the weights (already
    loaded) and a reserve for encoder activations and the decode step's [B, V] temporaries; `audio`: each slot
    keeps its audio too (KVCache.cross_e)."""
    if device.type != "cuda":
        return settings.max_slots or CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # encoder: the MLP's [E, 1500, 4D] activations, several alive at once; decode: ~8 [B, V] float32 temps
    encoder_reserve = settings.max_encoder_batch * dims.n_audio_ctx * 4 * dims.n_audio_state * itemsize * 3
    # the encoder graphs' own pool (activations as above, for their largest run) and one output per run size
    g = encoder_graph_batch(settings)
    encoder_reserve += g * dims.n_audio_ctx * 4 * dims.n_audio_state * itemsize * 3
    encoder_reserve += g * (g + 1) // 2 * dims.n_audio_ctx * dims.n_audio_state * itemsize
    # the admission graphs: their audio input, one layer's cross keys/values [a, 1500, 2D], the prefill's
    # gathered keys and values [a, 1500, D] each, at their largest run
    encoder_reserve += admission_graph_batch(settings) * dims.n_audio_ctx * dims.n_audio_state * itemsize * 5
    # the alignment graphs' pool, in units of their largest pass's float32 scores [R, heads, 256, 1500]: measured
    # 25 units for turbo's 6 heads (0.93 GB), 20 for large-v3's 10 (1.21 GB; bench/gpu_align_graphs.py, H100)
    rows = alignment_graph_rows(settings, alignment_heads)
    encoder_reserve += rows * alignment_heads * ALIGN_GRAPH_WIDTH * dims.n_audio_ctx * 4 * 26
    budget = free * settings.gpu_memory_fraction - encoder_reserve - (1 << 30)
    per_slot = KVCache.bytes_per_slot(dims, dtype, audio=audio) + 8 * dims.n_vocab * 4
    slots = max(1, int(budget // per_slot))
    if settings.max_slots:
        slots = min(slots, settings.max_slots)
    fitting = [b for b in BATCH_BUCKETS if b <= slots]
    return fitting[-1] if fitting else slots


def start_engines(weights: LoadedWeights, settings: EngineSettings) -> Replicas:
    """An engine on each device of `engine.device`/`device_index` (started one after another, as each plans its
    slots from the memory left); if one fails, those already started stop."""
    started: list[ModelEngine] = []
    devices = resolve_devices(settings.device, settings.device_index)
    if len(devices) < len(settings.device_index):
        log.info("engine.device_index %s: the CPU runs one engine", list(settings.device_index))
    try:
        for device in devices:
            started.append(start_engine(weights, settings, device=device))
    except BaseException:
        for model in started:
            model.close()
        raise
    return Replicas(started)


def start_engine(
    weights: LoadedWeights,
    settings: EngineSettings,
    *,
    device: torch.device | None = None,
    static: bool = False,
    padded: bool = False,
) -> ModelEngine:
    """Load the weights onto the device (default: the first of engine.device_index), size the caches, start
    the engine thread.

    `static` (benchmarks only) turns continuous batching off: a batch runs to its end before the next; with
    `padded`, its finished rows keep running too (textbook static batching, as a padded batch)."""
    if settings.gil_switch_ms:
        sys.setswitchinterval(settings.gil_switch_ms / 1000)
    device = device or resolve_device(settings.device, settings.device_index[0])
    # the current device while the model loads and its graphs are captured: streams, graph pools and Triton's
    # launches without an explicit device go to it (the engine thread sets it too: Runner.stream_context)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return _start_engine(weights, settings, device, static=static, padded=padded)


def _start_engine(
    weights: LoadedWeights, settings: EngineSettings, device: torch.device, *, static: bool, padded: bool
) -> ModelEngine:
    dtype = resolve_dtype(settings.dtype, device)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=dtype, device=device)
    if settings.dtype == "int8" and device.type == "cpu":
        model.quantize_int8()
    if model.decoder.use_fused_kernels(settings.fused_kernels_max_batch):
        log.info("decode steps of up to %d slots use the fused kernels", settings.fused_kernels_max_batch)
    if model.encoder.use_fused_kernels(settings.fused_encoder):
        log.info("the encoder's residual adds run inside its GEMMs")
    if model.decoder.use_absorbed_cross(settings.absorbed_cross_min_batch):
        log.info(
            "decode steps of %d slots or more read the audio in their cross-attention",
            settings.absorbed_cross_min_batch,
        )
    tokenizer = Tokenizer.for_model(weights.dims)
    heads = len(weights.alignment_heads)
    slots = plan_slots(weights.dims, dtype, device, settings, heads, audio=model.decoder.absorbed is not None)
    graphs = settings.cuda_graphs and device.type == "cuda"
    align_rows = alignment_graph_rows(settings, heads) if graphs else 0
    if graphs and settings.alignment_graphs and not align_rows:
        log.info("word timing runs eagerly: %d alignment heads (graphs: %d at most)", heads, MAX_GRAPH_ALIGNMENT_HEADS)
    runner = Runner(
        model,
        TokenIds.from_tokenizer(tokenizer, weights.dims.n_vocab),
        slots=slots,
        max_encoder_batch=settings.max_encoder_batch,
        cuda_graphs=graphs,
        alignment_heads=weights.alignment_heads,
        encode_ahead=settings.encode_ahead,
        encoder_graph_batch=encoder_graph_batch(settings),
        admission_graph_batch=admission_graph_batch(settings) if graphs else 0,
        admission_widths=task_prompt_widths(tokenizer),
        alignment_graph_rows=align_rows,
        alignment_prompt_len=len(tokenizer.decoder_prompt("en", "transcribe", timestamps=False)[0]),
    )
    scheduler = Scheduler(
        slots,
        eot=tokenizer.eot,
        timestamp_begin=tokenizer.timestamp_begin,
        n_text_ctx=weights.dims.n_text_ctx,
        n_vocab=weights.dims.n_vocab,
        max_encoder_batch=settings.max_encoder_batch,
        max_queue=settings.max_queue,
        batch_buckets=(*(b for b in BATCH_BUCKETS if b < slots), slots) if graphs else None,
        window_buckets=WINDOW_BUCKETS if graphs else None,
        static=static,
        padded=padded,
        admit_batch=settings.admit_batch,
        admit_wait_s=settings.admit_wait_ms / 1000,
        reserved_slots=settings.reserved_live_slots if slots > 4 * settings.reserved_live_slots else 0,
    )
    if graphs and settings.warmup_graphs and scheduler.batch_buckets:
        started = time.perf_counter()
        count = runner.warm_up(scheduler.batch_buckets, WINDOW_BUCKETS)
        log.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - started)
    engine = Engine(
        runner,
        scheduler,
        batch_window_ms=settings.batch_window_ms,
        decoding_encoder_batch=settings.decoding_encoder_batch,
        decoding_encoder_wait_ms=settings.decoding_encoder_wait_ms,
    ).start()
    loaded = ModelEngine(
        name=weights.name,
        dims=weights.dims,
        tokenizer=tokenizer,
        engine=engine,
        device=device,
        dtype=dtype,
        alignment_heads=weights.alignment_heads,
        source=weights.source,
        word_processes=word_processes(settings.word_timing_processes, device),
        int8=model.int8,
    )
    log.info("engine for %s on %s (%s): %d slots", weights.name, device, loaded.precision, slots)
    return loaded
