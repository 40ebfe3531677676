"""Where a batch-64 encoder pass goes, and what fusing its memory-bound steps would give (GPU only).

The engine's batch-64 throughput is mostly the encoder (bench/NOTES.md). This times, on random weights of
the large-v3 encoder (turbo's is the same) with random log-mel input:
  eager:      the model's encoder as the engine runs it;
  gelu_fused: fc1's bias and GELU in cuBLASLt's epilogue (torch._addmm_activation; tanh-approximated GELU,
              so its output error against eager is reported too);
  compiled:   each block through torch.compile (inductor fuses the LayerNorms, bias adds, GELU and residual
              adds around cuBLAS GEMMs), with its compile time;
  fused:      the engine's fused path (Encoder.use_fused_kernels: residual adds inside the GEMMs, Triton
              LayerNorms that add the biases back), with the Triton LayerNorm alone against PyTorch's per
              rows-a-program;
and profiles the eager and fused passes by kernel category.

    PYTHONPATH=src python bench/gpu_encoder.py OUT_DIR [--batch 64] [--variants eager,fused]
    PYTHONPATH=src python bench/gpu_encoder.py OUT_DIR --scan 8,12,16,32,64   # eager only: ms a window by batch
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from halkspeech.bench.common import cuda_ms, device_info, print_table
from halkspeech.model import kernels
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import EncoderBlock, Whisper, _merge_heads, _split_heads


def gelu_fused_block(block: EncoderBlock, x: Tensor) -> Tensor:
    """EncoderBlock.forward with fc1 + bias + GELU as one cuBLASLt GEMM (epilogue)."""
    q, k, v = (_split_heads(t, block.heads) for t in block.qkv(block.attn_ln(x)).chunk(3, dim=-1))
    x = x + block.out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
    h = block.mlp_ln(x).flatten(0, 1)
    h = torch._addmm_activation(block.fc1.bias, h, block.fc1.weight.t(), use_gelu=True)
    return x + block.fc2(h).view_as(x)


def functional_block(
    x: Tensor,
    heads: int,
    ln1: tuple[Tensor, Tensor],
    qkv: tuple[Tensor, Tensor],
    out: tuple[Tensor, Tensor],
    ln2: tuple[Tensor, Tensor],
    fc1: tuple[Tensor, Tensor],
    fc2: tuple[Tensor, Tensor],
) -> Tensor:
    """EncoderBlock.forward on explicit weights: compiled once, called with every block's weights."""
    d = x.shape[-1]
    h = F.linear(F.layer_norm(x, (d,), *ln1), *qkv)
    q, k, v = (_split_heads(t, heads) for t in h.chunk(3, dim=-1))
    x = x + F.linear(_merge_heads(F.scaled_dot_product_attention(q, k, v)), *out)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), *ln2), *fc1)), *fc2)


def compiled_block_fn() -> Callable[[EncoderBlock, Tensor], Tensor]:
    compiled = torch.compile(functional_block, dynamic=False)

    def call(block: EncoderBlock, x: Tensor) -> Tensor:
        def pair(m: torch.nn.Module) -> tuple[Tensor, Tensor]:
            return (m.weight, m.bias)  # type: ignore[return-value]

        return compiled(x, block.heads, pair(block.attn_ln), pair(block.qkv), pair(block.out),
                        pair(block.mlp_ln), pair(block.fc1), pair(block.fc2))  # fmt: skip

    return call


def run_blocks(model: Whisper, mel: Tensor, block_fn: Callable[[EncoderBlock, Tensor], Tensor]) -> Tensor:
    enc = model.encoder
    x = F.gelu(enc.conv1(mel))
    x = F.gelu(enc.conv2(x)).transpose(1, 2).contiguous()
    x = x + enc.positional_embedding.to(x.dtype)
    for block in enc.blocks:
        x = block_fn(block, x)  # type: ignore[arg-type]
    return enc.ln_post(x)


def category(name: str) -> str:
    lowered = name.lower()
    for key, words in (
        ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")),
        ("attention", ("sdpa", "flash", "fmha", "attention")),
        ("layernorm", ("layer_norm",)),
        ("gelu", ("gelu",)),
        ("add", ("add",)),
        ("conv", ("conv", "implicit")),
        ("copy", ("copy", "memcpy", "cat")),
    ):
        if any(w in lowered for w in words):
            return key
    return "other"


def profile(fn: Callable[[], object]) -> dict[str, Any]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time_total / 1000  # microseconds → ms
            by[category(event.name)] += ms
            top[event.name[:90]] += ms
    return {
        "by_category_ms": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
        "top_ms": sorted(((k, round(v, 2)) for k, v in top.items()), key=lambda kv: -kv[1])[:12],
    }


