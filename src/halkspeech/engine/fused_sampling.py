"""Greedy sampling without timestamp rules in one Triton kernel: the plain transcription step's ~25 PyTorch kernels
(blank and token suppression, forced length, log-softmax, argmax, gather, the state's advance), each 1–2 µs
on an H200 whatever its size, were a tenth of a batch-1 turbo step.

The semantics are `Sampler.filter` + `Sampler.sample` (greedy) + `Sampler.advance` (sampling.py); tests hold
the two equal in Triton's interpreter. Grid (rows, CHUNKS): each program filters one slice of one row's logits
in place, keeps the slice's max, first argmax and sum of exponentials, and the last program of the row to
finish (an atomic count) combines the slices, writes the token and its log-probability and advances the row.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

CHUNKS = 64  # programs per row, one block each: one row of logits (51866 floats) is too much for one SM
BLOCK = 1024


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_kernel(
        logits_ptr, ints_ptr, flags_ptr, suppress_ptr, blank_ptr, tokens_ptr, chosen_ptr,
        part_max_ptr, part_arg_ptr, part_sum_ptr, count_ptr,
        V, stride_l, stride_i, stride_f, stride_s, eot, timestamp_begin,
        TOKENS: tl.constexpr, POSITIONS: tl.constexpr, PREV: tl.constexpr, N_GEN: tl.constexpr,
        LAST_TS: tl.constexpr, BLANK: tl.constexpr, NO_EOT: tl.constexpr, ACTIVE: tl.constexpr,
        N_BLANK: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # logits [B, V] float32 (filtered in place); ints [S, 6] long and flags [S, 4] bool (sampling.SlotState,
        # its fields' columns given as TOKENS..ACTIVE); suppress [S, V] bool; blank [N_BLANK] long; out: tokens
        # [B] long, chosen [B] float32; part_* [B, CHUNKS] and count [B] scratch, count zero on entry and exit
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

    return greedy_kernel


class FusedGreedy:
    """Greedy, timestamp-free sampling of a decode step in one launch (see the module docstring)."""

    def __init__(
        self,
        eot: int,
        timestamp_begin: int,
        blank: tuple[int, ...],
        slots: int,
        device: torch.device,
        int_fields: tuple[str, ...],
        flag_fields: tuple[str, ...],
    ) -> None:
        """int_fields / flag_fields: the names of the state's packed columns (sampling.INT_FIELDS,
        FLAG_FIELDS), so the kernel reads the columns the state really has."""
        ints = ("tokens", "positions", "prev", "n_gen", "last_ts")
        self.columns = {name.upper(): int_fields.index(name) for name in ints}
        self.columns |= {name.upper(): flag_fields.index(name) for name in ("blank", "no_eot", "active")}
        self.eot = eot
        self.timestamp_begin = timestamp_begin
        self.blank = torch.tensor(blank, dtype=torch.long, device=device)
        # scratch for every slot, allocated once: captured graphs keep pointing at it
        self.part_max = torch.empty(slots * CHUNKS, dtype=torch.float32, device=device)
        self.part_sum = torch.empty(slots * CHUNKS, dtype=torch.float32, device=device)
        self.part_arg = torch.empty(slots * CHUNKS, dtype=torch.int32, device=device)
        self.count = torch.zeros(slots, dtype=torch.int32, device=device)

    def __call__(self, logits: Tensor, ints: Tensor, flags: Tensor, suppress: Tensor) -> tuple[Tensor, Tensor]:
        """logits [B, V] float32 (filtered in place), the state's ints [B, 6], flags [B, 4], suppress [B, V]
        (rows 0..B-1, advanced in place) → (tokens [B] long, their log-probabilities [B] float32)."""
        rows, vocab = logits.shape
        if rows > self.count.numel() or logits.stride(1) != 1 or suppress.stride(1) != 1:
            raise ValueError(f"FusedGreedy: logits {tuple(logits.shape)}: over {self.count.numel()} rows, or strided")
        tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
        chosen = torch.empty(rows, dtype=torch.float32, device=logits.device)
        chunk = -(-vocab // (CHUNKS * BLOCK)) * BLOCK
        _kernel()[(rows, CHUNKS)](
            logits, ints, flags, suppress, self.blank, tokens, chosen,
            self.part_max, self.part_arg, self.part_sum, self.count,
            vocab, logits.stride(0), ints.stride(0), flags.stride(0), suppress.stride(0), self.eot,
            self.timestamp_begin,
            **self.columns, N_BLANK=self.blank.numel(), CHUNKS=CHUNKS, CHUNK=chunk, BLOCK=BLOCK,
        )  # fmt: skip
        return tokens, chosen
