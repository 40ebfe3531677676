"""The Triton code of the fused greedy sampler (fused_sampling.py, which imports this module on first use)."""

from __future__ import annotations

import triton
import triton.language as tl

from halkspeech.model.triton_kernels import pdl_wait


@triton.jit
def greedy_kernel(
    logits_ptr, ints_ptr, flags_ptr, suppress_ptr, blank_ptr, tokens_ptr, chosen_ptr,
    part_max_ptr, part_arg_ptr, part_sum_ptr, count_ptr,
    V, stride_l, stride_i, stride_f, stride_s, eot, timestamp_begin,
    TOKENS: tl.constexpr, POSITIONS: tl.constexpr, PREV: tl.constexpr, N_GEN: tl.constexpr,
    LAST_TS: tl.constexpr, BLANK: tl.constexpr, NO_EOT: tl.constexpr, ACTIVE: tl.constexpr,
    N_BLANK: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # logits [B, V] float32 (filtered in place); ints [S, 6] long and flags [S, 4] bool (sampling.SlotState,
    # its fields' columns given as TOKENS..ACTIVE); suppress [S, V] bool; blank [N_BLANK] long; out: tokens
    # [B] long, chosen [B] float32; part_* [B, CHUNKS] and count [B] scratch, count zero on entry and exit
    pdl_wait(PDL)  # the logits come from the kernel before
    row, chunk = tl.program_id(0), tl.program_id(1)
    n_gen = tl.load(ints_ptr + row * stride_i + N_GEN)
    blank_on = (tl.load(flags_ptr + row * stride_f + BLANK) != 0) & (n_gen == 0)
    no_eot = tl.load(flags_ptr + row * stride_f + NO_EOT) != 0
    best = float("-inf")
    best_at = 0
    total = 0.0  # sum of exp(logit - best) over this slice
    end = tl.minimum(V, (chunk + 1) * CHUNK)
    for v0 in range(chunk * CHUNK, end, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < end
        logit = tl.load(logits_ptr + row * stride_l + cols, mask=ok, other=float("-inf"))
        hide = tl.load(suppress_ptr + row * stride_s + cols, mask=ok, other=0) != 0
        hide = hide | ((cols == eot) & no_eot)
        for i in tl.static_range(N_BLANK):
            hide = hide | ((cols == tl.load(blank_ptr + i)) & blank_on)
        logit = tl.where(hide, float("-inf"), logit)
        tl.store(logits_ptr + row * stride_l + cols, logit, mask=ok)
        block_best = tl.max(logit, axis=0)
        block_at = v0 + tl.argmax(logit, axis=0, tie_break_left=True)
        new_best = tl.maximum(best, block_best)
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # all hidden so far: nothing to sum
        total = total * tl.exp(best - shift) + tl.sum(tl.exp(logit - shift), axis=0)
        best_at = tl.where(block_best > best, block_at, best_at)  # strictly greater: the first maximum wins
        best = new_best
    slot = row * CHUNKS + chunk
    tl.store(part_max_ptr + slot, best)
    tl.store(part_arg_ptr + slot, best_at)
    tl.store(part_sum_ptr + slot, total)
    if tl.atomic_add(count_ptr + row, 1) == CHUNKS - 1:  # the row's last slice: combine and advance
        parts = row * CHUNKS + tl.arange(0, CHUNKS)
        # the other slices' stores are ordered before their count increments (release), which this
        # program's increment acquires; ".cg" reads them from L2, past this SM's L1
        maxes = tl.load(part_max_ptr + parts, cache_modifier=".cg")
        ats = tl.load(part_arg_ptr + parts, cache_modifier=".cg")
        sums = tl.load(part_sum_ptr + parts, cache_modifier=".cg")
        top = tl.max(maxes, axis=0)
        token = tl.min(tl.where(maxes == top, ats, V), axis=0)  # the first slice holding the maximum
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(sums * tl.exp(maxes - shift), axis=0)
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(chosen_ptr + row, top - shift - tl.log(total))  # log-softmax at the argmax
        if tl.load(flags_ptr + row * stride_f + ACTIVE) != 0:  # advance the row's state
            base = ints_ptr + row * stride_i
            tl.store(base + PREV, tl.load(base + TOKENS))  # the token just consumed
            tl.store(base + TOKENS, token.to(tl.int64))
            tl.store(base + POSITIONS, tl.load(base + POSITIONS) + 1)
            tl.store(base + N_GEN, n_gen + 1)
            if token >= timestamp_begin:
                tl.store(base + LAST_TS, token.to(tl.int64))
        tl.store(count_ptr + row, 0)
