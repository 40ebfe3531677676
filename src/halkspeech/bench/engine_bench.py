"""Engine throughput and latency against Hugging Face transformers, in one run on one device.

Both engines get the same random weights of an exact released shape, the same full 30 s log-mel windows
and the same prompt, and decode exactly `tokens` tokens per window (end-of-text suppressed), at each batch
size. Reported: windows/s, decoded tokens/s, RTFx (audio seconds per wall second), and the ratio to HF.
"""

from __future__ import annotations

import logging
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
    median,
    print_table,
    timed,
    write_json,
)
from halkspeech.config import MAX_ENCODER_BATCH, MAX_SLOTS, EngineSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.model.dims import CHUNK_LENGTH, KNOWN_DIMS, N_FRAMES
from halkspeech.model.weights import LoadedWeights, random_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineBenchConfig:
    models: tuple[str, ...] = ("large-v3-turbo", "large-v3")
    batches: tuple[int, ...] = (1, 16, 64, 256)
    tokens: int = 80
    repeats: int = 3
    compare_hf: bool = True
    device: Literal["cuda", "cpu"] = "cuda"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    max_encoder_batch: int = 64
    cuda_graphs: bool = True
    fused_kernels_max_batch: int = EngineSettings.model_fields["fused_kernels_max_batch"].default
    fused_encoder: bool = EngineSettings.model_fields["fused_encoder"].default
    absorbed_cross_min_batch: int = EngineSettings.model_fields["absorbed_cross_min_batch"].default
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_output(self.json_path)
        check_shapes(self.models)
        check_ranges(
            batches=(self.batches, 1, MAX_SLOTS),
            tokens=(self.tokens, 1, MAX_FORCED_TOKENS),
            repeats=(self.repeats, 1, 1000),
            encoder_batch=(self.max_encoder_batch, 1, MAX_ENCODER_BATCH),
            fused_max_batch=(self.fused_kernels_max_batch, 0, MAX_SLOTS),
            absorbed_min_batch=(self.absorbed_cross_min_batch, 0, MAX_SLOTS),
        )


def _features(count: int, n_mels: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Random log-mel-like windows [count, n_mels, 3000] (values in the real range, about ±1.5)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(count, n_mels, N_FRAMES, generator=generator) * 0.5).clamp(-1.5, 1.5).to(device)


class OursRunner:
    """Submits a batch of windows to HalkSpeech's engine and waits for all of them."""

    def __init__(self, model: ModelEngine, features: torch.Tensor, tokens: int) -> None:
        self.model = model
        self.features = features
        self.tokens = tokens
        tok = model.tokenizer
        self.prompt, self.sot_index = tok.decoder_prompt("en", "transcribe", timestamps=False)
        self.options = SamplingOptions(
            max_new_tokens=tokens,
            force_length=True,
            timestamps=False,
            suppress_tokens=tok.suppress_tokens(),
        )
        self.last_encode_ms = 0.0
        self.last_steps = 0

    def __call__(self, batch: int) -> None:
        # one batch, as HF gets it: submitted one by one, the loop may wake after the first few and split the
        # windows between two encoder runs and two admissions (measured: 0.39 s against 0.44–0.47 s for turbo's 64)
        requests = [DecodeRequest(self.features[i], self.prompt, self.sot_index, self.options) for i in range(batch)]
        steps = self.model.engine.stats.steps
        handles = self.model.engine.submit_many(requests)
        results = [h.result() for h in handles]
        self.last_steps = self.model.engine.stats.steps - steps  # one round: tokens - 1 (the prefill gives one)
        bad = [len(r.tokens) for r in results if len(r.tokens) != self.tokens]
        if bad:
            raise RuntimeError(f"expected {self.tokens} tokens per window, got {bad[:4]}")
        self.last_encode_ms = sum(r.encode_ms for r in results)  # each window's share of its run: the batch's


def _row(model: str, engine: str, batch: int, seconds: float, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "engine": engine,
        "batch": batch,
        "seconds": seconds,
        "windows_per_s": batch / seconds,
        "tokens_per_s": batch * tokens / seconds,
        "rtfx": batch * CHUNK_LENGTH / seconds,
    }


