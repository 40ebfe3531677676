"""Where a decode step over many slots spends its time: the kernels of one captured step, by kind.

Steps of more than `fused_kernels_max_batch` slots (16) run the plain path: cuBLAS projections, cuDNN's
cross-attention, the Triton self-attention and PyTorch's LayerNorms, adds and GELU. This script captures that
step as the engine does (a CUDA graph of `Decoder.step`, random weights of the exact shapes, every slot at
position 40 of 448, random cross-attention keys and values), times its replay, and sorts the kernels of
profiled replays into kinds, beside the floor the bytes it must read put on it.

  PYTHONPATH=src python bench/gpu_step_kernels.py OUT.json [MODELS] [BATCHES]     # on the GPU
  (defaults: large-v3,large-v3-turbo and 32,64,128)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from halkspeech.bench.common import cuda_ms
from halkspeech.model.cache import KVCache
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

POSITION = 40


def kind(name: str) -> str:
    n = name.lower()
    if "attention_kernel" in n:
        return "self-attention (Triton)"
    if any(k in n for k in ("flash", "fmha", "sdpa", "cudnn")):
        return "cross-attention (SDPA)"
    if any(k in n for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "projections (cuBLAS)"
    if "layer_norm" in n:
        return "LayerNorm"
    if "gelu" in n:
        return "GELU"
    if "add" in n:
        return "adds"
    if "index" in n or "copy" in n:
        return "cache write / copies"
    return "other"


def step_graph(model: Whisper, cache: KVCache, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`Decoder.step` of slots 0..batch-1 (random tokens, every slot at POSITION) captured after two warm-up
    calls on a side stream (Triton compiles, cuBLAS picks its kernels); returns the graph and its logits."""
    device = cache.self_kv.device
    tokens = torch.randint(0, 50_000, (batch,), device=device)
    positions = torch.full((batch,), POSITION, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model.decoder.step(tokens, positions, cache, 128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        logits = model.decoder.step(tokens, positions, cache, 128)
    return graph, logits


def measure(name: str, batches: list[int]) -> dict:
    device = torch.device("cuda")
    weights = random_weights(name, dtype=torch.float16, device=device)
    dims = weights.dims
    model = Whisper.from_openai_state_dict(dims, weights.state_dict, dtype=torch.float16, device=device)
    del weights
    model.decoder.use_fused_kernels(16)  # the engine's default: steps over 16 slots take the plain path
    cache = KVCache.allocate(dims, max(batches), dtype=torch.float16, device=device)
    cache.cross_k.normal_()
    cache.cross_v.normal_()
    cache.self_kv.normal_()
    decoder_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    out: dict = {"decoder_weight_bytes": decoder_bytes}
    bandwidth = 3.35e12 if "H100" in torch.cuda.get_device_name() else 4.8e12
    for batch in batches:
        graph, _ = step_graph(model, cache, batch)
        replay = cuda_ms(graph.replay, repeats=50, warmup=5)
        cross_bytes = 2 * cache.cross_k[:, :batch].numel() * 2
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                ms = evt.device_time_total / 1000 / 5
                by_kind[kind(evt.name)][0] += ms
                by_kind[kind(evt.name)][1] += 1 / 5
                by_name[evt.name[:100]][0] += ms
                by_name[evt.name[:100]][1] += 1 / 5
        kernel_ms = sum(ms for ms, _ in by_kind.values())
        out[f"b{batch}"] = {
            "replay_ms": round(replay, 4),
            "kernel_ms": round(kernel_ms, 4),
            "kernels": round(sum(c for _, c in by_kind.values())),
            "floor_ms": round((cross_bytes + decoder_bytes) / bandwidth * 1000, 4),
            "cross_floor_ms": round(cross_bytes / bandwidth * 1000, 4),
            "by_kind": {
                k: [round(ms, 4), round(c)] for k, (ms, c) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])
            },
            "top": [
                (n, round(ms, 4), round(c)) for n, (ms, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]
            ],
        }
        del graph
        print(
            f"{name} b{batch}: replay {replay:.3f} ms, kernels {kernel_ms:.3f} ms, floor "
            f"{out[f'b{batch}']['floor_ms']:.3f} ms",
            flush=True,
        )
        for k, (ms, c) in out[f"b{batch}"]["by_kind"].items():
            print(f"    {k:28s} {ms:7.3f} ms  {c:5d} kernels", flush=True)
    return out


def main() -> None:
    path = Path(sys.argv[1])
    models = (sys.argv[2] if len(sys.argv) > 2 else "large-v3,large-v3-turbo").split(",")
    batches = [int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "32,64,128").split(",")]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in models:
        results[name] = measure(name, batches)
        path.write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
