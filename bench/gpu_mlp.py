"""Experiment: the decoder's MLP at decode batch sizes in one launch instead of two, for large-v3's batch-1 step.

A fused batch-1 step is 8 launches a layer (model/kernels.py), each with a fixed cost of a few µs beyond its
bytes (bench/NOTES.md, "Where the batch-1 time goes"); the persistent kernels of sessions 8 and 9 kept every
phase and were no faster. This takes the other way: fewer phases. `mlp` splits the hidden units over the
programs, so a program's slice of fc1 feeds its slice of fc2 without leaving the program: each one computes
h = GELU(LN(x) @ W1[slice]ᵀ + b1[slice]) for its BLOCK_H hidden units and adds h @ W2[:, slice]ᵀ into a float32
workspace; for each tile of output columns, the last program to add its share finishes the tile (b2 and the
residual x added, stored in x's dtype, workspace and count left zero), as the split-K `linear` does. W2's
slice loads do not depend on h, so they are in flight beside W1's; the hidden activations never reach memory.
Cost: BLOCK_M × D float32 atomics a program (1,280 × 160 programs a row for large-v3), so this is for small M.

  check         (CPU, Triton's interpreter) the kernel against PyTorch, odd shapes, float32 and float16
  OUT.json      (GPU) A. outputs against the two `linear` launches (large-v3's shape) and patched decode-step
                logits against unpatched (turbo, large-v3); B. 32 layers' MLPs (distinct weights, 840 MB, so
                read from HBM) in one CUDA graph, two launches against every tiling of a grid, per layer;
                C. one 30 s window with 80 forced tokens through the engine at batch 1, unpatched and patched
                (the best tiling of B at steps of ≤ MAX_M rows), alternating twice, both models

Run: PYTHONPATH=src python bench/gpu_mlp.py check       (~1 minute for the kernel, ~6 more for the step)
     PYTHONPATH=src python bench/gpu_mlp.py OUT.json BA   then   ... OUT2.json C '{"block_h": 32, ...}'
     (C's eight engine starts may not fit in the same 10-minute call as B; the JSON is B's best tiling)
Written in session 12 with no device lent: `check` passes on the CPU; the GPU sections are not yet run.
"""

from __future__ import annotations

import os
import sys

if sys.argv[1:2] == ["check"]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import itertools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from halkspeech.model import kernels
from halkspeech.model.triton_kernels import pdl_wait

DEV = torch.device("cuda")

MAX_M = 4  # steps of at most this many rows take the fused MLP in section C (atomics grow with M)


