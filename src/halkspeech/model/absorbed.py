"""Cross-attention over the encoder output itself, for decode steps of many slots.

Per layer Whisper's cross-attention reads each slot's keys K = E·Wkᵀ and values V = E·Wvᵀ + bv, two [A, D]
tensors made from the same encoder output E [A, D]. Per head h (Wk_h, Wv_h: the head's Dh rows of Wk, Wv):

    softmax(q_h·K_hᵀ/√Dh)·V_h = softmax(Q'_h·Eᵀ)·E·Wv_hᵀ + bv_h,   Q'_h = q_h·Wk_h/√Dh

(a key bias would shift every score of a head alike, which the softmax ignores; the weights sum to 1, so bv passes
through). So a step can read E once, 3.8 MB a large-v3 slot a layer, instead of K and V, 7.7 MB: the query goes
into model space first (Q', a batched product over heads), the kernel forms z_h = softmax(Q'_h·Eᵀ)·E, and a
second batched product brings z back to the head's Dh values (bv is folded into cross_out's bias). Half the bytes
at ~20× the FLOPs, which a decode step over many slots has to spare: on an H100 a large-v3 layer at 64 slots took
128 µs against SDPA's 161 over K and V, at 256 slots 372 against 622 (bench/gpu_absorbed_cross.py). Steps of few
slots keep K and V (the fused kernels read them at batch 1, where two more products would cost more than the
bytes saved), and so do prefill and word timing; the cache keeps E beside them (KVCache.cross_e).

The kernel is CUDA C++ (assets/absorbed_cross.cu, compiled at run time by NVRTC: model/cuda_rtc.py), for fp16 on
sm_80 and later (bf16 would need its MMA and conversion variants); `attend_reference` is the same product in
PyTorch, for the CPU tests.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from halkspeech.model import cuda_rtc, kernels

log = logging.getLogger(__name__)

WARPS = 8  # a block's warps; the model width is split over them (D must be a multiple of 16 × WARPS)
BLOCK_KEYS = 32
MAX_HEADS = 24  # three n8 tiles of the MMA
MAX_SPLITS = 4  # key splits a slot's block may share (a step of few slots has too few blocks for the SMs)
#: The narrowest model the engine turns it on for: a step's replay on an H100 (bench/gpu_absorbed_step.py) took
#: large-v3 (1280) 7.74 → 6.35 ms at 64 slots and turbo 1.06 → 0.89, but tiny (384) 0.37 → 0.40 ms at 32 slots and
#: 0.51 → 0.53 at 64: there the keys and values are too few bytes for the two extra products to pay
MIN_WIDTH = 1280


def supported(device: torch.device, dtype: torch.dtype, width: int, heads: int) -> bool:
    """Whether the kernel runs here: a CUDA device of sm_80+ with NVRTC, fp16, and a model width and head count
    it tiles (every Whisper size: widths 384…1280 are multiples of 128, at most 20 heads); and whether it
    compiles and loads there, for every split count, which happens now rather than in the first large step (a
    failure is logged, and the steps keep their keys and values)."""
    if device.type != "cuda" or dtype != torch.float16:
        return False
    if width % (16 * WARPS) or heads > MAX_HEADS or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if not cuda_rtc.available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        for splits in range(1, MAX_SPLITS + 1):
            load(width, heads, splits, index)
    except cuda_rtc.CudaRtcError as exc:
        log.warning("the cross-attention over the audio is off: %s", exc)
        return False
    return True


@functools.cache
def splits_for(batch: int, device: torch.device) -> int:
    """Key splits for a step of `batch` slots: enough blocks to fill the SMs (a slot's block keeps one SM busy
    ~170 µs for large-v3), at most MAX_SPLITS. On an H100 (132 SMs): 4 at 32 slots, 2 at 64, 1 from 128 up, each
    the fastest measured at its batch."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, sms // batch))


@functools.cache
def load(
    width: int, heads: int, splits: int, device: int, switches: tuple[tuple[str, int], ...] = ()
) -> tuple[cuda_rtc.Kernel, cuda_rtc.Kernel]:
    """The kernels for these sizes, loaded into `device`'s context (a module belongs to one device's context:
    each engine of several GPUs loads its own). `switches`: more -D defines, the benchmark's (WARPS, PREFETCH,
    ABLATE: assets/absorbed_cross.cu; bench/gpu_absorbed_cross.py)."""
    major, minor = torch.cuda.get_device_capability(device)
    source = resources.files("halkspeech.model").joinpath("assets/absorbed_cross.cu").read_text()
    defines: dict[str, int | str] = {"D": width, "HEADS": heads, "WARPS": WARPS, "BK": BLOCK_KEYS, "SPLITS": splits}
    defines.update(switches)
    cubin = cuda_rtc.compile_cubin(source, "absorbed_cross", f"sm_{major}{minor}", defines)
    # the block's shared memory (the .cu's layout): two stages of BK keys with padded rows, the partial scores
    # [WARPS, 24, 36] float32, P [24, 40] fp16, and the rescale factors and denominators [2, 24] float32
    warps = int(defines["WARPS"])
    shared = 2 * BLOCK_KEYS * (width + 8) * 2 + warps * MAX_HEADS * 36 * 4 + MAX_HEADS * 40 * 2 + 2 * MAX_HEADS * 4
    with torch.cuda.device(device):
        return cuda_rtc.Kernel(cubin, "absorbed_cross", shared), cuda_rtc.Kernel(cubin, "absorbed_merge", 0)


