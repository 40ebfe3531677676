"""Triton kernel behind quant.quantize_rows: one program per row."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quantize_rows_kernel(X, Y, S, W, B, n_cols, stride_x, eps, PROLOGUE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:  # layer norm
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / n_cols
        gamma = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        beta = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        x = centred * tl.rsqrt(var + eps) * gamma + beta
    elif PROLOGUE == 2:  # bias + exact GELU
        x = x + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    scale = tl.maximum(amax, 1e-6) / 448.0
    # round to nearest even, as torch's cast does (the default truncates: twice the error)
    tl.store(Y + row * n_cols + cols, (x / scale).to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(S + row, scale)
