"""Cross-attention over the encoder output itself, with the key and value projections absorbed into the query and
the output (GPU). Two kernels: Triton's (it also runs in Triton's interpreter, TRITON_INTERPRET=1, on small CPU
tensors) and CUDA C++'s (src/halkspeech/model/assets/absorbed_cross.cu, compiled at run time by NVRTC: src/halkspeech/model/cuda_rtc.py).

A decode step over many slots spends most of its time in cross-attention (large-v3 at 64 slots: 5.3 of ~8 ms,
bench/NOTES.md), reading each slot's cached keys and values: per layer K = E·Wkᵀ and V = E·Wvᵀ + bv, two
[1500, 1280] fp16 tensors (7.7 MB) made from the same encoder output E. Per head h, with Wk_h and Wv_h the
head's 64 rows of Wk and Wv:

    scores_h = q_h·K_hᵀ = (q_h·Wk_h)·Eᵀ = Q'_h·Eᵀ          (Whisper's cross keys have no bias)
    out_h    = p_h·V_h  = (p_h·E)·Wv_hᵀ + bv_h             (p_h sums to 1)

so attention can read E (3.8 MB a slot a layer) once for both, with the query projected into model space first
(Q' [B, H, D], a batched product over heads with Wk) and the weighted sum of E projected after (a batched
product with Wv): half the bytes, ~20× the FLOPs (still far below the tensor cores' ridge).
  Triton: one program takes one slot and a group of 16 heads (20 heads: two groups, the second read of E from L2;
    or 32 rows, all 20 in one), holds its five [16, 256] accumulators in registers and streams E in blocks of keys
    with an online softmax (optionally over key splits, merged by a second kernel).
  CUDA: one block of 8 warps per slot (and split of the keys) splits the model width over its warps, each with its
    slice of the accumulator and of Q' in registers; only the partial scores meet in shared memory (the .cu's
    header has the rest).

This script times, for large-v3's shapes at several batch sizes, one decode step's cross-attention over L layers
(distinct weights and caches, the same E, as in a real step), each variant captured in a CUDA graph:
  sdpa       PyTorch's SDPA over the cached K and V (the plain step's path above 16 slots)
  absorbed   the Q' product, the kernel, the value product (the value bias belongs in cross_out's bias)
and checks they agree. The Triton kernel's tiles are chosen from a grid first (`--grid none` skips it); the CUDA
kernel runs at 1, 2 and 4 key splits, each with and without two L2 prefetch schemes.

    PYTHONPATH=src python bench/gpu_absorbed_cross.py OUT.json [--batches 32,64,128,256] [--layers 8]
        [--grid heads|keys|none]

Measured on an H100 (session 32), µs a layer, SDPA against the best absorbed variant (with its two products): CUDA
(`--grid none`, `bench/results/absorbed_cross_cuda_h100_s32.json`): batch 32 85.9 / 80.2 (4 splits), 64 160.9 /
127.9 (2 splits), 128 314.3 / 193.0, 256 622.1 / 371.8 (1 split), cp.async with 256-byte L2 fetches; outputs within
0.0005 of SDPA's. The kernel alone reads E at 2.2–2.8 TB/s from 64 slots up, bound by its loads: with no MMAs or
softmax at all it took as long (`absorbed_cross_cuda_warp_loads_h100_s32.json`), since a block's 191 KB of shared
memory leave room for only two stages of 32 keys. Earlier steps: one block-wide copy and wait a block (`_first`),
partial scores laid out with bank conflicts (`_ablations`: also each phase taken out in turn), bulk L2 prefetches
of the block after next (slower by 10–20%). Triton (`--grid heads`, `absorbed_cross_h100_s32.json`; earlier grids
`absorbed_cross_grid{1,2}_h100_s32.json`): 84.6, 134.9, 343.5, 666.0: a program takes ~120 µs for its slot's 1,500
keys whether 64 or 128 programs run, at 255 registers a thread (2 spilled) and one program of 4 warps a SM, too few
warps to hide its latency; a program for all 20 heads spilled more and ran slower, and with keys as the rows
(`--grid keys`, so that 64 keys fill Hopper's warpgroup MMA) Triton asked for 370–1,028 KB of shared memory in
every tiling (`absorbed_cross_transposed_h100_s32.json`). The CUDA kernel is the engine's since (model/absorbed.py,
for steps of 32 slots and more: bench/gpu_absorbed_step.py times whole steps); in the runs above its splits were
merged by the Triton merge_kernel, where the engine's own merge is now used.
"""

