"""Attention of one query per sequence over an FP8 (e4m3) key/value cache with a scale per position and
head: the decoder's cross-attention in the FP8 engine mode, where reading the cache is the whole cost
(large-v3 at batch 64 reads 15.7 GB of fp16 cross keys/values a step; e4m3 halves that).

The Triton version splits long key ranges across programs when the batch is small (flash-decoding), so a
single sequence still spreads over the GPU, and folds the scales into the scores and the probabilities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from halkspeech.model.kernels import use_triton

FP8_MAX = 448.0


def quantize_heads(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., Dh] → (e4m3 [..., Dh], float32 scale [...]): one scale per position and head."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-6) / FP8_MAX
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_heads(x8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (x8.float() * scale[..., None]).to(dtype)


def decode_attention(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor) -> Tensor:
    """q [B, H, Dh]; k8, v8 [B, H, A, Dh] e4m3; scales [B, H, A] float32 → [B, H, Dh] in q's dtype."""
    if use_triton(q.device):
        return _decode_attention_triton(q, k8, k_scale, v8, v_scale)
    return decode_attention_reference(q, k8, k_scale, v8, v_scale)


def decode_attention_reference(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor) -> Tensor:
    k = k8.float() * k_scale[..., None]
    v = v8.float() * v_scale[..., None]
    scores = torch.einsum("bhd,bhad->bha", q.float(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("bha,bhad->bhd", scores.softmax(dim=-1), v).to(q.dtype)


def _splits(batch: int, heads: int, keys: int, sms: int) -> int:
    """Programs per (sequence, head): enough to give every multiprocessor about two, at most 16."""
    want = max(1, math.ceil(2 * sms / (batch * heads)))
    splits = 1 << (want - 1).bit_length()
    return max(1, min(16, splits, keys // 64 or 1))


def _decode_attention_triton(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor) -> Tensor:
    from halkspeech.model.kernels._decode_attention_triton import attend_kernel, combine_kernel

    batch, heads, keys, head_dim = k8.shape
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    splits = _splits(batch, heads, keys, sms)
    block = 64
    chunk = math.ceil(math.ceil(keys / splits) / block) * block
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    if splits == 1:
        partial, maxes, sums = out, out, out  # unused: the kernel normalises and writes `out` directly
    else:
        partial = torch.empty((batch, heads, splits, head_dim), dtype=torch.float32, device=q.device)
        maxes = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
    attend_kernel[(batch, heads, splits)](
        q, k8, v8, k_scale, v_scale, out, partial, maxes, sums,
        keys, 1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1),
        k8.stride(0), k8.stride(1), k8.stride(2),
        v8.stride(0), v8.stride(1), v8.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        v_scale.stride(0), v_scale.stride(1),
        D=head_dim, BLOCK_N=block, SPLIT=splits > 1, NSPLIT=splits, CHUNK=chunk,
    )  # fmt: skip
    if splits > 1:
        combine_kernel[(batch, heads)](partial, maxes, sums, out, NSPLIT=splits, D=head_dim)
    return out
