"""Fused Triton kernels for the decoder's step at small batch, where a step is bound by its kernel count.

A batch-1 decode step in plain PyTorch is ~20 kernels a layer (LayerNorm, GEMM, bias, GELU, residual add as
separate launches), and every small kernel costs 2–5 µs on an H100 whatever its bytes (bench/NOTES.md). Here
each projection is one kernel that also does what sits around it:

  * `linear`: y = act(LN(x) @ Wᵀ + b) + residual, with LN, act and residual optional: LayerNorm in the
    prologue (each program recomputes its rows' mean and variance: the rows are a few KB in cache), bias,
    GELU and the residual add in the epilogue, fp32 accumulation, output in x's dtype or float32; the
    query/key/value projection also writes its new keys and values into the self-attention cache;
  * `decode_attention`: one query per row and head over the cached keys (flash-decoding: the keys split
    over several programs whose partial softmaxes are merged by the last one), for self- and cross-attention;
  * `step_inputs`: token + positional embedding and the cache row each slot writes.

Triton is imported lazily: CPU installs need not have it (tests run these kernels in Triton's interpreter,
`TRITON_INTERPRET=1`, when it is installed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on `device`: a CUDA GPU with Triton installed."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class LinearConfig:
    """Tile sizes of `linear`: BLOCK_M rows of x, BLOCK_N outputs, BLOCK_K of the reduction per iteration."""

    block_m: int
    block_n: int
    block_k: int = 128
    warps: int = 4
    stages: int = 3
    #: programs that share each output tile's reduction (K); partial sums meet in a float32 workspace and the
    #: last program to finish applies the epilogue. More programs, more bytes in flight: a decode-sized product
    #: has too few output tiles to keep every SM reading W.
    split_k: int = 1


def linear_config(m: int, n: int, k: int) -> LinearConfig:
    """Tiles for an [m, k] × [k, n] product at decode batch sizes, where it is a read of W, chosen by timing
    every tiling of a grid with W read from HBM as in a real step (bench/gpu_fused.py, sections B and H). One
    row (m = 1, chosen on an H100) takes no tensor-core tile, just a multiply-and-sum per output; 2..16 rows
    (chosen on an H200) take a 16-row tensor-core tile. On the H200 the 16-row tiles at m = 1 took 8.4, 4.9,
    9.4 and 8.0 µs for qkv, out, fc1 and fc2 where PyTorch's LayerNorm + GEMM + epilogue kernels took 9.7,
    7.1, 11.7 and 10.5; on the H100 the one-row tiles beat them again (qkv 8.7 → 8.2 µs, out 5.1 → 4.7)."""
    if m == 1:
        if n >= 16384:  # the logits (51866 × 1280)
            return LinearConfig(1, block_n=16, block_k=256)
        if k >= 4096:  # fc2: few outputs for many inputs, so four programs share each output's K
            return LinearConfig(1, block_n=4, block_k=512, split_k=4)
        return LinearConfig(1, block_n=4 if n <= 2048 else 8, block_k=512)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_m > 16:  # untuned (steps of over 16 slots use cuBLAS by default); sized to fit shared memory
        return LinearConfig(block_m, block_n=64, block_k=128, stages=3)
    if n >= 16384:
        return LinearConfig(block_m, block_n=64, block_k=256, stages=2)
    if k >= 4096:
        return LinearConfig(block_m, block_n=32, block_k=128, stages=4, split_k=8)
    if n <= 2048:  # attention out, cross q and out (1280 × 1280)
        return LinearConfig(block_m, block_n=16, block_k=256, stages=4)
    return LinearConfig(block_m, block_n=64 if n >= 4096 else 32, block_k=256, stages=4)  # qkv, fc1


@functools.cache
def _kernels() -> dict[str, Any]:
    """Compiles (once, on first use) and returns the Triton kernels."""
    import triton
    import triton.language as tl

    @triton.jit
    def linear_kernel(
        x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, r_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, eps,
        ws_ptr, count_ptr, kv_ptr, kv_rows_ptr, kv_stride, kv_col,
        HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
        HAS_KV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # x [M, K] (row stride stride_xm, unit column stride), W [N, K], b [N], g/beta [K], residual [M, N];
        # grid (N tiles, M tiles, SPLIT_K); with SPLIT_K > 1: ws [M, N] float32 and count [tiles] int32, both
        # zero on entry and left zero on exit; with HAS_KV, output columns kv_col.. also go to row
        # kv_rows[m] of kv (row stride kv_stride): the self-attention cache write
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_LN:  # one pass, Chan et al.'s merge of each block's mean and squared deviations: stable for
            # rows whose mean is large against their spread, and no second trip through x before the GEMM
            seen = 0.0
            m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                ok = m_ok[:, None] & (rk < K)[None, :]
                xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=ok, other=0.0).to(tl.float32)
                count = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
                block_mean = tl.sum(xs, axis=1) / count
                centred = tl.where(ok, xs - block_mean[:, None], 0.0)
                delta = block_mean - mean
                total = seen + count
                mean += delta * (count / total)
                m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / total)
                seen = total
            rstd = tl.rsqrt(m2 / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # this program's share of K, whole blocks
        k_end = tl.minimum(K, (pid_k + 1) * k_span)
        for k0 in range(pid_k * k_span, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_end
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_LN:
                g = tl.load(g_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                normed = (xs.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
                xs = normed.to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if BLOCK_M == 1:  # one row: a plain multiply-and-sum over K, no tensor-core tile to fill
                acc += tl.sum(w.to(tl.float32) * xs.to(tl.float32), axis=1)[None, :]
            else:
                acc = tl.dot(xs, tl.trans(w), acc)
        out_ok = m_ok[:, None] & n_ok[None, :]
        finish = True
        if SPLIT_K > 1:
            # add this share into the workspace; the program that brings the tile's count to SPLIT_K takes
            # the sum (and zeroes the workspace and count for the next call) and finishes the tile
            ws = ws_ptr + rm[:, None] * N + rn[None, :]
            tl.atomic_add(ws, acc, mask=out_ok)
            tile = pid_m * tl.num_programs(0) + pid_n
            finish = tl.atomic_add(count_ptr + tile, 1) == SPLIT_K - 1
            if finish:
                zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = tl.atomic_add(ws, zero, mask=out_ok)  # an atomic read: the other shares are in L2
                tl.store(ws, zero, mask=out_ok)
                tl.store(count_ptr + tile, 0)
        if finish:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GELU:  # exact (erf) GELU, as F.gelu
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            if HAS_RES:
                r = tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=out_ok, other=0.0)
                acc += r.to(tl.float32)
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)
            if HAS_KV:
                kv_rows = tl.load(kv_rows_ptr + rm, mask=m_ok, other=0)
                into = kv_ptr + kv_rows[:, None] * kv_stride + (rn - kv_col)[None, :]
                tl.store(into, acc.to(kv_ptr.dtype.element_ty), mask=out_ok & (rn >= kv_col)[None, :])

    @triton.jit
    def step_inputs_kernel(
        tokens_ptr, positions_ptr, emb_ptr, pos_ptr, x_ptr, rows_ptr,
        D, n_ctx, stride_emb, stride_pos, stride_tokens, stride_positions, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program per slot b: x[b] = emb[token] + pos[position]; rows[b] = b*n_ctx + position
        b = tl.program_id(0)
        token = tl.load(tokens_ptr + b * stride_tokens)
        position = tl.load(positions_ptr + b * stride_positions)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            ok = rd < D
            e = tl.load(emb_ptr + token * stride_emb + rd, mask=ok, other=0.0).to(tl.float32)
            p = tl.load(pos_ptr + position * stride_pos + rd, mask=ok, other=0.0).to(tl.float32)
            tl.store(x_ptr + b * D + rd, (e + p).to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(rows_ptr + b, b * n_ctx + position)

    @triton.jit
    def attention_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, ws_ptr, count_ptr,
        H, stride_qb, stride_kb, stride_kh, stride_kn, stride_len, length, len_offset, scale,
        HAS_LEN: tl.constexpr, DH: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        # one query per (row b, head h): q [B, H*DH] (row stride stride_qb); keys of (b, h) at
        # k_ptr + b*stride_kb + h*stride_kh + n*stride_kn, values likewise from v_ptr; the row reads keys
        # 0..len[b]+len_offset-1 (HAS_LEN) or 0..length-1; out [B, H*DH]. Grid (B, H, SPLITS): each split
        # takes a span of keys (online softmax); with SPLITS > 1 the last split of (b, h) to finish merges
        # them from ws [B*H*SPLITS, DH + 2] (zeroing count [B*H], as the linear kernel's split-K)
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if HAS_LEN:
            length = tl.load(len_ptr + b * stride_len).to(tl.int32) + len_offset
        span = tl.cdiv(length, SPLITS * BLOCK_N) * BLOCK_N
        end = tl.minimum(length, (split + 1) * span)
        d = tl.arange(0, DH)
        q = tl.load(q_ptr + b * stride_qb + h * DH + d).to(tl.float32) * scale
        keys = k_ptr + b * stride_kb + h * stride_kh
        values = v_ptr + b * stride_kb + h * stride_kh
        top = float("-inf")
        total = 0.0
        acc = tl.zeros((DH,), dtype=tl.float32)
        for n0 in range(split * span, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < end
            k = tl.load(keys + n[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            p = tl.exp(scores - shift)
            alpha = tl.exp(top - shift)
            v = tl.load(values + n[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            top = new_top
        out = out_ptr + b * H * DH + h * DH + d
        if SPLITS == 1:
            tl.store(out, (acc / total).to(out_ptr.dtype.element_ty))
        else:
            head = b * H + h
            part = ws_ptr + (head * SPLITS + split) * (DH + 2)
            tl.store(part + d, acc)
            tl.store(part + DH, top)
            tl.store(part + DH + 1, total)
            if tl.atomic_add(count_ptr + head, 1) == SPLITS - 1:
                parts = ws_ptr + (head * SPLITS + tl.arange(0, SPLITS)) * (DH + 2)
                # the other splits' stores are ordered before their count increments (release) and this
                # program's increment acquires them; ".cg" reads them from L2, past this SM's L1
                tops = tl.load(parts + DH, cache_modifier=".cg")
                totals = tl.load(parts + DH + 1, cache_modifier=".cg")
                accs = tl.load(parts[:, None] + d[None, :], cache_modifier=".cg")
                best = tl.max(tops, axis=0)
                weight = tl.exp(tops - tl.where(best == float("-inf"), 0.0, best))
                merged = tl.sum(accs * weight[:, None], axis=0) / tl.sum(totals * weight, axis=0)
                tl.store(out, merged.to(out_ptr.dtype.element_ty))
                tl.store(count_ptr + head, 0)

    return {
        "linear": linear_kernel,
        "step_inputs": step_inputs_kernel,
        "attention": attention_kernel,
        "cdiv": triton.cdiv,
    }


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ln: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-5,
    gelu: bool = False,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    kv: tuple[Tensor, Tensor, int] | None = None,
    config: LinearConfig | None = None,
) -> Tensor:
    """act(LN(x) @ weightᵀ + bias) + residual in one kernel: x [M, K] (unit column stride), weight [N, K],
    bias [N], ln = (LayerNorm weight [K], bias [K]), residual [M, N] → [M, N] in out_dtype (default x's).
    kv = (cache [R, C], rows [M], col): output columns col..col+C-1 of row m are also stored in cache[rows[m]]
    (a self-attention step writes its new keys and values into the cache this way, not with an index_copy)."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1 or weight.stride(1) != 1 or weight.shape[1] != k:
        raise ValueError(f"linear: x {tuple(x.shape)} / weight {tuple(weight.shape)} must be row-major over K")
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"linear: residual {tuple(residual.shape)} must be [{m}, {n}] with unit column stride")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    cfg = config or linear_config(m, n, k)
    kern = _kernels()
    grid = (kern["cdiv"](n, cfg.block_n), kern["cdiv"](m, cfg.block_m), cfg.split_k)
    g, beta = ln if ln is not None else (x, x)  # unused pointers when HAS_LN is off
    ws, count = _workspace(x.device, m * n, grid[0] * grid[1]) if cfg.split_k > 1 else (out, out)
    if kv is not None and (kv[0].stride(1) != 1 or kv[1].shape != (m,) or kv[2] + kv[0].shape[1] != n):
        raise ValueError(f"linear: kv cache {tuple(kv[0].shape)} / rows {tuple(kv[1].shape)} do not fit [{m}, {n}]")
    cache, rows, col = kv if kv is not None else (out, out, 0)
    kern["linear"][grid](
        x, weight, bias if bias is not None else x, g, beta, residual if residual is not None else x, out,
        m, n, k, x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        eps, ws, count, cache, rows, cache.stride(0), col,
        HAS_LN=ln is not None, HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None,
        HAS_KV=kv is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return out


_workspaces: dict[tuple[torch.device, str], tuple[Tensor, Tensor]] = {}
_retired: list[tuple[Tensor, Tensor]] = []


def _workspace(device: torch.device, elements: int, tiles: int, use: str = "linear") -> tuple[Tensor, Tensor]:
    """A float32 scratch buffer and int32 counters for cross-program reductions (split-K, split attention),
    one pair per device and use: zeroed once, left zeroed by every kernel, and shared by all calls, which is
    safe because the decode step's kernels run one after another on one stream. Outgrown pairs are kept alive,
    since CUDA graphs captured earlier still point at them (the engine's warm-up runs every shape before its
    capture, so nothing is allocated while capturing)."""
    ws, count = _workspaces.get((device, use), (None, None))
    if ws is None or count is None or ws.numel() < elements or count.numel() < tiles:
        if ws is not None and count is not None:
            _retired.append((ws, count))
        ws = torch.zeros(max(elements, 1 << 20), dtype=torch.float32, device=device)
        count = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
        _workspaces[(device, use)] = (ws, count)
    return ws, count


def step_inputs(
    tokens: Tensor, positions: Tensor, embedding: Tensor, positional: Tensor, n_ctx: int
) -> tuple[Tensor, Tensor]:
    """A decode step's inputs for slots 0..B-1 in one kernel: tokens, positions [B] (long) →
    x [B, D] = embedding[tokens] + positional[positions] and rows [B] = slot * n_ctx + position (the
    self-attention cache row each slot writes)."""
    b, d = tokens.shape[0], embedding.shape[1]
    x = torch.empty(b, d, dtype=embedding.dtype, device=embedding.device)
    rows = torch.empty(b, dtype=torch.long, device=embedding.device)
    _kernels()["step_inputs"][(b,)](
        tokens, positions, embedding, positional, x, rows,
        d, n_ctx, embedding.stride(0), positional.stride(0), tokens.stride(0), positions.stride(0), BLOCK_D=1024,
    )  # fmt: skip
    return x, rows


def decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    lengths: Tensor | None = None,
    length_offset: int = 0,
    splits: int = 1,
    block_n: int = 128,
    warps: int = 2,
) -> Tensor:
    """Attention of one query per row and head over that row's first keys, softmax(q·kᵀ/√Dh)·v:
    q [B, H, Dh] (any row stride, heads contiguous), keys/values [B, H, N, Dh] views (any strides over
    B, H, N that keys and values share; unit stride over Dh) → [B, H*Dh] in q's dtype. Row b reads keys
    0..lengths[b]+length_offset-1 (self-attention: its position + 1) or all N. `splits` programs share
    each (row, head) over the keys (cross-attention's 1500 keys are too many for one). Defaults, and the
    decoder's 16 cross-attention splits, were the fastest of a grid on an H100 (bench/gpu_fused.py, H): 3.0
    and 7.6 µs a layer for self- and cross-attention at batch 1, against SDPA's 4.8 and 9.3."""
    b, h, dh = q.shape
    if q.stride(2) != 1 or q.stride(1) != dh or keys.stride() != values.stride() or keys.stride(3) != 1:
        raise ValueError(f"decode_attention: q {tuple(q.stride())} / keys {tuple(keys.stride())} strides")
    out = torch.empty(b, h * dh, dtype=q.dtype, device=q.device)
    ws, count = _workspace(q.device, b * h * splits * (dh + 2), b * h, use="attention")
    kern = _kernels()
    kern["attention"][(b, h, splits)](
        q, keys, values, lengths if lengths is not None else out, out, ws, count,
        h, q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        lengths.stride(0) if lengths is not None else 0, keys.shape[2], length_offset, dh**-0.5,
        HAS_LEN=lengths is not None, DH=dh, BLOCK_N=block_n, SPLITS=splits, num_warps=warps,
    )  # fmt: skip
    return out
