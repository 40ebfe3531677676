"""Static key/value caches: one fixed block of memory per decoder slot, allocated once.

A decode step writes one position per slot and reads a fixed-size window, so its shapes never change and the
step can be captured in a CUDA graph (gpt-fast's `KVCache.update(input_pos, k, v)`, not `torch.cat`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halkspeech.model.dims import ModelDims
from halkspeech.model.kernels.decode_attention import dequantize_heads, quantize_heads


@dataclass
class KVCache:
    """Per-slot caches for every decoder layer.

    self_kv:          [L, S, T, 2, H, Dh]  self-attention keys (0) and values (1) at text positions 0..T-1;
                      laid out so one step's new key and value of a slot are one contiguous row, written
                      by a single index_copy_ for all slots (the projection already emits them side by side)
    cross_k, cross_v: [L, S, H, A, Dh]     cross-attention keys/values of the slot's audio, computed once;
                      e4m3 in the FP8 mode, with cross_k_scale, cross_v_scale [L, S, H, A] float32
                      (one scale per position and head: halves the bytes a decode step reads)
    (L decoder layers, S slots, H heads, T = n_text_ctx (448), A = n_audio_ctx (1500), Dh head size)
    """

    self_kv: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    cross_k_scale: torch.Tensor | None = None
    cross_v_scale: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, dims: ModelDims, slots: int, *, dtype: torch.dtype, device: torch.device | str, cross_fp8: bool = False
    ) -> KVCache:
        heads, head_dim = dims.n_text_head, dims.n_text_state // dims.n_text_head
        self_shape = (dims.n_text_layer, slots, dims.n_text_ctx, 2, heads, head_dim)
        cross_shape = (dims.n_text_layer, slots, heads, dims.n_audio_ctx, head_dim)
        # zeros, not empty: a slot's unused positions are masked, but NaN garbage would still poison 0*NaN.
        cross_dtype = torch.float8_e4m3fn if cross_fp8 else dtype
        scales = (lambda: torch.zeros(cross_shape[:-1], device=device)) if cross_fp8 else (lambda: None)
        return cls(
            self_kv=torch.zeros(self_shape, dtype=dtype, device=device),
            cross_k=torch.zeros(cross_shape, dtype=cross_dtype, device=device),
            cross_v=torch.zeros(cross_shape, dtype=cross_dtype, device=device),
            cross_k_scale=scales(),
            cross_v_scale=scales(),
        )

    @property
    def slots(self) -> int:
        return self.self_kv.shape[1]

    @property
    def n_text_ctx(self) -> int:
        return self.self_kv.shape[2]

    def keys(self, layer: int, size: int, window: int) -> torch.Tensor:
        """Self-attention keys of slots 0..size-1, positions 0..window-1: [size, H, window, Dh] (a view)."""
        return self.self_kv[layer, :size, :window, 0].transpose(1, 2)

    def values(self, layer: int, size: int, window: int) -> torch.Tensor:
        return self.self_kv[layer, :size, :window, 1].transpose(1, 2)

    def write_step(self, layer: int, rows: torch.Tensor, kv: torch.Tensor) -> None:
        """Store one new key/value per slot: kv [B, 2*H*Dh] at flat rows `slot * T + position` [B]."""
        flat = self.self_kv[layer].view(-1, *self.self_kv.shape[3:])  # [S*T, 2, H, Dh]
        flat.index_copy_(0, rows, kv.view(kv.shape[0], *self.self_kv.shape[3:]))

    @property
    def cross_fp8(self) -> bool:
        return self.cross_k_scale is not None

    @staticmethod
    def bytes_per_slot(dims: ModelDims, dtype: torch.dtype, cross_fp8: bool = False) -> int:
        """Memory one slot costs: 2 × L × (T × D × itemsize + A × (D × cross itemsize + H × 4 if FP8))."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        cross = (
            dims.n_audio_ctx * (dims.n_text_state + 4 * dims.n_text_head)
            if cross_fp8
            else (dims.n_audio_ctx * dims.n_text_state * itemsize)
        )
        return 2 * dims.n_text_layer * (dims.n_text_ctx * dims.n_text_state * itemsize + cross)

    def store_cross(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's cross-attention keys/values k, v [B, H, A, Dh] of the windows in `slots` [B]."""
        if self.cross_k_scale is None or self.cross_v_scale is None:
            self.cross_k[layer, slots] = k
            self.cross_v[layer, slots] = v
            return
        k8, k_scale = quantize_heads(k)
        v8, v_scale = quantize_heads(v)
        self.cross_k[layer, slots], self.cross_k_scale[layer, slots] = k8, k_scale
        self.cross_v[layer, slots], self.cross_v_scale[layer, slots] = v8, v_scale

    def cross(self, layer: int, slots: torch.Tensor | slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's cross keys/values for `slots` in `dtype`: [B, H, A, Dh] each (dequantised in FP8 mode)."""
        if self.cross_k_scale is None or self.cross_v_scale is None:
            return self.cross_k[layer, slots], self.cross_v[layer, slots]
        k = dequantize_heads(self.cross_k[layer, slots], self.cross_k_scale[layer, slots], dtype)
        return k, dequantize_heads(self.cross_v[layer, slots], self.cross_v_scale[layer, slots], dtype)

    def copy_cross(self, src: int, dst: int) -> None:
        """Give slot `dst` the window of slot `src` (beams and samples of one request share it)."""
        for tensor in (self.cross_k, self.cross_v, self.cross_k_scale, self.cross_v_scale):
            if tensor is not None:
                tensor[:, dst] = tensor[:, src]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's self-attention state up to `length` and its cross-attention state (compaction)."""
        self.self_kv[:, dst, :length] = self.self_kv[:, src, :length]
        self.copy_cross(src, dst)