@triton.jit
def mlp_kernel(
    x_ptr, g_ptr, beta_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, ws_ptr, count_ptr,
    M, D, HID, stride_xm, stride_w1, stride_w2, stride_ym, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # x [M, D] (unit column stride), LN g/beta [D], W1 [HID, D], b1 [HID], W2 [D, HID], b2 [D] → y [M, D];
    # grid (hidden slices of BLOCK_H, row tiles of BLOCK_M); ws [M, D] float32 and count [row tiles × column
    # tiles of BLOCK_N] int32, zero on entry and left zero
    pid_h, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_ok, h_ok = rm < M, rh < HID
    pdl_wait(PDL)
    # LayerNorm statistics in one pass (Chan et al.'s merge of block means and squared deviations)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    seen = 0.0
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = m_ok[:, None] & (rk < D)[None, :]
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        count = tl.minimum(D - k0, BLOCK_K).to(tl.float32)
        block_mean = tl.sum(xs, axis=1) / count
        centred = tl.where(ok, xs - block_mean[:, None], 0.0)
        delta = block_mean - mean
        total = seen + count
        mean += delta * (count / total)
        m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / total)
        seen = total
    rstd = tl.rsqrt(m2 / D + eps)
    # this program's hidden units: acc [BLOCK_M, BLOCK_H] = LN(x) @ W1[rh]ᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        normed = ((xs.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]).to(
            w1_ptr.dtype.element_ty
        )
        w = tl.load(w1_ptr + rh[:, None] * stride_w1 + rk[None, :], mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * normed.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(normed, tl.trans(w), acc)
    acc += tl.load(b1_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact GELU, as F.gelu
    # rounded to the weights' dtype, as the two-launch path stores h; rows and units out of range are zero
    h = tl.where(m_ok[:, None] & h_ok[None, :], acc, 0.0).to(w2_ptr.dtype.element_ty)
    n_tiles = tl.cdiv(D, BLOCK_N)
    for n0 in range(0, D, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < D
        w2 = tl.load(w2_ptr + rn[:, None] * stride_w2 + rh[None, :], mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        if BLOCK_M == 1:
            part = tl.sum(w2.to(tl.float32) * h.to(tl.float32), axis=1)[None, :]
        else:
            part = tl.dot(h, tl.trans(w2))
        out_ok = m_ok[:, None] & n_ok[None, :]
        ws = ws_ptr + rm[:, None] * D + rn[None, :]
        tl.atomic_add(ws, part, mask=out_ok)
        tile = pid_m * n_tiles + n0 // BLOCK_N
        if tl.atomic_add(count_ptr + tile, 1) == tl.num_programs(0) - 1:
            # the last share of this column tile: the others' adds are ordered before their count increments
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            out = tl.where(out_ok, tl.atomic_add(ws, zero, mask=out_ok), 0.0)  # an atomic read, from L2
            tl.store(ws, zero, mask=out_ok)
            tl.store(count_ptr + tile, 0)
            out += tl.load(b2_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out += tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=out_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=out_ok)


def mlp(
    x: torch.Tensor,
    ln: tuple[torch.Tensor, torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    eps: float = 1e-5,
    block_m: int | None = None,
    block_h: int = 32,
    block_k: int = 256,
    block_n: int = 128,
    warps: int = 4,
    stages: int = 3,
) -> torch.Tensor:
    """x + fc2(GELU(fc1(LN(x)))) in one launch: x [M, D], W1 [HID, D], W2 [D, HID] → [M, D] in x's dtype."""
    m, d = x.shape
    hid = w1.shape[0]
    if x.stride(1) != 1 or w1.shape[1] != d or w2.shape != (d, hid) or w1.stride(1) != 1 or w2.stride(1) != 1:
        raise ValueError(f"mlp: x {tuple(x.shape)}, W1 {tuple(w1.shape)}, W2 {tuple(w2.shape)} do not fit")
    block_m = block_m or (1 if m == 1 else 16)
    y = torch.empty_like(x)
    grid = (triton.cdiv(hid, block_h), triton.cdiv(m, block_m))
    ws, count = kernels._workspace(x.device, m * d, grid[1] * triton.cdiv(d, block_n), use="mlp")
    mlp_kernel[grid](
        x, ln[0], ln[1], w1, b1, w2, b2, y, ws, count,
        m, d, hid, x.stride(0), w1.stride(0), w2.stride(0), y.stride(0), eps,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **kernels.launch_options(x.device),
    )  # fmt: skip
    return y


def reference(x, ln, w1, b1, w2, b2):
    f = x.float()
    h = F.gelu(F.linear(F.layer_norm(f, (f.shape[1],), ln[0].float(), ln[1].float()), w1.float(), b1.float()))
    return f + F.linear(h.to(x.dtype).float(), w2.float(), b2.float())


def random_mlp(d: int, hid: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ln = (r(d, scale=0.2) + 1, r(d, scale=0.2))
    return ln, r(hid, d, scale=d**-0.5), r(hid), r(d, hid, scale=hid**-0.5), r(d)


def check() -> None:
    """The kernel against PyTorch in Triton's interpreter: shapes no multiple of the tiles, a mean far from
    zero (the LayerNorm), both row tilings; the workspace and counts left zero."""
    cpu = torch.device("cpu")
    cases = [(1, 200, 300, None, torch.float32), (3, 200, 300, None, torch.float32), (2, 96, 160, 1, torch.float32)]
    cases += [(1, 128, 512, None, torch.float16), (3, 128, 512, None, torch.float16)]
    for m, d, hid, block_m, dtype in cases:
        ln, w1, b1, w2, b2 = random_mlp(d, hid, dtype, cpu, seed=m * d + hid)
        x = (torch.randn(m, d, generator=torch.Generator().manual_seed(m)) * 2 + 3).to(dtype)
        for block_h, block_n in ((32, 64), (16, 128)):
            got = mlp(x, ln, w1, b1, w2, b2, block_m=block_m, block_h=block_h, block_k=64, block_n=block_n)
            want = reference(x, ln, w1, b1, w2, b2)
            tol = 2e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=f"m={m} d={d} {dtype}")
        ws, count = kernels._workspaces[(cpu, "mlp")]
        assert not ws.any() and not count.any(), "workspace or counts left dirty"
        print(f"ok: m={m} d={d} hidden={hid} block_m={block_m or 'auto'} {dtype}", flush=True)
    # the patched decode step (DecoderBlock.mlp_fused) on tiny.en's shape, float32
    steps = step_logits_agree({"block_k": 64, "block_n": 64}, names=("tiny.en",), device=cpu)
    for key, row in steps.items():
        assert row["max_abs_diff"] <= 1e-3 * max(1.0, row["max_abs"]), (key, row)
        print(f"ok: step {key}: {row}", flush=True)
    print("check passed")


# --- GPU ----------------------------------------------------------------------------------------------------

D, HID, LAYERS = 1280, 5120, 32  # large-v3 and turbo's decoder width; large-v3's depth


def two_launches(x, ln, w1, b1, w2, b2):
    h = kernels.linear(x, w1, b1, ln=ln, gelu=True)
    return kernels.linear(h, w2, b2, residual=x)


def outputs_agree() -> dict:
    out: dict[str, Any] = {}
    ln, w1, b1, w2, b2 = random_mlp(D, HID, torch.float16, DEV, seed=0)
    for m in (1, 2, 4):
        x = torch.randn(m, D, device=DEV, dtype=torch.float16)
        want = reference(x, ln, w1, b1, w2, b2)
        two = two_launches(x, ln, w1, b1, w2, b2).float()
        one = mlp(x, ln, w1, b1, w2, b2).float()
        out[f"m{m}"] = {
            "fused_vs_fp32": (one - want).abs().max().item(),
            "two_vs_fp32": (two - want).abs().max().item(),
        }
    return out


def step_logits_agree(patch: dict, names=("large-v3-turbo", "large-v3"), device: torch.device = DEV) -> dict:
    """Decode-step logits with the fused MLP patched in against without (both on the fused step), random
    weights in fp16 (float32 on the CPU, where `check` runs this on tiny.en), batch 1 and 4."""
    from halkspeech.bench.engine_bench import _features
    from halkspeech.model.cache import KVCache
    from halkspeech.model.weights import random_weights
    from halkspeech.model.whisper import Whisper

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = {}
    for name in names:
        w = random_weights(name, dtype=dtype, device=device)
        m = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=dtype, device=device)
        cache = KVCache.allocate(m.dims, 4, dtype=dtype, device=device)
        slots = torch.arange(4, device=device)
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            m.decoder.fill_cross(m.encoder(_features(4, m.dims.n_mels, device).to(dtype)), cache, slots)
            m.decoder.prefill(torch.randint(0, 50000, (4, 6), generator=g).to(device), cache, slots)
            m.decoder.fused_max_batch = 16
            for b in (1, 4):
                t, pos = torch.randint(0, 50000, (b,), generator=g).to(device), torch.full((b,), 6, device=device)
                plain = m.decoder.step(t, pos, cache, 64)
                with patched(patch):
                    fused = m.decoder.step(t, pos, cache, 64)
                out[f"{name} b{b}"] = {
                    "max_abs_diff": (plain - fused).abs().max().item(),
                    "max_abs": plain.abs().max().item(),
                    "argmax_equal": f"{int((plain.argmax(-1) == fused.argmax(-1)).sum())}/{b}",
                }
        del m, cache
    return out


def graph_ms(fn, x0: torch.Tensor) -> float:
    """Device ms of one replay of a CUDA graph of fn(x0) (run once first: compilation, workspaces)."""
    from halkspeech.bench.common import cuda_ms

    fn(x0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fn(x0)
    torch.cuda.current_stream().wait_stream(stream)
    return cuda_ms(graph.replay, repeats=30)


def layer_timing() -> dict:
    layers = [random_mlp(D, HID, torch.float16, DEV, seed=i) for i in range(LAYERS)]

    def chain(one):
        def run(x):
            for ln, w1, b1, w2, b2 in layers:
                x = one(x, ln, w1, b1, w2, b2)
            return x

        return run

    res: dict[str, Any] = {}
    for m in (1, 4):
        x0 = torch.randn(m, D, device=DEV, dtype=torch.float16)
        rows = {"two launches": graph_ms(chain(two_launches), x0) / LAYERS * 1000}
        grid = itertools.product((16, 32, 64), (256, 512), (128, 256), (4, 8)) if m == 1 else [(32, 128, 64, 4)]
        for block_h, block_k, block_n, warps in grid:
            options = dict(block_h=block_h, block_k=block_k, block_n=block_n, warps=warps)
            key = json.dumps(options)
            try:
                rows[key] = graph_ms(chain(lambda *a, o=options: mlp(*a, **o)), x0) / LAYERS * 1000
            except Exception as exc:  # a tiling that does not compile or fit: noted, the rest go on
                rows[key] = repr(exc)[:200]
        timed = {k: v for k, v in rows.items() if isinstance(v, float) and k != "two launches"}
        best = min(timed, key=timed.__getitem__)
        res[f"m{m}"] = {"us_per_layer": rows, "best": json.loads(best), "best_us": timed[best]}
        print(f"m={m}: two launches {rows['two launches']:.2f} µs a layer, best fused {timed[best]:.2f} ({best})")
    return res


class patched:
    """DecoderBlock.mlp_fused replaced by the one-launch MLP for steps of ≤ MAX_M rows, inside the block."""

    def __init__(self, options: dict) -> None:
        self.options = options

    def __enter__(self) -> None:
        from halkspeech.model.whisper import DecoderBlock

        self.original = DecoderBlock.mlp_fused
        original, options = self.original, self.options

        def mlp_fused(block, x):
            if x.shape[0] > MAX_M:
                return original(block, x)
            ln = (block.mlp_ln.weight, block.mlp_ln.bias)
            return mlp(x, ln, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias, **options)

        DecoderBlock.mlp_fused = mlp_fused

    def __exit__(self, *exc: object) -> None:
        from halkspeech.model.whisper import DecoderBlock

        DecoderBlock.mlp_fused = self.original


def engine_batch1(patch: dict) -> dict:
    from halkspeech.bench.engine_bench import EngineBenchConfig, run_engine_bench

    res: dict[str, list] = {}
    for name in ("large-v3", "large-v3-turbo"):
        for variant in ("two launches", "fused", "two launches", "fused"):
            cfg = EngineBenchConfig(models=(name,), batches=(1,), compare_hf=False, repeats=5)
            if variant == "fused":
                with patched(patch):
                    row = run_engine_bench(cfg)["rows"][0]
            else:
                row = run_engine_bench(cfg)["rows"][0]
            res.setdefault(f"{name} {variant}", []).append(row.get("seconds"))
            torch.cuda.empty_cache()
    return res


def main() -> None:
    if sys.argv[1:2] == ["check"]:
        check()
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_explore import run_section
    from halkspeech.bench.common import device_info

    out = Path(sys.argv[1])
    want = sys.argv[2] if len(sys.argv) > 2 else "ABC"
    results: dict[str, Any] = {"device": device_info(DEV)}
    best: dict[str, Any] = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # a tiling B chose earlier
    if "B" in want:
        run_section(results, "B layer timing", layer_timing, out, preview=3000)
        best = results["B layer timing"].get("m1", {}).get("best", best)
    results["patch options"] = best
    if "A" in want:
        run_section(results, "A outputs", outputs_agree, out, preview=2000)
        run_section(results, "A step logits", lambda: step_logits_agree(best), out, preview=2000)
    if "C" in want:
        run_section(results, "C engine batch 1", lambda: engine_batch1(best), out, preview=2000)


if __name__ == "__main__":
    main()