def attend(
    qp: Tensor, e: Tensor, out: Tensor, *, splits: int = 1, switches: tuple[tuple[str, int], ...] = ()
) -> Tensor:
    """out[b, h] = softmax(qp[b, h]·e[b]ᵀ)·e[b]: qp, out [B, H, D] (any strides over B and H, unit over D, so the
    [H, B, D] layout of a batched product over heads serves), e [≥B, A, D] rows of unit stride; fp16, on CUDA
    (launched on the current stream: `qp`'s device must be the current one, as the engine thread keeps it).
    With splits > 1 the partial sums and each split's softmax state go through a float32 workspace
    (kernels.workspace, kept for the graphs that point at it)."""
    b, h, d = qp.shape
    if e.shape[0] < b or e.shape[2] != d or out.shape != qp.shape or {qp.dtype, e.dtype, out.dtype} != {torch.float16}:
        raise ValueError(f"absorbed attention: q {tuple(qp.shape)}, e {tuple(e.shape)}, out {tuple(out.shape)}")
    if qp.stride(2) != 1 or e.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("absorbed attention: the model width must have unit stride")
    index = qp.device.index if qp.device.index is not None else torch.cuda.current_device()
    cross, merge = load(d, h, splits, index, switches)
    ws = stat = out
    if splits > 1:
        rows = splits * b * h  # [splits, B, H] rows of D sums, then of (top, total)
        buffer, _ = kernels.workspace(qp.device, rows * (d + 2), 1, use="absorbed")
        ws, stat = buffer[: rows * d], buffer[rows * d : rows * (d + 2)]
    args: list[Tensor | int] = [qp, e, out, ws, stat, e.shape[1], qp.stride(0), qp.stride(1), e.stride(0),
                                e.stride(1), out.stride(0), out.stride(1), b]  # fmt: skip
    cross.launch((b, splits, 1), int(dict(switches).get("WARPS", WARPS)) * 32, args)
    if splits > 1:
        merge.launch((b, h, 1), 128, [ws, stat, out, out.stride(0), out.stride(1), b])
    return out


def attend_reference(qp: Tensor, e: Tensor, out: Tensor) -> Tensor:
    """`attend` in PyTorch (float32 inside), on any device: the CPU tests' stand-in for the kernel."""
    b = qp.shape[0]
    scores = torch.softmax(qp.float() @ e[:b].float().transpose(1, 2), dim=-1)  # [B, H, A]
    out.copy_(scores @ e[:b].float())
    return out


@dataclass(frozen=True)
class AbsorbedCross:
    """A decoder's weights for the absorbed cross-attention: wk [L, H, Dh, D] (each head's rows of Wk, 1/√Dh
    folded in), wv [L, H, D, Dh] (each head's rows of Wv, transposed: a view), bias [L, D] (cross_out's bias with
    bv folded in: bo + Wo·bv), and whether `attend` is the PyTorch stand-in (the CPU tests)."""

    wk: Tensor
    wv: Tensor
    bias: Tensor
    reference: bool = False

    @classmethod
    def of(
        cls, kv_weight: Tensor, kv_bias: Tensor, out: Sequence[tuple[Tensor, Tensor]], heads: int, *, reference: bool
    ) -> AbsorbedCross:
        """From the decoder's stacked cross projections, kv_weight [L, 2D, D] and kv_bias [L, 2D] (keys first), and
        each layer's cross_out (weight [D, D], bias [D])."""
        layers, two_d, width = kv_weight.shape
        d = two_d // 2
        head_dim = d // heads
        with torch.no_grad():
            wk = (kv_weight[:, :d].float() * head_dim**-0.5).to(kv_weight.dtype).view(layers, heads, head_dim, width)
            wv = kv_weight[:, d:].view(layers, heads, head_dim, width).transpose(2, 3)
            bias = torch.stack([b.float() + w.float() @ kv_bias[i, d:].float() for i, (w, b) in enumerate(out)])
        return cls(wk.contiguous(), wv, bias.to(kv_weight.dtype), reference)

    def cross(self, layer: int, q: Tensor, audio: Tensor) -> Tensor:
        """A layer's cross-attention of q [B, H, Dh] (the cross_q projection) over audio [≥B, A, D] → [B, H·Dh],
        to go through cross_out's weight with `bias[layer]`."""
        b = q.shape[0]
        qp = torch.bmm(q.transpose(0, 1), self.wk[layer])  # Q' [H, B, D]
        z = torch.empty_like(qp)
        if self.reference:
            attend_reference(qp.transpose(0, 1), audio, z.transpose(0, 1))
        else:
            attend(qp.transpose(0, 1), audio, z.transpose(0, 1), splits=splits_for(b, q.device))
        return torch.bmm(z, self.wv[layer]).transpose(0, 1).reshape(b, -1)  # [H, B, Dh] → [B, H·Dh]