from __future__ import annotations

import argparse
import json
import traceback
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from halkspeech.model import absorbed

HEADS, FRAMES, D, HEAD_DIM = 20, 1500, 1280, 64
HEAD_ROWS = 16  # heads a program takes by default: tl.dot's smallest M


@triton.jit
def _chunk_scores(qp, h_ok, e0, e1, e2, e3, e4, DC: tl.constexpr):
    # q·eᵀ over the five chunks, q read again from cache (not held in registers across the loop)
    s = tl.dot(tl.load(qp, mask=h_ok[:, None], other=0.0), tl.trans(e0))
    s = tl.dot(tl.load(qp + DC, mask=h_ok[:, None], other=0.0), tl.trans(e1), s)
    s = tl.dot(tl.load(qp + 2 * DC, mask=h_ok[:, None], other=0.0), tl.trans(e2), s)
    s = tl.dot(tl.load(qp + 3 * DC, mask=h_ok[:, None], other=0.0), tl.trans(e3), s)
    return tl.dot(tl.load(qp + 4 * DC, mask=h_ok[:, None], other=0.0), tl.trans(e4), s)


@triton.jit
def absorbed_attention_kernel(
    q_ptr, e_ptr, z_ptr, ws_ptr, stat_ptr, H, N, stride_qb, stride_qh, stride_eb, stride_en, stride_zb, stride_zh,
    DC: tl.constexpr, HG: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, Q_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # q [B, H, 5*DC] (Q', scaled), e [B, N, 5*DC], z [B, H, 5*DC] = softmax(q·eᵀ)·e; grid (B, cdiv(H, HG),
    # SPLITS): program (b, g, split) takes heads g*HG.. of slot b over its span of the N keys. The model width is
    # five chunks of DC (1280 = 5 × 256), each with its own accumulator: tl.arange needs powers of two. With
    # SPLITS > 1 the unnormalised sums go to ws [SPLITS, B, H, 5*DC] and (top, total) to stat [SPLITS, B, H, 2]
    # for merge_kernel
    b, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rh = g * HG + tl.arange(0, HG)
    h_ok = rh < H
    rd = tl.arange(0, DC)
    qp = q_ptr + b * stride_qb + rh[:, None] * stride_qh + rd[None, :]
    q0 = tl.load(qp, mask=h_ok[:, None], other=0.0)
    q1 = tl.load(qp + DC, mask=h_ok[:, None], other=0.0)
    q2 = tl.load(qp + 2 * DC, mask=h_ok[:, None], other=0.0)
    q3 = tl.load(qp + 3 * DC, mask=h_ok[:, None], other=0.0)
    q4 = tl.load(qp + 4 * DC, mask=h_ok[:, None], other=0.0)
    a0 = tl.zeros((HG, DC), dtype=tl.float32)
    a1 = tl.zeros((HG, DC), dtype=tl.float32)
    a2 = tl.zeros((HG, DC), dtype=tl.float32)
    a3 = tl.zeros((HG, DC), dtype=tl.float32)
    a4 = tl.zeros((HG, DC), dtype=tl.float32)
    top = tl.full((HG,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((HG,), dtype=tl.float32)
    span = tl.cdiv(N, SPLITS * BLOCK_N) * BLOCK_N
    end = tl.minimum(N, (split + 1) * span)
    for n0 in range(split * span, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < end
        ep = e_ptr + b * stride_eb + rn[:, None] * stride_en + rd[None, :]
        e0 = tl.load(ep, mask=n_ok[:, None], other=0.0)
        e1 = tl.load(ep + DC, mask=n_ok[:, None], other=0.0)
        e2 = tl.load(ep + 2 * DC, mask=n_ok[:, None], other=0.0)
        e3 = tl.load(ep + 3 * DC, mask=n_ok[:, None], other=0.0)
        e4 = tl.load(ep + 4 * DC, mask=n_ok[:, None], other=0.0)
        if Q_IN_LOOP:
            s = _chunk_scores(qp, h_ok, e0, e1, e2, e3, e4, DC)
        else:
            s = tl.dot(q0, tl.trans(e0))
            s = tl.dot(q1, tl.trans(e1), s)
            s = tl.dot(q2, tl.trans(e2), s)
            s = tl.dot(q3, tl.trans(e3), s)
            s = tl.dot(q4, tl.trans(e4), s)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        alpha = tl.exp(top - new_top)
        p = tl.exp(s - new_top[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        pe = p.to(e0.dtype)
        a0 = tl.dot(pe, e0, a0 * alpha[:, None])
        a1 = tl.dot(pe, e1, a1 * alpha[:, None])
        a2 = tl.dot(pe, e2, a2 * alpha[:, None])
        a3 = tl.dot(pe, e3, a3 * alpha[:, None])
        a4 = tl.dot(pe, e4, a4 * alpha[:, None])
        top = new_top
    if SPLITS == 1:
        inv = 1.0 / total
        zp = z_ptr + b * stride_zb + rh[:, None] * stride_zh + rd[None, :]
        ty = z_ptr.dtype.element_ty
        tl.store(zp, (a0 * inv[:, None]).to(ty), mask=h_ok[:, None])
        tl.store(zp + DC, (a1 * inv[:, None]).to(ty), mask=h_ok[:, None])
        tl.store(zp + 2 * DC, (a2 * inv[:, None]).to(ty), mask=h_ok[:, None])
        tl.store(zp + 3 * DC, (a3 * inv[:, None]).to(ty), mask=h_ok[:, None])
        tl.store(zp + 4 * DC, (a4 * inv[:, None]).to(ty), mask=h_ok[:, None])
    else:
        row = (split * tl.num_programs(0) + b) * H + rh
        wp = ws_ptr + row[:, None] * (5 * DC) + rd[None, :]
        tl.store(wp, a0, mask=h_ok[:, None])
        tl.store(wp + DC, a1, mask=h_ok[:, None])
        tl.store(wp + 2 * DC, a2, mask=h_ok[:, None])
        tl.store(wp + 3 * DC, a3, mask=h_ok[:, None])
        tl.store(wp + 4 * DC, a4, mask=h_ok[:, None])
        tl.store(stat_ptr + row * 2, top, mask=h_ok)
        tl.store(stat_ptr + row * 2 + 1, total, mask=h_ok)


@triton.jit
def absorbed_attention_t_kernel(
    q_ptr, e_ptr, z_ptr, ws_ptr, stat_ptr, H, N, stride_qb, stride_qh, stride_eb, stride_en, stride_zb, stride_zh,
    DC: tl.constexpr, HG: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    # absorbed_attention_kernel with keys as the rows of every product (sᵀ = e·qᵀ [BLOCK_N, HG], zᵀ += eᵀ·pᵀ
    # [DC, HG] a chunk): a block of 64 keys fills the M of Hopper's warpgroup MMA, which a group of 16 heads
    # cannot; the accumulators are the same size
    b, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rh = g * HG + tl.arange(0, HG)
    h_ok = rh < H
    rd = tl.arange(0, DC)
    qp = q_ptr + b * stride_qb + rh[None, :] * stride_qh + rd[:, None]  # [DC, HG]: qᵀ
    q0 = tl.load(qp, mask=h_ok[None, :], other=0.0)
    q1 = tl.load(qp + DC, mask=h_ok[None, :], other=0.0)
    q2 = tl.load(qp + 2 * DC, mask=h_ok[None, :], other=0.0)
    q3 = tl.load(qp + 3 * DC, mask=h_ok[None, :], other=0.0)
    q4 = tl.load(qp + 4 * DC, mask=h_ok[None, :], other=0.0)
    a0 = tl.zeros((DC, HG), dtype=tl.float32)
    a1 = tl.zeros((DC, HG), dtype=tl.float32)
    a2 = tl.zeros((DC, HG), dtype=tl.float32)
    a3 = tl.zeros((DC, HG), dtype=tl.float32)
    a4 = tl.zeros((DC, HG), dtype=tl.float32)
    top = tl.full((HG,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((HG,), dtype=tl.float32)
    span = tl.cdiv(N, SPLITS * BLOCK_N) * BLOCK_N
    end = tl.minimum(N, (split + 1) * span)
    for n0 in range(split * span, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < end
        ep = e_ptr + b * stride_eb + rn[:, None] * stride_en + rd[None, :]
        e0 = tl.load(ep, mask=n_ok[:, None], other=0.0)
        e1 = tl.load(ep + DC, mask=n_ok[:, None], other=0.0)
        e2 = tl.load(ep + 2 * DC, mask=n_ok[:, None], other=0.0)
        e3 = tl.load(ep + 3 * DC, mask=n_ok[:, None], other=0.0)
        e4 = tl.load(ep + 4 * DC, mask=n_ok[:, None], other=0.0)
        s = tl.dot(e0, q0)
        s = tl.dot(e1, q1, s)
        s = tl.dot(e2, q2, s)
        s = tl.dot(e3, q3, s)
        s = tl.dot(e4, q4, s)
        s = tl.where(n_ok[:, None], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=0))
        alpha = tl.exp(top - new_top)
        p = tl.exp(s - new_top[None, :])
        total = total * alpha + tl.sum(p, axis=0)
        pe = p.to(e0.dtype)
        a0 = tl.dot(tl.trans(e0), pe, a0 * alpha[None, :])
        a1 = tl.dot(tl.trans(e1), pe, a1 * alpha[None, :])
        a2 = tl.dot(tl.trans(e2), pe, a2 * alpha[None, :])
        a3 = tl.dot(tl.trans(e3), pe, a3 * alpha[None, :])
        a4 = tl.dot(tl.trans(e4), pe, a4 * alpha[None, :])
        top = new_top
    if SPLITS == 1:
        inv = 1.0 / total
        zp = z_ptr + b * stride_zb + rh[None, :] * stride_zh + rd[:, None]
        ty = z_ptr.dtype.element_ty
        tl.store(zp, (a0 * inv[None, :]).to(ty), mask=h_ok[None, :])
        tl.store(zp + DC, (a1 * inv[None, :]).to(ty), mask=h_ok[None, :])
        tl.store(zp + 2 * DC, (a2 * inv[None, :]).to(ty), mask=h_ok[None, :])
        tl.store(zp + 3 * DC, (a3 * inv[None, :]).to(ty), mask=h_ok[None, :])
        tl.store(zp + 4 * DC, (a4 * inv[None, :]).to(ty), mask=h_ok[None, :])
    else:
        row = (split * tl.num_programs(0) + b) * H + rh
        wp = ws_ptr + row[None, :] * (5 * DC) + rd[:, None]
        tl.store(wp, a0, mask=h_ok[None, :])
        tl.store(wp + DC, a1, mask=h_ok[None, :])
        tl.store(wp + 2 * DC, a2, mask=h_ok[None, :])
        tl.store(wp + 3 * DC, a3, mask=h_ok[None, :])
        tl.store(wp + 4 * DC, a4, mask=h_ok[None, :])
        tl.store(stat_ptr + row * 2, top, mask=h_ok)
        tl.store(stat_ptr + row * 2 + 1, total, mask=h_ok)


@triton.jit
def merge_kernel(
    ws_ptr, stat_ptr, z_ptr, B, H, stride_zb, stride_zh, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr
):  # fmt: skip
    # z[b, h] = Σ_s ws[s, b, h]·w_s / Σ_s total_s·w_s with w_s = exp(top_s − max top); grid (B, H)
    b, h = tl.program_id(0), tl.program_id(1)
    rs = tl.arange(0, SPLITS)
    rows = (rs * B + b) * H + h
    tops = tl.load(stat_ptr + rows * 2)
    totals = tl.load(stat_ptr + rows * 2 + 1)
    w = tl.exp(tops - tl.max(tops, axis=0))
    inv = 1.0 / tl.sum(totals * w, axis=0)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        parts = tl.load(ws_ptr + rows[:, None] * D + rd[None, :], mask=(rd < D)[None, :], other=0.0)
        z = tl.sum(parts * w[:, None], axis=0) * inv
        tl.store(z_ptr + b * stride_zb + h * stride_zh + rd, z.to(z_ptr.dtype.element_ty), mask=rd < D)


_ws: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
compiled: dict[tuple[Any, ...], tuple[int | None, int | None]] = {}


def absorbed_attention(
    qp: torch.Tensor,
    e: torch.Tensor,
    out: torch.Tensor,
    *,
    block_n: int = 32,
    warps: int = 4,
    stages: int = 3,
    splits: int = 1,
    q_in_loop: bool = False,
    head_rows: int = HEAD_ROWS,
    transposed: bool = False,
) -> torch.Tensor:
    """softmax(qp·eᵀ)·e per slot and head: qp [B, H, D] and out [B, H, D] (any strides over B and H, unit over
    D: the [H, B, D] layout of a batched product over heads is fine), e [B, N, D] (unit stride over D).
    `transposed`: absorbed_attention_t_kernel (q_in_loop does not apply). The compiled kernel's registers and
    spills a thread go to `compiled[(tiles)]`."""
    b, h, d = qp.shape
    if d % 5 or e.shape[2] != d or qp.stride(2) != 1 or e.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"absorbed_attention: q {tuple(qp.shape)} / e {tuple(e.shape)} do not fit")
    if splits > 1:  # allocated before any capture (the script runs every shape once first)
        key = (splits * b * h, d)
        if key not in _ws:
            _ws[key] = (
                torch.empty(splits * b * h * d, dtype=torch.float32, device=qp.device),
                torch.empty(splits * b * h * 2, dtype=torch.float32, device=qp.device),
            )
        ws, stat = _ws[key]
    else:
        ws = stat = out
    grid = (b, triton.cdiv(h, head_rows), splits)
    args = (qp, e, out, ws, stat, h, e.shape[1], qp.stride(0), qp.stride(1), e.stride(0), e.stride(1),
            out.stride(0), out.stride(1))  # fmt: skip
    opts = {"DC": d // 5, "HG": head_rows, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps,
            "num_stages": stages}  # fmt: skip
    if transposed:
        kern = absorbed_attention_t_kernel[grid](*args, **opts)
    else:
        kern = absorbed_attention_kernel[grid](*args, Q_IN_LOOP=q_in_loop, **opts)
    key = (block_n, warps, stages, splits, q_in_loop, head_rows, transposed)
    if key not in compiled:
        compiled[key] = (getattr(kern, "n_regs", None), getattr(kern, "n_spills", None))
    if splits > 1:
        merge_kernel[(b, h)](ws, stat, out, b, h, out.stride(0), out.stride(1), D=d, BLOCK_D=256, SPLITS=splits)
    return out


def absorbed_attention_cuda(
    qp: torch.Tensor,
    e: torch.Tensor,
    out: torch.Tensor,
    *,
    warps: int = 8,
    splits: int = 1,
    ablate: int = 0,
    prefetch: int = 2,
) -> torch.Tensor:
    """absorbed_attention by the engine's CUDA kernel (model/absorbed.py, assets/absorbed_cross.cu: the model width
    split over a block's warps, a block per slot and split of the keys) with the benchmark's switches; fp16. The
    registers and local memory a thread go to `compiled`."""
    switches = (("WARPS", warps), ("ABLATE", ablate), ("PREFETCH", prefetch))
    key = ("cuda", warps, splits, ablate, prefetch)
    if key not in compiled:
        index = qp.device.index if qp.device.index is not None else torch.cuda.current_device()
        cross, _ = absorbed.load(qp.shape[2], qp.shape[1], splits, index, switches)
        compiled[key] = cross.registers_and_local_bytes()
    return absorbed.attend(qp, e, out, splits=splits, switches=switches)


class Layers:
    """L layers' cross-attention weights and caches for `batch` slots sharing one encoder output per slot."""

    def __init__(self, batch: int, layers: int, dtype: torch.dtype = torch.float16, frames: int = FRAMES) -> None:
        g = torch.Generator(device="cuda").manual_seed(batch)
        scale = D**-0.5

        def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

        self.batch, self.layers = batch, layers
        self.e = randn(batch, frames, D)  # the encoder output (after its last LayerNorm: unit scale)
        self.wk = [randn(D, D, std=scale) for _ in range(layers)]
        self.wv = [randn(D, D, std=scale) for _ in range(layers)]
        self.bv = [randn(D, std=0.1) for _ in range(layers)]
        self.q = [randn(batch, D) for _ in range(layers)]  # each layer's cross query (after cross_q)
        # what the engine caches today: K and V of every layer, [B, H, N, Dh]
        self.k = [self._heads(self.e @ w.T) for w in self.wk]
        self.v = [self._heads(self.e @ w.T + bias) for w, bias in zip(self.wv, self.bv, strict=True)]
        # the absorbed path's weights: Wk per head [H, Dh, D] with 1/√Dh folded in, Wv per head as [H, D, Dh]
        self.wk_heads = [(w.view(HEADS, HEAD_DIM, D) * HEAD_DIM**-0.5).contiguous() for w in self.wk]
        self.wv_heads = [w.view(HEADS, HEAD_DIM, D).transpose(1, 2) for w in self.wv]
        self.qp = torch.empty(HEADS, batch, D, dtype=dtype, device="cuda")
        self.z = torch.empty(HEADS, batch, D, dtype=dtype, device="cuda")
        self.out = torch.empty(batch, D, dtype=dtype, device="cuda")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(self.batch, -1, HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    def sdpa(self, layer: int) -> torch.Tensor:
        q = self.q[layer].view(self.batch, HEADS, 1, HEAD_DIM)
        a = F.scaled_dot_product_attention(q, self.k[layer], self.v[layer])
        return a.view(self.batch, D)

    def absorbed(self, layer: int, cuda: bool = False, **tiles: Any) -> torch.Tensor:
        q = self.q[layer].view(self.batch, HEADS, HEAD_DIM).transpose(0, 1)  # [H, B, Dh]
        torch.bmm(q, self.wk_heads[layer], out=self.qp)  # Q' [H, B, D]
        attend = absorbed_attention_cuda if cuda else absorbed_attention
        attend(self.qp.transpose(0, 1), self.e, self.z.transpose(0, 1), **tiles)
        o = torch.bmm(self.z, self.wv_heads[layer])  # [H, B, Dh]
        return o.transpose(0, 1).reshape(self.batch, D) + self.bv[layer]  # the bias: cross_out's, in the engine


def graph_ms(fn: Any, repeats: int = 20) -> float:
    """fn captured in a CUDA graph, replayed `repeats` times: ms a replay (median)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


GRIDS = {  # the tilings timed at batch 64 (--grid): heads as the rows of every product, in groups of 16 (20 heads:
    # two programs, E read twice from L2) or 32 (all 20 in one); or keys as the rows (64 keys fill a warpgroup
    # MMA's M)
    "heads": [
        {"head_rows": 16, "block_n": 32, "warps": 4, "stages": 3, "splits": sp, "q_in_loop": False} for sp in (1, 2)
    ]
    + [
        {"head_rows": 32, "block_n": bn, "warps": w, "stages": st, "splits": sp, "q_in_loop": ql}
        for bn in (16, 32)
        for w in (4, 8, 16)
        for st in (2, 3)
        for sp in (1, 2, 4)
        for ql in (False, True)
    ],
    "keys": [
        {"transposed": True, "head_rows": hr, "block_n": bn, "warps": w, "stages": st, "splits": sp}
        for hr in (16, 32)
        for bn in (64, 128)
        for w in (4, 8)
        for st in (2, 3)
        for sp in (1, 2)
        if hr == 16 or (bn == 64 and st == 2)
    ]
    + [{"head_rows": 16, "block_n": 32, "warps": 4, "stages": 3, "splits": sp} for sp in (1, 2)],
}


def run(batches: list[int], layers: int, out_path: str, grid: str = "heads") -> dict[str, Any]:
    from halkspeech.bench.common import device_info

    result: dict[str, Any] = {"device": device_info(torch.device("cuda")), "layers": layers, "tiles": [], "rows": []}

    def save() -> None:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    # Triton tiles: every tiling of the grid timed at batch 64 on 2 layers; the 8 best timed again at each batch
    probe = Layers(64, 2)
    reference = probe.sdpa(0).float()
    timed: list[tuple[float, dict[str, Any]]] = []
    for tiles in GRIDS.get(grid, []):
        row: dict[str, Any] = dict(tiles)
        try:
            err = float((probe.absorbed(0, **tiles).float() - reference).abs().max())
            ms = graph_ms(lambda t=tiles: [probe.absorbed(i, **t) for i in range(2)]) / 2
            row |= {"ms_a_layer": round(ms, 4), "max_err": round(err, 5)}
            row["regs_spills"] = compiled.get(
                tuple(tiles.get(k, v) for k, v in (("block_n", 32), ("warps", 4), ("stages", 3), ("splits", 1),
                                                   ("q_in_loop", False), ("head_rows", HEAD_ROWS),
                                                   ("transposed", False)))
            )  # fmt: skip
            if err < 0.05:
                timed.append((ms, tiles))
        except Exception as exc:  # a tiling that does not compile or fit (shared memory, registers)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        result["tiles"].append(row)
        print(row, flush=True)
        save()
    del probe
    candidates = [tiles for _, tiles in sorted(timed, key=lambda t: t[0])[:8]]
    print("candidates", candidates, flush=True)

    for batch in batches:
        row = {"batch": batch}
        try:
            lay = Layers(batch, layers)
            ref = [lay.sdpa(i).float() for i in range(layers)]
            row["ref_abs_max"] = round(max(float(r.abs().max()) for r in ref), 4)
            sdpa_ms = graph_ms(lambda: [lay.sdpa(i) for i in range(layers)])
            bytes_sdpa = batch * 2 * FRAMES * D * 2  # K and V a layer
            row["sdpa_us_a_layer"] = round(sdpa_ms / layers * 1e3, 1)
            row["sdpa_tb_s"] = round(bytes_sdpa / (sdpa_ms / layers) / 1e9, 2)

            def error(cuda: bool, tiles: dict[str, Any]) -> float:
                got = [lay.absorbed(i, cuda, **tiles).float() for i in range(layers)]
                return round(max(float((a - r).abs().max()) for a, r in zip(got, ref, strict=True)), 5)

            def kernel_ms(cuda: bool, tiles: dict[str, Any]) -> float:
                attend = absorbed_attention_cuda if cuda else absorbed_attention
                return graph_ms(
                    lambda: [attend(lay.qp.transpose(0, 1), lay.e, lay.z.transpose(0, 1), **tiles)
                             for _ in range(layers)]
                )  # fmt: skip

            if candidates:  # the Triton kernel at its best tiles for this batch
                best_ms, best = float("inf"), candidates[0]
                for tiles in candidates:
                    ms = graph_ms(lambda t=tiles: [lay.absorbed(i, **t) for i in range(layers)])
                    if ms < best_ms:
                        best_ms, best = ms, tiles
                row |= {
                    "tiles": best,
                    "max_err": error(False, best),
                    "absorbed_us_a_layer": round(best_ms / layers * 1e3, 1),
                    "kernel_us_a_layer": round(kernel_ms(False, best) / layers * 1e3, 1),
                }
                row["kernel_tb_s_of_e"] = round(bytes_sdpa / 2 / (row["kernel_us_a_layer"] * 1e-6) / 1e12, 2)
            row["cuda"] = []
            configs = [{"warps": 8, "splits": sp, "prefetch": pf} for sp in (1, 2, 4) for pf in (0, 1, 2, 3)]
            for cfg in configs:
                entry: dict[str, Any] = dict(cfg)
                try:
                    entry["max_err"] = error(True, cfg)
                    ms = graph_ms(lambda c=cfg: [lay.absorbed(i, True, **c) for i in range(layers)])
                    entry["absorbed_us_a_layer"] = round(ms / layers * 1e3, 1)
                    entry["kernel_us_a_layer"] = round(kernel_ms(True, cfg) / layers * 1e3, 1)
                    entry["kernel_tb_s_of_e"] = round(bytes_sdpa / 2 / (entry["kernel_us_a_layer"] * 1e-6) / 1e12, 2)
                    entry["regs_local_bytes"] = compiled.get(
                        ("cuda", cfg["warps"], cfg["splits"], cfg.get("ablate", 0), cfg.get("prefetch", 0))
                    )
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                row["cuda"].append(entry)
                print(batch, entry, flush=True)
            del lay
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        torch.cuda.empty_cache()
        result["rows"].append(row)
        print({k: v for k, v in row.items() if k != "cuda"}, flush=True)
        save()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON to write")
    parser.add_argument("--batches", default="32,64,128,256")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--grid", choices=[*sorted(GRIDS), "none"], default="heads", help="the Triton tilings to time (see GRIDS)"
    )
    args = parser.parse_args()
    run([int(b) for b in args.batches.split(",")], args.layers, args.out, args.grid)


if __name__ == "__main__":
    main()
