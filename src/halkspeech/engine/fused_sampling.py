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

from halkspeech.model.kernels import launch_options

CHUNKS = 64  # programs per row, one block each: one row of logits (51866 floats) is too much for one SM
BLOCK = 1024


@functools.cache
def _kernel() -> Any:
    from halkspeech.engine.triton_sampling import greedy_kernel

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
            **launch_options(logits.device),
        )  # fmt: skip
        return tokens, chosen
