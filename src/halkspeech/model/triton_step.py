"""The Triton code of the persistent decode step (model/step_kernel.py wraps it): every decoder layer of a
batch-1 step in one launch of one program per SM, its eight phases a layer separated by grid-wide barriers.

Why one launch: at batch 1 each of the fused path's ~260 kernels a step costs a launch, a ramp-up and a tail
of a few µs, whatever its bytes (large-v3: 1.66 ms a step against 0.48 ms of weight reads at HBM bandwidth;
bench/NOTES.md). Here a phase costs a barrier, and each program loads its share of the next phase's weights
(or cross-attention keys and values) into registers *before* it waits at the barrier: those loads depend on
no activation, so the weight stream runs on while programs wait for each other.

A barrier assumes every program of the grid is resident at once: the wrapper launches at most one program
per SM (cooperatively where Triton can). Triton's interpreter runs programs one after another, so on the CPU
the kernel runs as one program (whose barriers pass at once): the tests check every phase's arithmetic that
way, and bench/gpu_step.py checks the many-program kernel on a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

SPIN_LIMIT: tl.constexpr = tl.constexpr(1 << 22)


@triton.jit
def _sync(bars_ptr, index, pid, programs, stuck_ptr, POLL: tl.constexpr):
    # grid barrier `index` of this launch (counters zero on entry): each program arrives once, its stores
    # ordered before the arrival (release), and spins until every program has arrived (acquire). Program 0
    # then zeroes the barrier before, which every program has left; the launch's last barrier is zeroed by
    # the next launch. Returns the next barrier's index. A program that has spun SPIN_LIMIT times (seconds:
    # some program never started) gives up and counts it in `stuck`, so that a broken launch fails the
    # step's check instead of hanging the GPU. POLL 0 spins on atomic reads; 1 on volatile loads (from L2,
    # not queued behind the arrivals' atomics), then takes one atomic read for its acquire.
    tl.debug_barrier()
    tl.atomic_add(bars_ptr + index, 1, sem="release", scope="gpu")
    spins = 0
    if POLL == 0:
        while (tl.atomic_add(bars_ptr + index, 0, sem="acquire", scope="gpu") < programs) & (spins < SPIN_LIMIT):
            spins += 1
    else:
        while (tl.load(bars_ptr + index, volatile=True) < programs) & (spins < SPIN_LIMIT):
            spins += 1
        tl.atomic_add(bars_ptr + index, 0, sem="acquire", scope="gpu")
    if spins >= SPIN_LIMIT:
        tl.atomic_add(stuck_ptr, 1)
    tl.debug_barrier()
    if (pid == 0) & (index > 0):
        tl.atomic_xchg(bars_ptr + index - 1, 0)
    return index + 1


@triton.jit
def _prefetch(ptr, nbytes, MODE: tl.constexpr):
    # a hint: bring nbytes from ptr on (16-byte aligned, a multiple of 16) into L2, where the loads after
    # the next barriers find them. MODE 1: one bulk prefetch by the TMA unit (sm90), issued by one thread;
    # 2: one prefetch instruction per 128-byte line; 0 (the interpreter, which runs no PTX): none
    if MODE == 1:  # noqa: SIM102 (a constexpr test, then a run-time one)
        if nbytes > 0:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0;"
                " @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
    if MODE == 2:
        base = ptr.to(tl.pointer_type(tl.int8))
        for off in range(0, nbytes, 128 * 256):
            lines = tl.minimum(off + tl.arange(0, 256) * 128, nbytes - 1)
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [base + lines],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip


@triton.jit
def _stats(x_ptr, eps, K: tl.constexpr, BLOCK: tl.constexpr):
    # LayerNorm statistics of x [K] (written by other programs in the phase before: read from L2 (".cg"),
    # past this SM's L1, which may hold an earlier phase's values); every program computes them (a few KB)
    k = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    centred = tl.where(k < K, x - mean, 0.0)
    return mean, tl.rsqrt(tl.sum(centred * centred, axis=0) / K + eps)


@triton.jit
def _first_tile(w_ptr, row0, rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # columns 0..BLOCK_K-1 of rows row0..row0+rows-1 of W [N, K]: loaded before the barrier that opens the
    # phase using them (they depend on no activation), so that the phase starts with its first tile in hand
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + (row0 + r)[:, None] * K + k[None, :], mask=(r < rows)[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _rows_times(
    w_first, w_ptr, x_ptr, g_ptr, b_ptr, mean, rstd, row0, rows, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LN: tl.constexpr,
):  # fmt: skip
    # [BLOCK_R] float32: rows row0..row0+rows-1 of W [N, K] (row-major) times x [K], or times LN(x) with
    # LN's weight/bias g, b and the statistics from _stats, rounded to x's dtype first as the fused linear
    # kernel does. One program per SM has only its own loads in flight, so the tiles are large (~16 KB) and
    # double-buffered (the next one's loads go out before this one is used); K is a run-time value, so that
    # the compiler does not unroll the loop and hoist every tile's loads at once (they spill)
    r = tl.arange(0, BLOCK_R)
    ok = (r < rows)[:, None]
    tile = w_ptr + (row0 + r)[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    w_next = w_first  # from _first_tile
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next  # this block's tile, loaded an iteration ago; the next one's loads go out now
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w_next = tl.load(tile + k0 + BLOCK_K, mask=ok & (k + BLOCK_K < K)[None, :], other=0.0)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        if HAS_LN:
            g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            x = ((x - mean) * rstd * g + b).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    return acc


@triton.jit
def _share(n, pid, per_program):
    # this program's rows of an n-row product: (first row, count)
    row0 = pid * per_program
    return row0, tl.maximum(tl.minimum(n - row0, per_program), 0)


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, stride_n, start, end, scale, DH: tl.constexpr, BLOCK: tl.constexpr):
    # one head's query q [DH] over its keys and values start..end-1 (row stride stride_n), BLOCK keys at a
    # time (online softmax): the unnormalised softmax average acc [DH], its maximum score and its sum (an
    # empty span gives 0, -inf, 0)
    d = tl.arange(0, DH)
    q = tl.load(q_ptr + d, cache_modifier=".cg").to(tl.float32) * scale
    top = float("-inf")
    total = 0.0
    acc = tl.zeros((DH,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        ok = n < end
        k = tl.load(k_ptr + n[:, None] * stride_n + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        scores = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        p = tl.exp(scores - shift)
        alpha = tl.exp(top - shift)
        v = tl.load(v_ptr + n[:, None] * stride_n + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        top = new_top
    return acc, top, total


@triton.jit
def _finish(
    acc, top, total, out_ptr, ws_ptr, count_ptr, head, split,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DH: tl.constexpr,
):  # fmt: skip
    # one split's part of a head (as triton_kernels.attention_kernel): the last split to finish merges the
    # parts from ws [heads*SPLITS, DH + 2] (BLOCK_S: SPLITS rounded up to a power of two), stores out [DH]
    # and zeroes the head's count
    d = tl.arange(0, DH)
    if SPLITS == 1:
        tl.store(out_ptr + d, (acc / total).to(out_ptr.dtype.element_ty))
    else:
        part = ws_ptr + (head * SPLITS + split) * (DH + 2)
        tl.store(part + d, acc)
        tl.store(part + DH, top)
        tl.store(part + DH + 1, total)
        if tl.atomic_add(count_ptr + head, 1) == SPLITS - 1:
            s = tl.arange(0, BLOCK_S)
            parts = ws_ptr + (head * SPLITS + s) * (DH + 2)
            tops = tl.load(parts + DH, mask=s < SPLITS, other=float("-inf"), cache_modifier=".cg")
            totals = tl.load(parts + DH + 1, mask=s < SPLITS, other=0.0, cache_modifier=".cg")
            accs = tl.load(parts[:, None] + d[None, :], mask=(s < SPLITS)[:, None], other=0.0, cache_modifier=".cg")
            best = tl.max(tops, axis=0)
            weight = tl.exp(tops - tl.where(best == float("-inf"), 0.0, best))
            merged = tl.sum(accs * weight[:, None], axis=0) / tl.sum(totals * weight, axis=0)
            tl.store(out_ptr + d, merged.to(out_ptr.dtype.element_ty))
            tl.store(count_ptr + head, 0)


@triton.jit
def decoder_step_kernel(
    x_ptr, pos_ptr, mats_ptr, vecs_ptr,
    self_kv_ptr, stride_self, cross_k_ptr, cross_v_ptr, stride_cross, A,
    q_ptr, a_ptr, h_ptr, ws_ptr, count_ptr, bars_ptr, stuck_ptr,
    L, eps, scale, R_QKV, R_D, R_F, dim,
    D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_X: tl.constexpr,
    KB_QKV: tl.constexpr, KB_D: tl.constexpr, KB_F1: tl.constexpr, KB_F2: tl.constexpr,
    BLOCK_QKV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    S_SELF: tl.constexpr, S_CROSS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, PREFETCH: tl.constexpr, POLL: tl.constexpr,
):  # fmt: skip
    # x [D]: slot 0's residual stream (its step inputs on entry, the last layer's output on exit);
    # pos [1]: its position. Per layer l (step_kernel.MATRICES / VECTORS give the layout):
    #   mats [L, 14*D*D]: W_qkv [3D, D], W_out, W_cq, W_co [D, D], W_fc1 [4D, D], W_fc2 [D, 4D];
    #   vecs [L, 17*D]: LN1 g/b, b_qkv, b_out, LN2 g/b, b_cq, b_co, LN3 g/b, b_fc1, b_fc2.
    # self_kv + l*stride_self: slot 0's rows [T, 2, H, DH] (key then value of each position);
    # cross_k/v + l*stride_cross: slot 0's [H, A, DH]. Scratch: q [D], a [D], h [4D] (x's dtype);
    # ws float32 [H*max(S_SELF, S_CROSS)*(DH+2)], count int32 [H], bars int32 [8*L], all zero; stuck int32 [1]
    # counts barriers given up on (_sync).
    # Program p computes rows p*R.. of each product (R_QKV of 3D, R_D of D, R_F of 4D; tiles of BLOCK_*
    # rows by KB_* columns; dim = D at run time, see _rows_times) and attention split p (head p // S,
    # split p % S) of the S_SELF or S_CROSS a head, BLOCK_N keys at a time. Each program prefetches its
    # share of a phase's weights into L2 two phases ahead.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    pos = tl.load(pos_ptr).to(tl.int32)
    length = pos + 1  # the keys self-attention reads, this step's included
    if pid == 0:  # the last barrier of the launch before
        tl.atomic_xchg(bars_ptr + 8 * L - 2, 0)
    q0, nq = _share(3 * D, pid, R_QKV)
    d0, nd = _share(D, pid, R_D)
    f0, nf = _share(4 * D, pid, R_F)
    size = x_ptr.dtype.element_ty.primitive_bitwidth // 8
    # this program's cross-attention keys and values (none past the last split)
    mine = pid < H * S_CROSS
    c_head, c_split = tl.minimum(pid // S_CROSS, H - 1), pid % S_CROSS
    c_span = tl.cdiv(A, S_CROSS)
    c_start = c_split * c_span
    c_end = tl.where(mine, tl.minimum(A, c_start + c_span), c_start)
    c_at = c_head * A * DH + c_start * DH
    _prefetch(mats_ptr + q0 * D, nq * D * size, PREFETCH)  # layer 0's W_qkv and W_out shares
    _prefetch(mats_ptr + 3 * D * D + d0 * D, nd * D * size, PREFETCH)
    r_qkv, r_d, r_f = tl.arange(0, BLOCK_QKV), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_F)
    n_qkv, ok_qkv = q0 + r_qkv, r_qkv < nq
    n_d, ok_d = d0 + r_d, r_d < nd
    n_f, ok_f = f0 + r_f, r_f < nf
    # this program's rows of the residual stream stay in registers (as x's dtype rounds them): every D-row
    # phase gives a program the same rows, so no other program writes them
    res = tl.load(x_ptr + n_d, mask=ok_d, other=0.0).to(tl.float32)
    w1 = _first_tile(mats_ptr, q0, nq, dim, BLOCK_QKV, KB_QKV)
    b1 = tl.load(vecs_ptr + 2 * D + n_qkv, mask=ok_qkv, other=0.0).to(tl.float32)
    bar = 0
    # this layer's weights and caches, advanced a layer at a time (pointer sums: no int32 product overflows)
    mats, vecs, kv = mats_ptr, vecs_ptr, self_kv_ptr
    cross_k, cross_v = cross_k_ptr, cross_v_ptr
    for layer in range(L):
        if layer > 0:
            bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 1. qkv = LN1(x) W_qkvᵀ + b: q to scratch, the new key and value into the cache row at `pos`
        mean, rstd = _stats(x_ptr, eps, D, BLOCK_X)
        acc = _rows_times(w1, mats, x_ptr, vecs, vecs + D, mean, rstd, q0, nq, dim, BLOCK_QKV, KB_QKV, True) + b1
        tl.store(q_ptr + n_qkv, acc.to(q_ptr.dtype.element_ty), mask=ok_qkv & (n_qkv < D))
        tl.store(kv + pos * (2 * D) + (n_qkv - D), acc.to(q_ptr.dtype.element_ty), mask=ok_qkv & (n_qkv >= D))
        _prefetch(mats + 4 * D * D + d0 * D, nd * D * size, PREFETCH)  # W_cq
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 2. self-attention over keys 0..pos, S_SELF splits a head
        for item in range(pid, H * S_SELF, programs):  # one item a program on a GPU (H*S_SELF <= programs)
            head, split = item // S_SELF, item % S_SELF
            span = tl.cdiv(length, S_SELF)
            start = split * span
            end = tl.minimum(length, start + span)
            keys = kv + head * DH
            acc_h, top, total = _attend(q_ptr + head * DH, keys, keys + D, 2 * D, start, end, scale, DH, BLOCK_N)
            _finish(acc_h, top, total, a_ptr + head * DH, ws_ptr, count_ptr, head, split, S_SELF, BLOCK_S, DH)
        _prefetch(cross_k + c_at, (c_end - c_start) * DH * size, PREFETCH)
        _prefetch(cross_v + c_at, (c_end - c_start) * DH * size, PREFETCH)
        w = _first_tile(mats + 3 * D * D, d0, nd, dim, BLOCK_D, KB_D)  # W_out
        b = tl.load(vecs + 5 * D + n_d, mask=ok_d, other=0.0).to(tl.float32)
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 3. x += a W_outᵀ + b
        acc = _rows_times(w, mats + 3 * D * D, a_ptr, vecs, vecs, 0.0, 0.0, d0, nd, dim, BLOCK_D, KB_D, False)
        res = (acc + b + res).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + n_d, res, mask=ok_d)
        res = res.to(tl.float32)
        _prefetch(mats + 5 * D * D + d0 * D, nd * D * size, PREFETCH)  # W_co
        w = _first_tile(mats + 4 * D * D, d0, nd, dim, BLOCK_D, KB_D)  # W_cq
        b = tl.load(vecs + 8 * D + n_d, mask=ok_d, other=0.0).to(tl.float32)
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 4. cross q = LN2(x) W_cqᵀ + b
        mean, rstd = _stats(x_ptr, eps, D, BLOCK_X)
        acc = _rows_times(
            w, mats + 4 * D * D, x_ptr, vecs + 6 * D, vecs + 7 * D, mean, rstd, d0, nd, dim, BLOCK_D, KB_D, True
        )
        tl.store(q_ptr + n_d, (acc + b).to(q_ptr.dtype.element_ty), mask=ok_d)
        _prefetch(mats + 6 * D * D + f0 * D, nf * D * size, PREFETCH)  # W_fc1
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 5. cross-attention over the A audio positions, S_CROSS splits a head
        for item in range(pid, H * S_CROSS, programs):  # as for self-attention
            head, split = item // S_CROSS, item % S_CROSS
            start = split * c_span
            end = tl.minimum(A, start + c_span)
            at = head * A * DH
            acc_h, top, total = _attend(
                q_ptr + head * DH, cross_k + at, cross_v + at, DH, start, end, scale, DH, BLOCK_N
            )
            _finish(acc_h, top, total, a_ptr + head * DH, ws_ptr, count_ptr, head, split, S_CROSS, BLOCK_S, DH)
        _prefetch(mats + 10 * D * D + d0 * 4 * D, nd * 4 * D * size, PREFETCH)  # W_fc2
        w = _first_tile(mats + 5 * D * D, d0, nd, dim, BLOCK_D, KB_D)  # W_co
        b = tl.load(vecs + 9 * D + n_d, mask=ok_d, other=0.0).to(tl.float32)
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 6. x += a W_coᵀ + b
        acc = _rows_times(w, mats + 5 * D * D, a_ptr, vecs, vecs, 0.0, 0.0, d0, nd, dim, BLOCK_D, KB_D, False)
        res = (acc + b + res).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + n_d, res, mask=ok_d)
        res = res.to(tl.float32)
        more = layer + 1 < L
        _prefetch(mats + 14 * D * D + q0 * D, tl.where(more, nq, 0) * D * size, PREFETCH)  # next W_qkv
        w_f = _first_tile(mats + 6 * D * D, f0, nf, dim, BLOCK_F, KB_F1)  # W_fc1
        b_f = tl.load(vecs + 12 * D + n_f, mask=ok_f, other=0.0).to(tl.float32)
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 7. h = GELU(LN3(x) W_fc1ᵀ + b), exact (erf) GELU
        mean, rstd = _stats(x_ptr, eps, D, BLOCK_X)
        acc_f = _rows_times(
            w_f, mats + 6 * D * D, x_ptr, vecs + 10 * D, vecs + 11 * D, mean, rstd, f0, nf, dim, BLOCK_F, KB_F1, True
        )
        acc_f += b_f
        acc_f = 0.5 * acc_f * (1.0 + tl.erf(acc_f * 0.7071067811865476))
        tl.store(h_ptr + n_f, acc_f.to(h_ptr.dtype.element_ty), mask=ok_f)
        _prefetch(mats + 17 * D * D + d0 * D, tl.where(more, nd, 0) * D * size, PREFETCH)  # next W_out
        w = _first_tile(mats + 10 * D * D, d0, nd, 4 * dim, BLOCK_D, KB_F2)  # W_fc2
        b = tl.load(vecs + 16 * D + n_d, mask=ok_d, other=0.0).to(tl.float32)
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)
        # 8. x += h W_fc2ᵀ + b
        acc = _rows_times(w, mats + 10 * D * D, h_ptr, vecs, vecs, 0.0, 0.0, d0, nd, 4 * dim, BLOCK_D, KB_F2, False)
        res = (acc + b + res).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + n_d, res, mask=ok_d)
        res = res.to(tl.float32)
        # the next layer's first W_qkv tile and bias (none after the last layer)
        nq_next = tl.where(more, nq, 0)
        w1 = _first_tile(mats + 14 * D * D, q0, nq_next, dim, BLOCK_QKV, KB_QKV)
        b1 = tl.load(vecs + 19 * D + n_qkv, mask=r_qkv < nq_next, other=0.0).to(tl.float32)
        mats += 14 * D * D
        vecs += 17 * D
        kv += stride_self
        cross_k += stride_cross
        cross_v += stride_cross
