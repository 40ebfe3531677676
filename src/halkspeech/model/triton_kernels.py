"""The Triton code of the fused decode-step kernels; model/kernels.py wraps each one, chooses its tiles and
imports this module on first use (CPU installs need not have Triton). The kernels are module-level
functions, as Triton's interpreter (the CPU tests) resolves the helpers a kernel calls among its globals.

Kernels launched with programmatic dependent launch (kernels.launch_options) call `pdl_wait` before they touch
memory: a kernel launched that way starts while the one before it still runs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    # waits for the kernel before to finish (its writes are visible after this), then lets the next one
    # launch, so that its launch overlaps this kernel's work
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def linear_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, r_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, eps,
    ws_ptr, count_ptr, kv_ptr, kv_rows_ptr, kv_stride, kv_col,
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # x [M, K] (row stride stride_xm, unit column stride), W [N, K], b [N], g/beta [K], residual [M, N];
    # grid (N tiles, M tiles, SPLIT_K); with SPLIT_K > 1: ws [M, N] float32 and count [tiles] int32, both
    # zero on entry and left zero on exit; with HAS_KV, output columns kv_col.. also go to row
    # kv_rows[m] of kv (row stride kv_stride): the self-attention cache write
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # this program's share of K, whole blocks
    k_start, k_end = pid_k * k_span, tl.minimum(K, (pid_k + 1) * k_span)
    pdl_wait(PDL)
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
    for k0 in range(k_start, k_end, BLOCK_K):
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
    PDL: tl.constexpr,
):  # fmt: skip
    # one program per slot b: x[b] = emb[token] + pos[position]; rows[b] = b*n_ctx + position
    pdl_wait(PDL)
    b = tl.program_id(0)
    token = tl.load(tokens_ptr + b * stride_tokens)
    position = tl.minimum(tl.load(positions_ptr + b * stride_positions), n_ctx - 1)  # an idle row past the end
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
    PDL: tl.constexpr,
):  # fmt: skip
    # one query per (row b, head h): q [B, H*DH] (row stride stride_qb); keys of (b, h) at
    # k_ptr + b*stride_kb + h*stride_kh + n*stride_kn, values likewise from v_ptr; the row reads keys
    # 0..len[b]+len_offset-1 (HAS_LEN) or 0..length-1; out [B, H*DH]. Grid (B, H, SPLITS): each split
    # takes a span of keys (online softmax); with SPLITS > 1 the last split of (b, h) to finish merges
    # them from ws [B*H*SPLITS, DH + 2] (zeroing count [B*H], as the linear kernel's split-K)
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pdl_wait(PDL)
    if HAS_LEN:  # never past the keys there are (an idle row past the context)
        length = tl.minimum(tl.load(len_ptr + b * stride_len).to(tl.int32) + len_offset, length)
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


@triton.jit
def layer_norm_kernel(
    x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, M, D, stride_x, stride_y, eps,
    HAS_SHIFT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # y[m] = LN(x[m] + shift) · w + b for ROWS rows a program: x, y [M, D] (row strides given), shift [D]
    # float32, w/b [D]; statistics in float32, two passes over the rows held in registers
    rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rd = tl.arange(0, BLOCK_D)
    ok = (rm < M)[:, None] & (rd < D)[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_x + rd[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptr + rd, mask=rd < D, other=0.0)[None, :]
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
    w = tl.load(w_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rd[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
