"""Static key/value caches: one fixed block of memory per decoder slot, allocated once.

A decode step writes one position per slot and reads a fixed-size window, so its shapes never change and the
step can be captured in a CUDA graph (gpt-fast's `KVCache.update(input_pos, k, v)`, not `torch.cat`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halkspeech.model.dims import ModelDims


@dataclass
class KVCache:
    """Per-slot caches for every decoder layer.

    self_k, self_v:   [L, S, H, T, Dh]  self-attention keys/values at text positions 0..T-1
    cross_k, cross_v: [L, S, H, A, Dh]  cross-attention keys/values of the slot's audio window, computed once
    (L decoder layers, S slots, H heads, T = n_text_ctx (448), A = n_audio_ctx (1500), Dh head size)
    """

    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor

    @classmethod
    def allocate(
        cls, dims: ModelDims, slots: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        heads, head_dim = dims.n_text_head, dims.n_text_state // dims.n_text_head
        self_shape = (dims.n_text_layer, slots, heads, dims.n_text_ctx, head_dim)
        cross_shape = (dims.n_text_layer, slots, heads, dims.n_audio_ctx, head_dim)
        # zeros, not empty: a slot's unused positions are masked, but NaN garbage would still poison 0*NaN.
        return cls(
            self_k=torch.zeros(self_shape, dtype=dtype, device=device),
            self_v=torch.zeros(self_shape, dtype=dtype, device=device),
            cross_k=torch.zeros(cross_shape, dtype=dtype, device=device),
            cross_v=torch.zeros(cross_shape, dtype=dtype, device=device),
        )

    @property
    def slots(self) -> int:
        return self.self_k.shape[1]

    @staticmethod
    def bytes_per_slot(dims: ModelDims, dtype: torch.dtype) -> int:
        """Memory one slot costs: 2 × L × (T + A) × D elements."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * dims.n_text_layer * (dims.n_text_ctx + dims.n_audio_ctx) * dims.n_text_state * itemsize

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's self-attention state up to `length` and its cross-attention state (beam forks)."""
        self.self_k[:, dst, :, :length] = self.self_k[:, src, :, :length]
        self.self_v[:, dst, :, :length] = self.self_v[:, src, :, :length]
        self.cross_k[:, dst] = self.cross_k[:, src]
        self.cross_v[:, dst] = self.cross_v[:, src]
