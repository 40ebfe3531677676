"""The fused decode-step kernels (model/kernels.py) on the GPU, in one call:

  A. correctness: fused against plain step logits (fp16, random large-v3-turbo weights) at several batch sizes
  B. `linear` tile configurations against PyTorch's LN + GEMM + epilogue ops, CUDA-graph timed, per shape
  C. decode-step graph replay (with sampling) with fused_max_batch 0, 16 and 64, per batch size, both models
  D. kernels in one eager turbo step at batch 1, plain and fused
  E. one 30 s window with 80 forced tokens through the whole engine, plain against fused, both models
  F. the HF peer at batch 1 and 16 under its default attention and under flash/efficient only
  P. programmatic dependent launch (kernels.set_pdl) off and on, twice each: fused step graph replay at batch 1,
     4, 16 of both models, and 20 greedy steps of 16 slots against the plain path
  Q. one window through the engine (as E, fused only) with PDL off and on, twice each
  K. batch 64 (turbo's throughput case): kernels of one eager step (fused_max_batch 0 and 16), and cross-attention over 64 rows,
     SDPA against the Triton decode attention's splits, block and warps

Run: PYTHONPATH=src python bench/gpu_fused.py OUT_DIR [sections, e.g. ABCDEF]
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from gpu_explore import fill, make_runner, run_section
from gpu_profile import eager_step_profile
from halkspeech.bench.common import cuda_ms, device_info, median, timed
from halkspeech.bench.engine_bench import EngineBenchConfig, _features, run_engine_bench
from halkspeech.engine.batch import DecodeStep
from halkspeech.model import kernels
from halkspeech.model.cache import KVCache
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
WANT = sys.argv[2] if len(sys.argv) > 2 else "ABCDEF"
DEV = torch.device("cuda")
R: dict = {"device": device_info(DEV)}


def section(name, fn):
    if name[0] in WANT:
        run_section(R, name, fn, OUT / "fused.json", preview=4000)


_models: dict[str, Whisper] = {}


def model(name: str) -> Whisper:
    if name not in _models:
        w = random_weights(name, dtype=torch.float16, device=DEV)
        _models[name] = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.float16, device=DEV)
    return _models[name]


def correctness() -> dict:
    m = model("large-v3-turbo")
    dims = m.dims
    out = {}
    cache = KVCache.allocate(dims, 16, dtype=torch.float16, device=DEV)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        audio = m.encoder(_features(16, dims.n_mels, DEV).half())
        m.decoder.fill_cross(audio, cache, torch.arange(16, device=DEV))
        tokens = torch.randint(0, 50000, (16, 6), generator=g).to(DEV)
        m.decoder.prefill(tokens, cache, torch.arange(16, device=DEV))
        for b in (1, 4, 16):
            t = torch.randint(0, 50000, (b,), generator=g).to(DEV)
            pos = torch.full((b,), 6, device=DEV)
            m.decoder.fused_max_batch = 0
            plain = m.decoder.step(t, pos, cache, 64)
            m.decoder.fused_max_batch = 64
            fused = m.decoder.step(t, pos, cache, 64)
            m.decoder.fused_max_batch = 0
            out[f"b{b}"] = {
                "max_abs_diff": (plain - fused).abs().max().item(),
                "max_abs": plain.abs().max().item(),
                "argmax_equal": f"{int((plain.argmax(-1) == fused.argmax(-1)).sum())}/{b}",
            }
    return out


TUNED: dict[tuple[int, int], kernels.LinearConfig] = {}
# the decoder's projections of large-v3 / turbo (D = 1280) and the logits: (N, K)
SHAPES = {"qkv": (3840, 1280), "out": (1280, 1280), "fc1": (5120, 1280), "fc2": (1280, 5120), "logits": (51866, 1280)}


def cold_weights(n: int, k: int) -> tuple[list[torch.Tensor], int]:
    """Distinct [n, k] weights, > 150 MB in all, so a pass over them reads HBM, not L2 (50 MB), as a real step
    does (turbo's decoder and logits are 317 MB)."""
    copies = max(2, -(-150_000_000 // (n * k * 2)))
    return [torch.randn(n, k, device=DEV, dtype=torch.float16) * k**-0.5 for _ in range(copies)], copies


def linear_options(name: str, m: int, n: int, k: int) -> dict:
    """`kernels.linear`'s options for one of SHAPES as the decoder step calls it (LayerNorm before qkv, fc1 and
    the logits; GELU after fc1; a residual after out and fc2; float32 logits with no bias)."""
    half = dict(device=DEV, dtype=torch.float16)
    return dict(
        bias=None if name == "logits" else torch.randn(n, **half),
        ln=(torch.ones(k, **half), torch.zeros(k, **half)) if name in ("qkv", "fc1", "logits") else None,
        gelu=name == "fc1",
        residual=torch.randn(m, n, **half) if name in ("out", "fc2") else None,
        out_dtype=torch.float32 if name == "logits" else None,
    )


def linear_configs() -> dict:
    """Each shape timed over enough distinct weight copies (> 150 MB) that W comes from HBM, not L2, as in a
    real step (turbo's decoder and logits are 317 MB; L2 is 50 MB). The best tiles go to TUNED (used by C)."""
    grid = [
        kernels.LinearConfig(block_m=16, block_n=bn, block_k=bk, warps=wp, stages=st, split_k=sk)
        for bn, bk, wp, st, sk in itertools.product((16, 32, 64), (128, 256), (4,), (2, 4), (1, 2, 4, 8))
    ]
    res: dict = {}
    for name, (n, k) in SHAPES.items():
        ws, copies = cold_weights(n, k)
        for m_rows in (1, 16):
            x = torch.randn(m_rows, k, device=DEV, dtype=torch.float16)
            kw = linear_options(name, m_rows, n, k)

            def plain():
                for w in ws:
                    h = F.layer_norm(x, (k,), *kw["ln"]) if kw["ln"] else x
                    y = F.linear(h, w, kw["bias"])
                    if kw["gelu"]:
                        y = F.gelu(y)
                    if kw["residual"] is not None:
                        y = kw["residual"] + y
                    if kw["out_dtype"]:
                        y = y.to(kw["out_dtype"])
                return y

            def fused(cfg):
                for w in ws:
                    y = kernels.linear(x, w, config=cfg, **kw)
                return y

            ref = plain()
            row = {"copies": copies, "plain_us": triton.testing.do_bench_cudagraph(plain, rep=30) * 1000 / copies}
            timings = []
            candidates = (
                grid if m_rows == 1 else [c for _, c in sorted(res[f"m1_{name}"]["_all"], key=lambda t: t[0])[:8]]
            )
            for cfg in candidates:
                try:
                    err = (fused(cfg).float() - ref.float()).abs().max().item()
                    us = triton.testing.do_bench_cudagraph(partial(fused, cfg), rep=30) * 1000 / copies
                except Exception as exc:
                    print(name, cfg, repr(exc)[:160], flush=True)
                    continue
                timings.append((us, cfg, err))
            timings.sort(key=lambda t: t[0])
            best = timings[0]
            row.update(
                best_us=best[0], best_cfg=str(best[1]), best_err=best[2], best_GBps=n * k * 2 / (best[0] * 1e-6) / 1e9
            )
            row["top5"] = [(round(t[0], 2), str(t[1])) for t in timings[:5]]
            row["_all"] = [(t[0], t[1]) for t in timings]
            res[f"m{m_rows}_{name}"] = row
            if m_rows == 1:
                TUNED[(n, k)] = best[1]
            print(
                f"m{m_rows} {name}: plain {row['plain_us']:.1f} us, best {best[0]:.1f} us {best[1]} ({row['best_GBps']:.0f} GB/s)",
                flush=True,
            )
    for row in res.values():
        row.pop("_all")
    return res


def tuned_config(m: int, n: int, k: int) -> kernels.LinearConfig:
    if m == 1 and (n, k) in TUNED_M1:
        return TUNED_M1[(n, k)]
    return TUNED.get((n, k)) or DEFAULT_CONFIG(m, n, k)


TUNED_M1: dict[tuple[int, int], kernels.LinearConfig] = {}
ATTN: dict[str, tuple[int, int, int]] = {}  # "self"/"cross" → (splits, block_n, warps)
_decode_attention = kernels.decode_attention


def tuned_attention(q, keys, values, *, lengths=None, length_offset=0, splits=1, block_n=64, warps=4):
    splits, block_n, warps = ATTN.get("self" if lengths is not None else "cross", (splits, block_n, warps))
    return _decode_attention(
        q, keys, values, lengths=lengths, length_offset=length_offset, splits=splits, block_n=block_n, warps=warps
    )


def gemv_and_attention() -> dict:
    """H: one-row tiles (BLOCK_M = 1, no tensor cores) for M = 1, and the attention kernel's splits, block and
    warps, each against the current default, cold (distinct copies > 150 MB). Best go to TUNED_M1 / ATTN."""
    res: dict = {}
    for name, (n, k) in SHAPES.items():
        ws, copies = cold_weights(n, k)
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        kw = linear_options(name, 1, n, k)

        def run(cfg):
            for w in ws:
                y = kernels.linear(x, w, config=cfg, **kw)
            return y

        ref = run(DEFAULT_CONFIG(1, n, k)).float()
        timings = [
            (
                triton.testing.do_bench_cudagraph(partial(run, DEFAULT_CONFIG(1, n, k)), rep=30) * 1000 / copies,
                "default",
            )
        ]
        for bn, bk, wp, sk in itertools.product((4, 8, 16), (256, 512), (4, 8), (1, 2, 4)):
            cfg = kernels.LinearConfig(block_m=1, block_n=bn, block_k=bk, warps=wp, stages=3, split_k=sk)
            try:
                err = (run(cfg).float() - ref).abs().max().item()
                if err > 0.05:
                    print(name, cfg, "error", err, flush=True)
                    continue
                timings.append((triton.testing.do_bench_cudagraph(partial(run, cfg), rep=30) * 1000 / copies, cfg))
            except Exception as exc:
                print(name, cfg, repr(exc)[:160], flush=True)
        timings.sort(key=lambda t: t[0])
        default_us = next(t for t, c in timings if c == "default")
        if timings[0][1] != "default":
            TUNED_M1[(n, k)] = timings[0][1]
        res[name] = {"default_us": default_us, "top5": [(round(t, 2), str(c)) for t, c in timings[:5]]}
        print(f"gemv {name}: default {default_us:.1f} us, best {timings[0][0]:.1f} {timings[0][1]}", flush=True)
        del ws
    # attention: cross over 1500 keys, self at position 84 in the [S, 448, 2, H, Dh] cache; 32 layers' worth
    heads, dh, layers = 20, 64, 32
    q = torch.randn(1, heads, dh, device=DEV, dtype=torch.float16)
    cross = [torch.randn(2, 1, heads, 1500, dh, device=DEV, dtype=torch.float16) for _ in range(layers)]
    selfkv = [torch.randn(1, 448, 2, heads, dh, device=DEV, dtype=torch.float16) for _ in range(layers)]
    positions = torch.full((1,), 84, device=DEV)
    for kind in ("cross", "self"):
        if kind == "cross":
            args = [(c[0], c[1]) for c in cross]
            extra = {}
            sdpa = lambda: [F.scaled_dot_product_attention(q[:, :, None], k_, v_) for k_, v_ in args]
            grid = itertools.product((2, 4, 8, 16), (32, 64, 128), (1, 2, 4))
        else:
            args = [(c[:, :, 0].transpose(1, 2), c[:, :, 1].transpose(1, 2)) for c in selfkv]
            extra = {"lengths": positions, "length_offset": 1}
            mask = torch.zeros(1, 1, 1, 128, device=DEV, dtype=torch.float16)
            mask[..., 85:] = float("-inf")
            sdpa = lambda: [
                F.scaled_dot_product_attention(q[:, :, None], k_[:, :, :128], v_[:, :, :128], attn_mask=mask)
                for k_, v_ in args
            ]
            grid = itertools.product((1, 2), (32, 64, 128), (1, 2, 4))
        row = {"sdpa_us": triton.testing.do_bench_cudagraph(sdpa, rep=30) * 1000 / layers}
        ref = sdpa()[0][:, :, 0].reshape(1, -1).float()
        timings = []
        for sp, bn, wp in grid:
            fn = lambda sp=sp, bn=bn, wp=wp: [
                _decode_attention(q, k_, v_, splits=sp, block_n=bn, warps=wp, **extra) for k_, v_ in args
            ]
            try:
                err = (fn()[0].float() - ref).abs().max().item()
                if err > 0.01:
                    print(kind, sp, bn, wp, "error", err, flush=True)
                    continue
                timings.append((triton.testing.do_bench_cudagraph(fn, rep=30) * 1000 / layers, (sp, bn, wp)))
            except Exception as exc:
                print(kind, sp, bn, wp, repr(exc)[:160], flush=True)
        timings.sort(key=lambda t: t[0])
        ATTN[kind] = timings[0][1]
        row["top5"] = [(round(t, 2), c) for t, c in timings[:5]]
        res[f"attention_{kind}"] = row
        print(f"attention {kind}: sdpa {row['sdpa_us']:.1f} us, best {timings[0][0]:.1f} {timings[0][1]}", flush=True)
    return res


DEFAULT_CONFIG = kernels.linear_config


def step_replay(name: str) -> dict:
    m = model(name)
    tok = Tokenizer.for_model(m.dims)
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    feats = _features(64, m.dims.n_mels, DEV)
    res = {}
    for fused in (0, 16, 64):
        m.decoder.fused_max_batch = fused
        runner, _ = make_runner(m, 64)
        fill(runner, feats, 64, prompt, sot)
        for b in (1, 4, 16, 64):
            st = DecodeStep(size=b, window=128, active=tuple(range(b)), timestamps=False, sampling=False)
            runner.step(st)
            graph = runner.graphs.graphs[runner._step_key(b, 128, False, False)][0]
            res[f"fused{fused}_b{b}_ms"] = cuda_ms(graph.replay, repeats=50)
        del runner
        torch.cuda.empty_cache()
    m.decoder.fused_max_batch = 0
    return res


def runner_tokens() -> dict:
    """30 graph-replayed steps of 16 slots, fused kernels and sampler against the plain path, same windows."""
    m = model("large-v3-turbo")
    tok = Tokenizer.for_model(m.dims)
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    feats = _features(16, m.dims.n_mels, DEV)
    runs = {}
    for fused in (0, 16):
        m.decoder.fused_max_batch = fused
        runner, _ = make_runner(m, 16)
        fill(runner, feats, 16, prompt, sot)
        st = DecodeStep(size=16, window=64, active=tuple(range(16)), timestamps=False, sampling=False)
        runs[fused] = [runner.step(st).tokens for _ in range(30)]
        del runner
    m.decoder.fused_max_batch = 0
    per_row = [[runs[f][s][r] for s in range(30)] for f in (0, 16) for r in range(16)]
    same_rows = sum(per_row[r] == per_row[16 + r] for r in range(16))
    first_diff = [next((s for s in range(30) if runs[0][s][r] != runs[16][s][r]), None) for r in range(16)]
    return {"rows_identical": f"{same_rows}/16", "first_differing_step": first_diff}


def step_kernels(batch: int = 1) -> dict:
    m = model("large-v3-turbo")
    res = {}
    for fused in (0, 16 if batch > 16 else 64):
        m.decoder.fused_max_batch = fused
        res[f"fused{fused}" if fused else "plain"] = eager_step_profile(m, batch, top=40)
    m.decoder.fused_max_batch = 0
    return res


def pdl_variant(name: str, pdl: bool, reference: list | None) -> tuple[dict, list]:
    """A fresh 16-slot runner with PDL on or off: 20 greedy steps of 16 slots (compared with `reference`),
    then graph replay of the step at batch 1, 4 and 16 (each from the same state)."""
    kernels.set_pdl(pdl)
    m = model(name)
    tok = Tokenizer.for_model(m.dims)
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=False)
    m.decoder.fused_max_batch = 16 if reference is not None else 0
    runner, _ = make_runner(m, 16)
    fill(runner, _features(16, m.dims.n_mels, DEV), 16, prompt, sot)
    saved = runner.graphs.snapshot()
    full = DecodeStep(size=16, window=64, active=tuple(range(16)), timestamps=False, sampling=False)
    tokens = [runner.step(full).tokens for _ in range(20)]
    row = {}
    if reference is not None:
        row["tokens_equal_plain"] = f"{sum(a == b for a, b in zip(tokens, reference, strict=True))}/20 steps"
        for b in (1, 4, 16):
            runner.graphs.restore(saved)
            st = DecodeStep(size=b, window=64, active=tuple(range(b)), timestamps=False, sampling=False)
            runner.step(st)
            graph = runner.graphs.graphs[runner._step_key(b, 64, False, False)][0]
            row[f"b{b}_ms"] = cuda_ms(graph.replay, repeats=50)
    m.decoder.fused_max_batch = 0
    del runner
    torch.cuda.empty_cache()
    kernels.set_pdl(True)
    return row, tokens


def pdl_variants() -> dict:
    res: dict = {"launch_options": str(kernels.launch_options(DEV))}
    for name in ("large-v3-turbo", "large-v3"):
        _, reference = pdl_variant(name, True, None)  # the plain step (PyTorch kernels, fused sampler)
        for pdl in (False, True, False, True):
            row, _ = pdl_variant(name, pdl, reference)
            res.setdefault(f"{name} pdl {'on' if pdl else 'off'}", []).append(row)
            print(name, pdl, row, flush=True)
        _models.pop(name)
    return res


def engine_b1_pdl() -> dict:
    _models.clear()
    torch.cuda.empty_cache()
    res = {}
    for pdl in (False, True, False, True):
        kernels.set_pdl(pdl)
        cfg = EngineBenchConfig(batches=(1,), repeats=7, compare_hf=False, fused_kernels_max_batch=16)
        for row in run_engine_bench(cfg)["rows"]:
            res.setdefault(f"{row['model']}_pdl_{'on' if pdl else 'off'}_ms", []).append(row["seconds"] * 1000)
    kernels.set_pdl(True)
    return res


def batch64() -> dict:
    kinds = step_kernels(64)
    res: dict = {"step_kernels_b64": kinds["plain"], "step_kernels_b64_fused16": kinds["fused16"]}
    _models.clear()
    torch.cuda.empty_cache()
    heads, dh, layers, b = 20, 64, 4, 64
    q = torch.randn(b, heads, dh, device=DEV, dtype=torch.float16)
    cross = [torch.randn(2, b, heads, 1500, dh, device=DEV, dtype=torch.float16) for _ in range(layers)]
    sdpa = lambda: [F.scaled_dot_product_attention(q[:, :, None], c[0], c[1]) for c in cross]
    ref = sdpa()[0][:, :, 0].reshape(b, -1).float()
    res["cross_sdpa_us"] = triton.testing.do_bench_cudagraph(sdpa, rep=50) * 1000 / layers
    timings = []
    for sp, bn, wp in itertools.product((1, 2, 4, 8), (32, 64, 128), (1, 2, 4, 8)):
        fn = lambda sp=sp, bn=bn, wp=wp: [
            kernels.decode_attention(q, c[0], c[1], splits=sp, block_n=bn, warps=wp) for c in cross
        ]
        try:
            err = (fn()[0].float() - ref).abs().max().item()
            if err > 0.01:
                print("cross b64", sp, bn, wp, "error", err, flush=True)
                continue
            timings.append((triton.testing.do_bench_cudagraph(fn, rep=50) * 1000 / layers, (sp, bn, wp)))
        except Exception as exc:
            print("cross b64", sp, bn, wp, repr(exc)[:160], flush=True)
    timings.sort(key=lambda t: t[0])
    res["cross_triton_top5_us"] = [(round(t, 1), c) for t, c in timings[:5]]
    res["cross_bytes_per_layer_mb"] = 2 * b * heads * 1500 * dh * 2 / 1e6
    print(f"cross b64: sdpa {res['cross_sdpa_us']:.1f} us, best {timings[0]}", flush=True)
    return res


def engine_b1() -> dict:
    _models.clear()
    torch.cuda.empty_cache()
    res = {}
    for name in ("large-v3-turbo", "large-v3"):
        for fused in (0, 16):
            cfg = EngineBenchConfig(
                models=(name,), batches=(1,), repeats=7, compare_hf=False, fused_kernels_max_batch=fused
            )
            rows = run_engine_bench(cfg)["rows"]
            res[f"{name}_{'fused' if fused else 'plain'}_ms"] = rows[0]["seconds"] * 1000
            res[f"{name}_{'fused' if fused else 'plain'}_encode_ms"] = rows[0].get("encode_ms")
    return res


def hf_attention() -> dict:
    from halkspeech.bench.hf_baseline import HFWhisper

    _models.clear()
    torch.cuda.empty_cache()
    hf = HFWhisper("large-v3-turbo", DEV)
    prompt, _ = hf.tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    feats = _features(16, hf.dims.n_mels, DEV)
    res = {}
    for label, backends in (
        ("default", None),
        ("flash_efficient", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
        ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
    ):
        for b in (1, 16):
            fn = partial(hf.generate, feats[:b], prompt, 80)
            if backends is None:
                times = timed(fn, DEV, repeats=3)
            else:
                with sdpa_kernel(backends):
                    times = timed(fn, DEV, repeats=3)
            res[f"{label}_b{b}_s"] = median(times)
    return res


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    if "T" in WANT:  # C, D and E with B's and H's best tiles (shapes of D = 1280: large-v3 and turbo)
        kernels.linear_config = tuned_config
        kernels.decode_attention = tuned_attention
    section("H gemv and attention", gemv_and_attention)
    section("A correctness", correctness)
    section("B linear configs", linear_configs)
    section("C step replay turbo", lambda: step_replay("large-v3-turbo"))
    section("C step replay large-v3", lambda: step_replay("large-v3"))
    section("D step kernels turbo b1", step_kernels)
    section("G runner tokens", runner_tokens)
    section("E engine b1", engine_b1)
    section("F hf attention", hf_attention)
    section("P pdl", pdl_variants)
    section("Q engine b1 pdl", engine_b1_pdl)
    section("K batch 64", batch64)
