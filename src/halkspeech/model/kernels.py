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

On Hopper these launch with programmatic dependent launch (`set_pdl`). One more kernel serves the encoder:
`layer_norm`, a LayerNorm of x + shift, with which the encoder's residual stream can leave out its biases
(Encoder.use_fused_kernels).

The Triton code is in triton_kernels.py, imported lazily: CPU installs need not have Triton (tests run these
kernels in Triton's interpreter, `TRITON_INTERPRET=1`, when it is installed).
"""

from __future__ import annotations

import functools
import os
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


_pdl = True


def set_pdl(enabled: bool) -> None:
    """Programmatic dependent launch for kernels launched (or graphs captured) from now on, where the device
    has it (sm90 and later; on by default): each kernel is launched while the one before it runs and waits
    for it on the device (triton_kernels.pdl_wait). A step is hundreds of kernels of a few µs, and this hides
    most of each launch: large-v3's batch-1 step 1.81 → 1.66 ms on an H100 (bench/gpu_fused.py, P).
    Loading the first block of weights before the wait made it slower (1.84 ms): it cost the loop its
    pipelining, and the next kernel is launched too late to overlap much."""
    global _pdl
    _pdl = enabled


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch_options(device: torch.device) -> dict[str, Any]:
    """A fused kernel's PDL constexpr, and Triton's launch option when it is on (`set_pdl`)."""
    pdl = _pdl and _pdl_capable(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


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
    """Imports (once, on first use) and returns the Triton kernels; each compiles on its first launch."""
    import triton

    from halkspeech.model import triton_kernels as tk

    return {
        "linear": tk.linear_kernel,
        "step_inputs": tk.step_inputs_kernel,
        "attention": tk.attention_kernel,
        "layer_norm": tk.layer_norm_kernel,
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
    ws, count = workspace(x.device, m * n, grid[0] * grid[1]) if cfg.split_k > 1 else (out, out)
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
        num_warps=cfg.warps, num_stages=cfg.stages, **launch_options(x.device),
    )  # fmt: skip
    return out


_workspaces: dict[tuple[torch.device, str], tuple[Tensor, Tensor]] = {}
_retired: list[tuple[Tensor, Tensor]] = []


def workspace(device: torch.device, elements: int, tiles: int, use: str = "linear") -> tuple[Tensor, Tensor]:
    """A float32 scratch buffer and int32 counters for cross-program reductions (split-K, split attention; the
    absorbed cross-attention's splits, model/absorbed.py), one pair per device and use: zeroed once (the
    kernels here accumulate into theirs and leave it zeroed), and shared by all calls of a use, which is
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
        **launch_options(embedding.device),
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
    ws, count = workspace(q.device, b * h * splits * (dh + 2), b * h, use="attention")
    kern = _kernels()
    kern["attention"][(b, h, splits)](
        q, keys, values, lengths if lengths is not None else out, out, ws, count,
        h, q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        lengths.stride(0) if lengths is not None else 0, keys.shape[2], length_offset, dh**-0.5,
        HAS_LEN=lengths is not None, DH=dh, BLOCK_N=block_n, SPLITS=splits, num_warps=warps, **launch_options(q.device),
    )  # fmt: skip
    return out


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, *, shift: Tensor | None = None, eps: float = 1e-5, rows: int = 1
) -> Tensor:
    """LayerNorm over the last dimension of x [M, D] (unit column stride) → [M, D] in x's dtype, of x + shift
    when shift [D] (float32) is given: the encoder's residual stream is kept without its projections' biases,
    which its LayerNorms add back this way (Encoder.forward_fused)."""
    m, d = x.shape
    if x.stride(1) != 1 or weight.shape != (d,) or (shift is not None and shift.shape != (d,)):
        raise ValueError(f"layer_norm: x {tuple(x.shape)} / weight {tuple(weight.shape)} / shift do not fit")
    out = torch.empty(m, d, dtype=x.dtype, device=x.device)
    kern = _kernels()
    kern["layer_norm"][(kern["cdiv"](m, rows),)](
        x, shift if shift is not None else weight, weight, bias, out, m, d, x.stride(0), out.stride(0), eps,
        HAS_SHIFT=shift is not None, ROWS=rows, BLOCK_D=1 << (d - 1).bit_length(),
    )  # fmt: skip
    return out