def bench_model(name: str, cfg: EngineBenchConfig) -> list[dict[str, Any]]:
    device = torch.device(cfg.device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    dims = KNOWN_DIMS[name]
    features = _features(max(cfg.batches), dims.n_mels, device)
    rows: list[dict[str, Any]] = []
    hf = None
    if cfg.compare_hf:
        from halkspeech.bench.hf_baseline import HFWhisper

        hf = HFWhisper(name, device, dtype)
        prompt, _ = hf.tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
        for batch in cfg.batches:
            try:
                times = timed(partial(hf.generate, features[:batch], prompt, cfg.tokens), device, repeats=cfg.repeats)
                rows.append(_row(name, "hf-transformers", batch, median(times), cfg.tokens))
            except torch.OutOfMemoryError:
                rows.append({"model": name, "engine": "hf-transformers", "batch": batch, "error": "out of memory"})
            free_device_memory(device)
        weights = hf.weights()
    else:
        weights = random_weights(name, dtype=dtype, device=device)
    rows.extend(_bench_ours(name, weights, features, cfg))
    _add_ratios(rows)
    del hf, weights
    free_device_memory(device)
    return rows


def _bench_ours(
    name: str, weights: LoadedWeights, features: torch.Tensor, cfg: EngineBenchConfig
) -> list[dict[str, Any]]:
    settings = EngineSettings(
        device=cfg.device,
        dtype=cfg.dtype,
        max_slots=max(cfg.batches),
        # no live turns here: every slot takes the batch. The server's default reserve (4) made a batch of
        # max_slots windows two rounds, the last 4 windows decoding alone after the rest (turbo's batch 64 in
        # 64 slots: 0.42 s against 0.395 s in 256; large-v3's 1.20 against 1.01 s)
        reserved_live_slots=0,
        max_encoder_batch=cfg.max_encoder_batch,
        cuda_graphs=cfg.cuda_graphs,
        fused_kernels_max_batch=cfg.fused_kernels_max_batch,
        fused_encoder=cfg.fused_encoder,
        absorbed_cross_min_batch=cfg.absorbed_cross_min_batch,
    )
    model = start_engine(weights, settings)
    rows = []
    try:
        run = OursRunner(model, features, cfg.tokens)
        for batch in cfg.batches:
            times = timed(partial(run, batch), torch.device(cfg.device), repeats=cfg.repeats)
            row = _row(name, "halkspeech", batch, median(times), cfg.tokens)
            row["slots"] = model.engine.runner.slots
            row["encode_ms"] = run.last_encode_ms
            row["decode_steps"] = run.last_steps
            rows.append(row)
    finally:
        model.close()
        del model
        free_device_memory(cfg.device)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    hf = {(r["model"], r["batch"]): r for r in rows if r["engine"] == "hf-transformers" and "seconds" in r}
    for row in rows:
        peer = hf.get((row["model"], row["batch"]))
        if row["engine"] == "halkspeech" and peer:
            row["vs_hf"] = peer["seconds"] / row["seconds"]


def run_engine_bench(cfg: EngineBenchConfig) -> dict[str, Any]:
    device = torch.device(cfg.device)
    rows: list[dict[str, Any]] = []
    for name in cfg.models:
        rows.extend(bench_model(name, cfg))
    columns = [
        ("model", "model"),
        ("engine", "engine"),
        ("batch", "batch"),
        ("seconds", "s/batch"),
        ("windows_per_s", "windows/s"),
        ("tokens_per_s", "tokens/s"),
        ("rtfx", "RTFx"),
        ("vs_hf", "× HF"),
        ("error", "note"),
    ]
    info = device_info(device)
    where = info.get("gpu", info["device"])
    title = f"Engine benchmark: {cfg.tokens} forced tokens per 30 s window, {cfg.dtype}, on {where}"
    table = print_table(rows, columns, title=title)
    payload = {"config": cfg.__dict__, "device": info, "rows": rows, "table": table}
    write_json(cfg.json_path, payload)
    return payload
