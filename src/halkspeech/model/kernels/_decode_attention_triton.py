"""Triton kernels behind decode_attention: per (sequence, head, split) online softmax over a key range,
then a combine of the splits' partial results."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_kernel(
    Q, K, V, KS, VS, Out, Part, Maxes, Sums,
    keys, sm_scale,
    sqb, sqh, skb, skh, ska, svb, svh, sva, sksb, sksh, svsb, svsh,
    D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, NSPLIT: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + d).to(tl.float32) * sm_scale
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, keys)
    running_max = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n = lo + offset + tl.arange(0, BLOCK_N)
        live = n < hi
        k = tl.load(K + b * skb + h * skh + n[:, None] * ska + d[None, :], mask=live[:, None], other=0.0)
        k_scale = tl.load(KS + b * sksb + h * sksh + n, mask=live, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * k_scale
        scores = tl.where(live, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max)
        total = total * rescale + tl.sum(p, axis=0)
        v = tl.load(V + b * svb + h * svh + n[:, None] * sva + d[None, :], mask=live[:, None], other=0.0)
        v_scale = tl.load(VS + b * svsb + h * svsh + n, mask=live, other=0.0)
        acc = acc * rescale + tl.sum((p * v_scale)[:, None] * v.to(tl.float32), axis=0)
        running_max = new_max
    if SPLIT:
        at = (b * tl.num_programs(1) + h) * NSPLIT + split
        tl.store(Part + at * D + d, acc)
        tl.store(Maxes + at, running_max)
        tl.store(Sums + at, total)
    else:
        tl.store(Out + (b * tl.num_programs(1) + h) * D + d, (acc / total).to(Out.dtype.element_ty))


@triton.jit
def combine_kernel(Part, Maxes, Sums, Out, NSPLIT: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * tl.num_programs(1) + h) * NSPLIT
    s = tl.arange(0, NSPLIT)
    d = tl.arange(0, D)
    maxes = tl.load(Maxes + base + s)
    weights = tl.exp(maxes - tl.max(maxes, axis=0))
    total = tl.sum(tl.load(Sums + base + s) * weights, axis=0)
    acc = tl.load(Part + (base + s)[:, None] * D + d[None, :])
    out = tl.sum(acc * weights[:, None], axis=0) / total
    tl.store(Out + (b * tl.num_programs(1) + h) * D + d, out.to(Out.dtype.element_ty))