def layer_norm_timings(m: int, d: int, device: torch.device) -> dict[str, float]:
    """µs per LayerNorm of [m, d] fp16: PyTorch's, and the Triton one with a shift at several rows a program."""
    x = torch.randn(m, d, device=device, dtype=torch.float16)
    w, b = torch.randn(d, device=device, dtype=torch.float16), torch.randn(d, device=device, dtype=torch.float16)
    shift = torch.randn(d, device=device)
    want = F.layer_norm(x.float() + shift, (d,), w.float(), b.float())
    out = {"torch": cuda_ms(lambda: F.layer_norm(x, (d,), w, b), repeats=20) * 1000}
    for rows in (1, 2, 4, 8, 16):
        error = (kernels.layer_norm(x, w, b, shift=shift, rows=rows).float() - want).abs().max().item()
        timing = cuda_ms(lambda rows=rows: kernels.layer_norm(x, w, b, shift=shift, rows=rows), repeats=20) * 1000
        out[f"triton_rows{rows}"] = timing if error < 0.05 else float("nan")
    return out


def scan(model: Whisper, batches: list[int], out: Path, device: torch.device) -> None:
    """The eager encoder's device time per window at each batch size (the engine's runs while decoding are
    small: is a window dearer in a run of 12 than in one of 64?)."""
    rows = []
    with torch.inference_mode():
        for batch in batches:
            mel = torch.randn(batch, model.dims.n_mels, 3000, device=device, dtype=torch.float16)
            ms = cuda_ms(lambda mel=mel: model.encoder(mel), repeats=7, warmup=2)
            rows.append({"batch": batch, "ms": round(ms, 2), "ms_per_window": round(ms / batch, 3)})
    table = print_table(
        rows,
        [("batch", "batch"), ("ms", "ms"), ("ms_per_window", "ms/window")],
        title=f"Encoder (large-v3 / turbo shapes), fp16, eager, on {device_info(device).get('gpu')}",
    )
    (out / "encoder_scan.json").write_text(json.dumps({"device": device_info(device), "rows": rows, "table": table}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scan", help="comma-separated batches: time the eager encoder at each, nothing else")
    parser.add_argument("--variants", default="eager,gelu_fused,compiled,fused")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    weights = random_weights("large-v3", dtype=torch.float16, device=device)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=torch.float16, device=device)
    del model.decoder
    if args.scan:
        scan(model, [int(b) for b in args.scan.split(",")], args.out, device)
        return
    mel = torch.randn(args.batch, weights.dims.n_mels, 3000, device=device, dtype=torch.float16)
    results: dict[str, Any] = {"device": device_info(device), "batch": args.batch}
    rows = []
    with torch.inference_mode():
        reference = model.encoder(mel[:4]).float()

        def add(name: str, fn: Callable[[Tensor], Tensor], extra: dict[str, Any] | None = None) -> None:
            try:
                out = fn(mel[:4]).float()
                error = ((out - reference).norm() / reference.norm()).item()
                ms = cuda_ms(lambda: fn(mel), repeats=5, warmup=1)
                rows.append(
                    {"variant": name, "ms": ms, "ms_per_window": ms / args.batch, "rel_err": error, **(extra or {})}
                )
            except Exception as exc:  # one failed variant must not cost the others
                traceback.print_exc()
                rows.append({"variant": name, "error": repr(exc)[:200]})
            print(rows[-1], flush=True)

        variants = args.variants.split(",")
        add("eager", model.encoder)
        results["profile_eager"] = profile(lambda: model.encoder(mel))
        print(json.dumps(results["profile_eager"], indent=1), flush=True)
        if "gelu_fused" in variants:
            add("gelu_fused", lambda m: run_blocks(model, m, gelu_fused_block))
        if "compiled" in variants:
            started = time.perf_counter()
            compiled = compiled_block_fn()
            run_blocks(model, mel, compiled)  # compile for this batch
            run_blocks(model, mel[:4], compiled)
            add("compiled", lambda m: run_blocks(model, m, compiled), {"compile_s": time.perf_counter() - started})
            results["profile_compiled"] = profile(lambda: run_blocks(model, mel, compiled))
            print(json.dumps(results["profile_compiled"], indent=1), flush=True)
        if "fused" in variants:
            results["layer_norm_us"] = layer_norm_timings(args.batch * 1500, weights.dims.n_audio_state, device)
            print(results["layer_norm_us"], flush=True)
            model.encoder.use_fused_kernels(True)
            add("fused", model.encoder)
            results["profile_fused"] = profile(lambda: model.encoder(mel))
            print(json.dumps(results["profile_fused"], indent=1), flush=True)
            model.encoder.use_fused_kernels(False)
    results["rows"] = rows
    results["table"] = print_table(
        rows,
        [
            ("variant", "variant"),
            ("ms", "ms"),
            ("ms_per_window", "ms/window"),
            ("rel_err", "rel err"),
            ("compile_s", "compile s"),
        ],
        title=f"Encoder, large-v3 shapes, batch {args.batch}, fp16, on {results['device'].get('gpu')}",
    )
    (args.out / "encoder.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
