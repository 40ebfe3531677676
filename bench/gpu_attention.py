"""The encoder's self-attention under each of PyTorch's SDPA backends, alone and inside the whole encoder
(GPU only). The engine leaves the encoder's attention to PyTorch's choice (cuDNN's kernel on Hopper); this asks
whether another backend is faster at Whisper's shape, [batch, 20 heads, 1500 frames, 64].

For each dtype and batch: every backend's time on the same q, k, v (CUDA events, median of 20), its TFLOP/s
(4 · batch · heads · 1500² · 64 FLOPs) and its largest difference from the math backend's float32 result;
then the large-v3 encoder (random weights; turbo's is the same) under PyTorch's choice and under each backend.

    PYTHONPATH=src python bench/gpu_attention.py OUT.json [--batches 1,16,64] [--dtypes float16,bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from halkspeech.bench.common import cuda_ms, device_info, print_table
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

HEADS, FRAMES, HEAD_DIM = 20, 1500, 64
BACKENDS = {
    "default": None,  # PyTorch's own choice, as the engine runs it
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def chosen(backend: SDPBackend | None) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def attention_rows(batches: list[int], dtypes: list[torch.dtype]) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for batch in batches:
            q, k, v = (torch.randn(batch, HEADS, FRAMES, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
            with sdpa_kernel([SDPBackend.MATH]):
                reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            flops = 4 * batch * HEADS * FRAMES**2 * HEAD_DIM
            for name, backend in BACKENDS.items():
                row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "backend": name}
                try:
                    with chosen(backend):
                        out = F.scaled_dot_product_attention(q, k, v)
                        ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats=20, warmup=3)
                    row |= {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                            "max_err": round(float((out.float() - reference).abs().max()), 5)}  # fmt: skip
                except RuntimeError as exc:  # a backend that does not take this shape or dtype
                    row["error"] = str(exc).splitlines()[0][:120]
                rows.append(row)
    return rows


def encoder_rows(batch: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The whole large-v3 encoder at `batch`, under each backend, with the engine's fused kernels on."""
    device = torch.device("cuda")
    weights = random_weights("large-v3", dtype=dtype, device=device)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=dtype, device=device)
    del model.decoder
    fused = model.encoder.use_fused_kernels(True)
    mel = torch.randn(batch, weights.dims.n_mels, 3000, device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        for name, backend in BACKENDS.items():
            row: dict[str, Any] = {"encoder_batch": batch, "backend": name, "fused": fused}
            try:
                with chosen(backend):
                    row["ms"] = round(cuda_ms(lambda: model.encoder(mel), repeats=5, warmup=2), 1)
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--encoder-batch", type=int, default=64)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    results: dict[str, Any] = {"device": device_info(torch.device("cuda"))}
    try:
        results["attention"] = attention_rows(batches, dtypes)
        print_table(results["attention"], [(k, k) for k in ("dtype", "batch", "backend", "ms", "tflops", "max_err",
                                                              "error")], title="encoder self-attention")  # fmt: skip
        results["encoder"] = encoder_rows(args.encoder_batch, dtypes[0])
        print_table(results["encoder"], [(k, k) for k in ("encoder_batch", "backend", "fused", "ms", "error")],
                    title=f"large-v3 encoder, {dtypes[0]}")  # fmt: skip
    except Exception:
        results["error"] = traceback.format_exc()
        print(results["error"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
