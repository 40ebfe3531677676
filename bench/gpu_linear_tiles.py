"""Can the fused decode-step kernels take steps of 17..64 slots from cuBLAS? One GPU call:

  T. every tiling of `kernels.linear` (within shared memory, enough programs) for each of the decoder's
     projections at 64 rows, with its fusions (LayerNorm before qkv, cross q, fc1 and the logits; GELU
     after fc1; the residual after out, cross out and fc2; the new key and value into the cache from qkv),
     against the PyTorch ops the plain step runs for it (LayerNorm, cuBLAS GEMM with bias, add / GELU /
     index_copy). Weights are read from HBM (distinct copies > 150 MB, L2 is 50 MB), timed as CUDA graphs.
  A. the cross-attention of 32 and 64 rows: SDPA (the plain step) against the Triton decode attention's splits
  S. decode-step graph replays at 32 and 64 slots, both models: the plain path (fused_max_batch 16) against
     the fused path (64) with T's best tiles and A's best splits, and the two paths' logits compared

The Triton kernels compile first in parallel worker processes (into Triton's on-disk cache), so that the timing
process only loads them.

  PYTHONPATH=src python bench/gpu_linear_tiles.py OUT.json [WORKERS [quick]]     # on the GPU

OUT.json's "best_tiles" (and "best_splits") then serve a preview of the engine with them, before they are made
the defaults:

  PYTHONPATH=src python bench/gpu_linear_tiles.py --engine OUT.json halkspeech bench engine --no-hf ...
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gpu_step_kernels import step_graph
from halkspeech.model import kernels

ROWS = (64,)  # the tiles' rows (a 64-row tiling serves 17..64); the steps run at STEPS slots
STEPS = (32, 64)
D = 1280
# (N, K, LayerNorm before, GELU after, residual added, key/value written, bias, float32 out)
SHAPES: dict[str, tuple[int, int, bool, bool, bool, bool, bool, bool]] = {
    "qkv": (3 * D, D, True, False, False, True, True, False),
    "out": (D, D, False, False, True, False, True, False),  # also cross out
    "cross_q": (D, D, True, False, False, False, True, False),
    "fc1": (4 * D, D, True, True, False, False, True, False),
    "fc2": (D, 4 * D, False, False, True, False, True, False),
    "logits": (51866, D, True, False, False, False, False, True),
}
QUICK = "quick" in sys.argv[2:]
PER_LAYER = {"qkv": 1, "out": 2, "cross_q": 1, "fc1": 1, "fc2": 1}  # logits: once a step
# a step's projection by its (N, K); cross q has out's shape and takes out's tiles; any other: the logits
BY_SHAPE = {SHAPES[name][:2]: name for name in ("qkv", "out", "fc1", "fc2")}


def grid(name: str, m: int) -> list[kernels.LinearConfig]:
    n, k = SHAPES[name][:2]
    out = []
    # QUICK (a third argument "quick"): the short grid, for a call with little device time left
    sizes = (
        ((16, 64), (16, 32, 64, 128), (128, 256), (4,), (3,))
        if QUICK
        else ((16, 32, 64), (16, 32, 64, 128), (128, 256), (4, 8), (2, 4))
    )
    for bm, bn, bk, warps, stages, split in itertools.product(*sizes, (1, 2, 4, 8)):
        programs = -(-n // bn) * -(-m // bm) * split
        if bm > m or stages * (bm + bn) * bk * 2 > 160_000 or k // split < bk or not 48 <= programs <= 4096:
            continue
        if warps == 8 and bm * bn < 64 * 64:
            continue
        if name == "logits" and (split > 1 or bn < 32):
            continue
        out.append(kernels.LinearConfig(bm, bn, bk, warps, stages, split))
    return out


class Case:
    """One projection at m rows: inputs, cold weight copies, and its plain and fused forms."""

    def __init__(self, name: str, m: int, copies_bytes: int = 150_000_000) -> None:
        n, k, ln, gelu, res, kv, bias, f32 = SHAPES[name]
        dev, half = torch.device("cuda"), dict(device="cuda", dtype=torch.float16)
        self.name, self.m = name, m
        self.copies = max(2, -(-copies_bytes // (n * k * 2)))
        self.ws = [torch.randn(n, k, **half) * k**-0.5 for _ in range(self.copies)]
        self.x = torch.randn(m, k, **half)
        self.bias = torch.randn(n, **half) * 0.1 if bias else None
        self.ln = (torch.rand(k, **half) + 0.5, torch.randn(k, **half) * 0.1) if ln else None
        self.gelu, self.f32 = gelu, f32
        self.res = torch.randn(m, n, **half) if res else None
        self.cache = torch.zeros(m * 448, 2 * D, **half) if kv else None
        self.rows = torch.randperm(m * 448, device=dev)[:m] if kv else None

    def plain(self) -> torch.Tensor:
        for w in self.ws:
            h = F.layer_norm(self.x, (self.x.shape[1],), *self.ln) if self.ln else self.x
            y = F.linear(h, w, self.bias)
            if self.gelu:
                y = F.gelu(y)
            if self.res is not None:
                y = self.res + y
            if self.cache is not None:
                self.cache.index_copy_(0, self.rows, y[:, D:])
            if self.f32:
                y = y.float()
        return y

    def fused(self, cfg: kernels.LinearConfig) -> torch.Tensor:
        kv = (self.cache, self.rows, D) if self.cache is not None else None
        for w in self.ws:
            y = kernels.linear(
                self.x, w, self.bias, ln=self.ln, gelu=self.gelu, residual=self.res,
                out_dtype=torch.float32 if self.f32 else None, kv=kv, config=cfg,
            )  # fmt: skip
        return y


def compile_worker(index: int, workers: int) -> None:
    jobs = [(name, m, cfg) for name in SHAPES for m in ROWS for cfg in grid(name, m)]
    cases: dict[tuple[str, int], Case] = {}
    for name, m, cfg in jobs[index::workers]:
        case = cases.setdefault((name, m), Case(name, m, copies_bytes=0))
        try:
            case.fused(cfg)
        except Exception as exc:  # a tiling Triton cannot build: the timing pass skips it too
            print(name, m, cfg, repr(exc)[:120], flush=True)
    torch.cuda.synchronize()


def bench_us(fn: Any, copies: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=15)) * 1000 / copies


def swept_config(best: dict[tuple[str, int], kernels.LinearConfig]) -> Any:
    """kernels.linear_config with the swept 64-row tiles for 17+ rows (a 1280-wide model's projections)."""
    tuned = kernels.linear_config

    def linear_config(m: int, n: int, k: int) -> kernels.LinearConfig:
        if m <= 16:
            return tuned(m, n, k)
        name = BY_SHAPE.get((n, k), "logits")
        return best.get((name, 64)) or tuned(m, n, k)  # a shape whose sweep found no tiling: the untuned tiles

    return linear_config


def engine_preview(tiles_json: str, argv: list[str]) -> int:
    """Runs the CLI (argv after "halkspeech") with OUT.json's tiles and cross-attention splits patched in."""
    from halkspeech.cli import main as cli
    from halkspeech.model import whisper

    found = json.loads(Path(tiles_json).read_text())
    best = {(name, 64): kernels.LinearConfig(**cfg) for name, cfg in found["best_tiles"].items()}
    kernels.linear_config = swept_config(best)  # type: ignore[assignment]
    whisper.CROSS_SPLITS = int(found.get("best_splits", {}).get("64", whisper.CROSS_SPLITS))
    print("preview: tiles", found["best_tiles"], "cross splits", whisper.CROSS_SPLITS, flush=True)
    return cli(argv)


def tiles(results: dict[str, Any], save: Any) -> dict[tuple[str, int], kernels.LinearConfig]:
    best: dict[tuple[str, int], kernels.LinearConfig] = {}
    for name in SHAPES:
        for m in ROWS:
            case = Case(name, m)
            ref = case.plain().float()
            row: dict[str, Any] = {"plain_us": bench_us(case.plain, case.copies), "configs": len(grid(name, m))}
            timed = []
            for cfg in grid(name, m):
                try:
                    err = (case.fused(cfg).float() - ref).abs().max().item()
                    if not err < 0.05 * max(1.0, ref.abs().max().item()):
                        print(name, m, cfg, "error", err, flush=True)
                        continue
                    timed.append((bench_us(partial(case.fused, cfg), case.copies), cfg, err))
                except Exception as exc:
                    print(name, m, cfg, repr(exc)[:120], flush=True)
            timed.sort(key=lambda t: t[0])
            n, k = SHAPES[name][:2]
            if not timed:  # no tiling built and matched: the steps run this shape with the untuned tiles
                best[(name, m)] = kernels.linear_config(m, n, k)
                results[f"m{m} {name}"] = {**row, "best": None}
                print(f"m{m} {name}: no tiling passed", flush=True)
                continue
            best[(name, m)] = timed[0][1]
            row.update(
                best_us=timed[0][0], best=str(timed[0][1]), best_err=timed[0][2],
                best_TBps=n * k * 2 / timed[0][0] / 1e6, top5=[(round(t[0], 2), str(t[1])) for t in timed[:5]],
            )  # fmt: skip
            results[f"m{m} {name}"] = row
            results.setdefault("best_tiles", {})[name] = dataclasses.asdict(timed[0][1])
            print(f"m{m} {name}: plain {row['plain_us']:.2f} us, fused {row['best_us']:.2f} us ({row['best_TBps']:.2f} "
                  f"TB/s) {row['best']}", flush=True)  # fmt: skip
            save()  # each shape as it is done: a call cut short keeps what it measured
            del case
    for m in ROWS:
        if any(results[f"m{m} {s}"]["best"] is None for s in PER_LAYER):
            continue
        plain = sum(results[f"m{m} {s}"]["plain_us"] * c for s, c in PER_LAYER.items())
        fused = sum(results[f"m{m} {s}"]["best_us"] * c for s, c in PER_LAYER.items())
        results[f"m{m} per layer"] = {"plain_us": plain, "fused_us": fused}
        print(f"m{m} a layer's projections: plain {plain:.1f} us, fused {fused:.1f} us", flush=True)
    return best


def cross_attention(results: dict[str, Any]) -> dict[int, tuple[int, int, int]]:
    import triton.testing

    from halkspeech.model import whisper

    engine = (whisper.CROSS_SPLITS, 128, 2)  # the fused step's call: its splits, decode_attention's default blocks
    best = {}
    heads, dh, layers = 20, 64, 4
    for b in STEPS:
        q = torch.randn(b, heads, dh, device="cuda", dtype=torch.float16)
        cross = [torch.randn(2, b, heads, 1500, dh, device="cuda", dtype=torch.float16) for _ in range(layers)]

        def sdpa(q=q, cross=cross):
            return [F.scaled_dot_product_attention(q[:, :, None], c[0], c[1]) for c in cross]

        ref = sdpa()[0][:, :, 0].reshape(b, -1).float()
        row: dict[str, Any] = {"sdpa_us": triton.testing.do_bench_cudagraph(sdpa, rep=20) * 1000 / layers}
        timed = []
        for sp, bn, wp in itertools.product((1, 2, 4, 8, 16), (64, 128), (2, 4)):

            def fn(sp=sp, bn=bn, wp=wp, q=q, cross=cross):
                return [kernels.decode_attention(q, c[0], c[1], splits=sp, block_n=bn, warps=wp) for c in cross]

            if (fn()[0].float() - ref).abs().max().item() > 0.01:
                continue
            timed.append((triton.testing.do_bench_cudagraph(fn, rep=20) * 1000 / layers, (sp, bn, wp)))
        timed.sort(key=lambda t: t[0])
        best[b] = timed[0][1] if timed else engine  # none matched SDPA: the steps keep the engine's splits
        results.setdefault("best_splits", {})[str(b)] = best[b][0]
        row["triton_top5_us"] = [(round(t, 2), c) for t, c in timed[:5]]
        row["triton_16_splits_us"] = next((t for t, c in timed if c == engine), None)  # 16: CROSS_SPLITS today
        results[f"cross b{b}"] = row
        print(f"cross b{b}: sdpa {row['sdpa_us']:.1f} us, triton best {timed[:1]}", flush=True)
    return best


def steps(results: dict[str, Any], best: dict[tuple[str, int], kernels.LinearConfig], splits: dict, save: Any) -> None:
    from halkspeech.bench.common import cuda_ms
    from halkspeech.model import whisper
    from halkspeech.model.cache import KVCache
    from halkspeech.model.weights import random_weights
    from halkspeech.model.whisper import Whisper

    tuned, default_splits = kernels.linear_config, whisper.CROSS_SPLITS
    linear_config = swept_config(best)

    for model_name in ("large-v3", "large-v3-turbo"):  # large-v3 first: its steps are the ones that matter
        w = random_weights(model_name, dtype=torch.float16, device="cuda")
        model = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.float16, device="cuda")
        del w
        cache = KVCache.allocate(model.dims, max(STEPS), dtype=torch.float16, device="cuda")
        for t in (cache.cross_k, cache.cross_v, cache.self_kv):
            t.normal_()
        for b in STEPS:
            row: dict[str, Any] = {}
            logits = {}
            for label, fused_max, cfg_fn, cross_splits in (
                ("plain", 16, tuned, default_splits),
                ("fused, 16 cross splits", 64, linear_config, default_splits),
                ("fused, tuned cross splits", 64, linear_config, splits[b][0]),
            ):
                kernels.linear_config = cfg_fn  # type: ignore[assignment]
                whisper.CROSS_SPLITS = cross_splits
                model.decoder.fused_max_batch = fused_max
                torch.manual_seed(b)  # the same tokens for every variant
                graph, out = step_graph(model, cache, b)
                graph.replay()
                torch.cuda.synchronize()
                logits[label] = out.clone()
                row[f"{label} ms"] = cuda_ms(graph.replay, repeats=50, warmup=5)
                del graph
            kernels.linear_config = tuned  # type: ignore[assignment]
            whisper.CROSS_SPLITS = default_splits
            for label in list(logits)[1:]:
                row[f"{label} max abs diff"] = (logits[label] - logits["plain"]).abs().max().item()
                same = (logits[label].argmax(-1) == logits["plain"].argmax(-1)).sum().item()
                row[f"{label} argmax equal"] = f"{same}/{b}"
            row["max abs logit"] = logits["plain"].abs().max().item()
            results[f"step {model_name} b{b}"] = row
            print(f"step {model_name} b{b}: {json.dumps(row)}", flush=True)
            save()
        del model, cache
        torch.cuda.empty_cache()


def main() -> None:
    if sys.argv[1] == "--compile":  # a worker: --compile INDEX WORKERS [quick]
        compile_worker(int(sys.argv[2]), int(sys.argv[3]))
        return
    if sys.argv[1] == "--engine":  # --engine OUT.json halkspeech ARGS...
        if sys.argv[3:4] != ["halkspeech"]:
            sys.exit("usage: gpu_linear_tiles.py --engine OUT.json halkspeech ARGS...")
        sys.exit(engine_preview(sys.argv[2], sys.argv[4:]))
    path = Path(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    started = time.perf_counter()
    quick = ["quick"] if QUICK else []  # the workers compile the same grid
    procs = [
        subprocess.Popen([sys.executable, __file__, "--compile", str(i), str(workers), *quick]) for i in range(workers)
    ]
    results["compile_rc"] = [p.wait() for p in procs]
    results["compile_s"] = time.perf_counter() - started
    print(f"compiled in {results['compile_s']:.0f} s", flush=True)

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    best = tiles(results, save)
    splits = cross_attention(results)
    save()
    steps(results, best, splits, save)
    results["seconds"] = time.perf_counter() - started
    save()


if __name__ == "__main__":
    main()
