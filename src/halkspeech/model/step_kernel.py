"""The persistent decode step: a batch-1 step's decoder layers in one kernel launch (triton_step.py).

The fused path (kernels.py) runs a batch-1 step as 8 kernels a layer, each a few µs of launch, ramp-up and
tail (large-v3: ~260 kernels, 1.66 ms a step on an H100, against 0.48 ms of weight reads). This kernel runs
one program per SM through every layer: each phase (a projection or an attention) is split over the
programs, phases meet at grid-wide barriers, and each program loads its share of the next phase's weights
before it waits, so the weight stream does not stop at the barriers.

The kernel indexes every layer's weights from two stacked buffers (`StackedLayers`): the decoder's own
parameters become views into them, so the model keeps one copy. Batch 1 only: a single slot (slot 0) in
the step, as in a lone transcription or a live turn.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from halkspeech.model.cache import KVCache

#: Each layer's matrices in `StackedLayers.mats`, in order: (module, rows and columns in units of D).
MATRICES = (("qkv", 3, 1), ("out", 1, 1), ("cross_q", 1, 1), ("cross_out", 1, 1), ("fc1", 4, 1), ("fc2", 1, 4))
#: Each layer's vectors in `StackedLayers.vecs`, in order: (module, parameter, length in units of D).
VECTORS = (
    ("attn_ln", "weight", 1), ("attn_ln", "bias", 1), ("qkv", "bias", 3), ("out", "bias", 1),
    ("cross_ln", "weight", 1), ("cross_ln", "bias", 1), ("cross_q", "bias", 1), ("cross_out", "bias", 1),
    ("mlp_ln", "weight", 1), ("mlp_ln", "bias", 1), ("fc1", "bias", 4), ("fc2", "bias", 1),
)  # fmt: skip


def _k_block(rows_block: int, k: int, elements: int) -> int:
    """Columns of W a program reads per iteration: a tile of about `elements` (a power of two) with
    `rows_block` rows, at most k rounded up to a power of two."""
    return max(min(elements // rows_block, _pow2(k)), 16)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class StepPlan:
    """How the kernel splits a step over its programs: rows of each product a program computes (3D, D and
    4D rows), attention splits a head (self, cross) and the register tiles these need (powers of two)."""

    programs: int
    rows_qkv: int
    rows_d: int
    rows_f: int
    splits_self: int
    splits_cross: int
    warps: int

    @classmethod
    def for_model(cls, d: int, heads: int, programs: int, warps: int = 16) -> StepPlan:
        splits = max(programs // heads, 1)
        return cls(
            programs=programs,
            rows_qkv=-(-3 * d // programs),
            rows_d=-(-d // programs),
            rows_f=-(-4 * d // programs),
            splits_self=splits,
            splits_cross=splits,
            warps=warps,
        )


@dataclass
class StackedLayers:
    """Every decoder layer's weights in two buffers, as the kernel reads them: mats [L, 14·D²] (`MATRICES`,
    each row-major) and vecs [L, 17·D] (`VECTORS`), plus the kernel's scratch (zeroed once, left zeroed)."""

    mats: Tensor
    vecs: Tensor
    heads: int
    scratch: dict[str, Tensor]
    #: warps a program (two programs of 4 warps a SM were the fastest measured: bench/gpu_step.py, B)
    warps: int = 4
    #: launch cooperatively (the driver guarantees every program is resident, which the barriers need)
    cooperative: bool = True
    #: how each program prefetches its next weights into L2 (triton_step._prefetch: 1 bulk, 2 per line, 0 none)
    prefetch: int = 0
    #: elements of W and keys a program reads per iteration (one program per SM: its only loads in flight)
    tile: int = 8192
    key_block: int = 128
    #: how a program waits at a barrier (triton_step._sync: 0 atomic reads, 1 volatile loads)
    poll: int = 0
    #: programs per SM (all resident at once: the cooperative launch refuses a grid that cannot be)
    per_sm: int = 2

    @classmethod
    def adopt(cls, blocks: Iterable[nn.Module], heads: int) -> StackedLayers:
        """Copy the blocks' weights into stacked buffers and make each parameter a view of its place there."""
        blocks = list(blocks)
        first = blocks[0].get_parameter("qkv.weight")
        d: int = first.shape[1]
        count = len(blocks)
        dtype, device = first.dtype, first.device
        mats = torch.empty(count, 14 * d * d, dtype=dtype, device=device)
        vecs = torch.empty(count, 17 * d, dtype=dtype, device=device)
        for layer, block in enumerate(blocks):
            at = 0
            for name, rows, cols in MATRICES:
                param = block.get_parameter(f"{name}.weight")
                size = rows * cols * d * d
                view = mats[layer, at : at + size].view(rows * d, cols * d)
                view.copy_(param.detach())
                param.data = view
                at += size
            at = 0
            for name, attr, length in VECTORS:
                param = block.get_parameter(f"{name}.{attr}")
                view = vecs[layer, at : at + length * d]
                view.copy_(param.detach())
                param.data = view
                at += length * d
        splits = max(4 * _programs(device) // heads, 1)  # room for up to 4 programs per SM
        scratch = {
            "q": torch.empty(d, dtype=dtype, device=device),
            "a": torch.empty(d, dtype=dtype, device=device),
            "h": torch.empty(4 * d, dtype=dtype, device=device),
            "ws": torch.zeros(heads * splits * (d // heads + 2), dtype=torch.float32, device=device),
            "count": torch.zeros(heads, dtype=torch.int32, device=device),
            "bars": torch.zeros(8 * count, dtype=torch.int32, device=device),
            "stuck": torch.zeros(1, dtype=torch.int32, device=device),
        }
        return cls(mats=mats, vecs=vecs, heads=heads, scratch=scratch)

    @property
    def layers(self) -> int:
        return self.mats.shape[0]

    @property
    def width(self) -> int:
        return self.vecs.shape[1] // 17


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs the kernel runs: one per SM on a GPU; one in Triton's interpreter, which runs programs one
    after another (so a barrier with more would never open)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _kernel() -> Any:
    from halkspeech.model import triton_step

    return triton_step.decoder_step_kernel


def decoder_layers(x: Tensor, positions: Tensor, stacked: StackedLayers, cache: KVCache) -> Any:
    """Run every decoder layer of slot 0's step on x [1, D] in place (its step inputs on entry, the last
    layer's output on exit): positions [1] its position, whose key and value each layer writes into `cache`.
    Returns Triton's handle of the launched kernel (its registers and spills, for benchmarks)."""
    d, heads = stacked.width, stacked.heads
    if x.shape != (1, d) or positions.shape[0] != 1:
        raise ValueError(f"persistent step: x {tuple(x.shape)} / positions {tuple(positions.shape)} are not one slot")
    plan = StepPlan.for_model(d, heads, _programs(x.device) * stacked.per_sm, stacked.warps)
    dh = d // heads
    cuda = x.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    audio = cache.cross_k.shape[3]
    s, tile = stacked.scratch, stacked.tile
    qkv, rows, mlp = _pow2(plan.rows_qkv), _pow2(plan.rows_d), _pow2(plan.rows_f)
    cooperative = {"launch_cooperative_grid": True} if cuda and stacked.cooperative else {}
    return _kernel()[(plan.programs,)](
        x, positions, stacked.mats, stacked.vecs,
        cache.self_kv, cache.self_kv.stride(0), cache.cross_k, cache.cross_v, cache.cross_k.stride(0), audio,
        s["q"], s["a"], s["h"], s["ws"], s["count"], s["bars"], s["stuck"],
        stacked.layers, 1e-5, dh**-0.5, plan.rows_qkv, plan.rows_d, plan.rows_f, d,
        D=d, H=heads, DH=dh, BLOCK_X=_pow2(d),
        KB_QKV=_k_block(qkv, d, tile), KB_D=_k_block(rows, d, tile), KB_F1=_k_block(mlp, d, tile),
        KB_F2=_k_block(rows, 4 * d, tile), BLOCK_QKV=qkv, BLOCK_D=rows, BLOCK_F=mlp,
        S_SELF=plan.splits_self, S_CROSS=plan.splits_cross, BLOCK_N=stacked.key_block,
        BLOCK_S=_pow2(max(plan.splits_self, plan.splits_cross)),
        PREFETCH=stacked.prefetch if cuda else 0, POLL=stacked.poll,
        num_warps=plan.warps, num_stages=1, **cooperative,
    )  # fmt: skip
