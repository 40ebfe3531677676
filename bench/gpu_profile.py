"""Where the time goes, and what three candidate changes buy, in one GPU call.

  A. decode-step replay times (after the kernel-count changes) per batch size
  B. kernel list of one eager large-v3 decode step at batch 1 (sum of kernel time vs replay time)
  C. encoder at batch 64 by kernel category (GEMM / attention / elementwise)
  D. (torch.compile'd decode step: measured once and dropped, see NOTES.md; the option no longer exists)
  E. FP8 (e4m3, row-wise scales) GEMMs on the encoder's shapes against fp16
  F. cross-attention at q_len 1 per SDPA backend

Run: PYTHONPATH=src python bench/gpu_profile.py OUT_DIR
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from gpu_explore import fill, make_runner, run_section
from halkspeech.bench.common import cuda_ms
from halkspeech.bench.engine_bench import _features
from halkspeech.engine.batch import DecodeStep
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
DEV = torch.device("cuda")
R: dict = {}


def section(name, fn):
    run_section(R, name, fn, OUT / "profile.json", preview=3000)


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "gemv", "sm90", "cutlass", "xmma", "cublas", "nvjet", "matmul")):
        return "gemm"
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    return "other"


def kernel_table(prof, top: int = 25) -> dict:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name][0] += evt.device_time_total / 1000
            totals[evt.name][1] += 1
    by_cat: dict[str, float] = defaultdict(float)
    for name, (ms, _) in totals.items():
        by_cat[category(name)] += ms
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernels": sum(c for _, c in totals.values()),
        "kernel_ms": sum(ms for ms, _ in totals.values()),
        "by_category_ms": dict(by_cat),
        "top": [(name[:90], round(ms, 4), count) for name, (ms, count) in rows],
    }


def models():
    out = {}
    for name in ("large-v3-turbo", "large-v3"):
        w = random_weights(name, dtype=torch.float16, device=DEV)
        out[name] = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.float16, device=DEV)
        del w
    return out


def step_times(model: Whisper, batches: tuple[int, ...] = (1, 16, 64)) -> dict:
    from halkspeech.model.tokenizer import Tokenizer

    tok = Tokenizer.for_model(model.dims)
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    runner, _ = make_runner(model, 64)
    feats = _features(64, model.dims.n_mels, DEV)
    fill(runner, feats, 64, prompt, sot)
    res = {}
    for b in batches:
        st = DecodeStep(size=b, window=128, active=tuple(range(b)), timestamps=False, sampling=False)
        t0 = time.perf_counter()
        runner.step(st)
        res[f"b{b}_first_call_s"] = round(time.perf_counter() - t0, 2)
        graph = runner.graphs.graphs[(b, 128, False, False)][0]
        res[f"b{b}_replay_ms"] = cuda_ms(graph.replay, repeats=30)
    return res


def eager_step_profile(model: Whisper, batch: int = 1, top: int = 30) -> dict:
    """The kernels of one eager decode step of `batch` slots (after three warm-up steps)."""
    from halkspeech.model.tokenizer import Tokenizer

    tok = Tokenizer.for_model(model.dims)
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    runner, _ = make_runner(model, max(4, batch))
    runner.graphs = None
    fill(runner, _features(batch, model.dims.n_mels, DEV), batch, prompt, sot)
    st = DecodeStep(size=batch, window=128, active=tuple(range(batch)), timestamps=False, sampling=False)
    for _ in range(3):
        runner.step(st)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.step(st)
        torch.cuda.synchronize()
    return kernel_table(prof, top=top)


def encoder_profile(model: Whisper) -> dict:
    x = _features(64, model.dims.n_mels, DEV).half()
    with torch.inference_mode():
        model.encoder(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.encoder(x)
            torch.cuda.synchronize()
    return kernel_table(prof, top=15)


def fp8_gemms() -> dict:
    res = {}
    m = 64 * 1500
    for k, n in ((1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        res[f"{k}x{n}_bf16_ms"] = cuda_ms(lambda: x @ w.t())
        xs = x.abs().amax(dim=1, keepdim=True).float() / 448
        ws = w.abs().amax(dim=1, keepdim=True).float() / 448
        x8 = (x / xs).to(torch.float8_e4m3fn)
        w8 = (w / ws).to(torch.float8_e4m3fn)
        try:
            out = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)
            res[f"{k}x{n}_fp8_ms"] = cuda_ms(
                lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)
            )
            ref = x.float() @ w.float().t()
            res[f"{k}x{n}_fp8_rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
        except Exception as exc:
            res[f"{k}x{n}_fp8"] = repr(exc)[:200]

        def quant():
            s = x.abs().amax(dim=1, keepdim=True).float() / 448
            return (x / s).to(torch.float8_e4m3fn), s

        res[f"{k}x{n}_eager_quant_ms"] = cuda_ms(quant)
    return res


def cross_attention() -> dict:
    res = {}
    for b in (1, 64):
        q = torch.randn(b, 20, 1, 64, device=DEV, dtype=torch.float16)
        k = torch.randn(b, 20, 1500, 64, device=DEV, dtype=torch.float16)
        v = torch.randn_like(k)
        res[f"b{b}_default_ms"] = cuda_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), repeats=30)
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            try:
                with sdpa_kernel(backend):
                    res[f"b{b}_{backend.name}_ms"] = cuda_ms(
                        lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), repeats=30
                    )
            except Exception as exc:
                res[f"b{b}_{backend.name}"] = repr(exc)[:100]
        res[f"b{b}_floor_ms"] = 2 * k.numel() * 2 / 4.3e12 * 1e3
    return res


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ms = models()
    for name, model in ms.items():
        section(f"A step replay {name}", lambda model=model: step_times(model))
    section("B eager step kernels large-v3 b1", lambda: eager_step_profile(ms["large-v3"]))
    section("B eager step kernels turbo b1", lambda: eager_step_profile(ms["large-v3-turbo"]))
    section("C encoder b64 kernels", lambda: encoder_profile(ms["large-v3-turbo"]))
    section("F cross-attention q_len 1", cross_attention)
    section("E fp8 gemms", fp8_gemms)


if __name__ == "__main__":
    main()
