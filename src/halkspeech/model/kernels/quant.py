"""Row-wise FP8 (e4m3) quantisation of activations, optionally fused with what precedes the next GEMM:
a LayerNorm, or a bias + exact GELU. One pass over the rows instead of three (measured on an H200: eager
abs/amax/div/cast of a [96000, 1280] bf16 tensor takes 0.9 ms, as long as the FP8 GEMM it feeds saves).

quantize_rows(x [M, K]) → (x8 [M, K] float8_e4m3fn, scale [M, 1] float32) with x ≈ x8 * scale.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor

from halkspeech.model.kernels import use_triton

FP8_MAX = 448.0  # largest finite e4m3 value


class Prologue(IntEnum):
    NONE = 0
    LAYER_NORM = 1  # layer_norm(x) * weight + bias
    BIAS_GELU = 2  # gelu(x + bias), exact (erf) GELU as Whisper uses


def quantize_rows(
    x: Tensor,
    prologue: Prologue = Prologue.NONE,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """x [M, K] (contiguous rows) → (e4m3 [M, K], float32 scales [M, 1])."""
    if use_triton(x.device):
        return _quantize_triton(x, prologue, weight, bias, eps)
    return quantize_rows_reference(x, prologue, weight, bias, eps)


def quantize_rows_reference(
    x: Tensor,
    prologue: Prologue = Prologue.NONE,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    y = x.float()
    if prologue == Prologue.LAYER_NORM:
        y = F.layer_norm(y, y.shape[-1:], weight.float() if weight is not None else None,
                         bias.float() if bias is not None else None, eps)  # fmt: skip
    elif prologue == Prologue.BIAS_GELU:
        y = F.gelu(y + bias.float() if bias is not None else y)
    scale = y.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6) / FP8_MAX
    return (y / scale).to(torch.float8_e4m3fn), scale


def _quantize_triton(
    x: Tensor, prologue: Prologue, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    import triton

    from halkspeech.model.kernels._quant_triton import quantize_rows_kernel

    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    dummy = x  # unused pointer arguments for prologues that need no parameters
    block = triton.next_power_of_2(cols)
    quantize_rows_kernel[(rows,)](
        x,
        out,
        scale,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        cols,
        x.stride(0),
        eps,
        PROLOGUE=int(prologue),
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return out, scale
