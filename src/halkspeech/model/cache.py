"""Static key/value caches: one fixed block of memory per decoder slot, allocated once.

A decode step writes one position per slot and reads a fixed-size window, so its shapes never change and the
step can be captured in a CUDA graph (gpt-fast's `KVCache.update(input_pos, k, v)`, not `torch.cat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from halkspeech.model.dims import ModelDims


@dataclass
class KVCache:
    """Per-slot caches for every decoder layer.

    self_kv:          [L, S, T, 2, H, Dh]  self-attention keys (0) and values (1) at text positions 0..T-1;
                      laid out so one step's new key and value of a slot are one contiguous row, written
                      by a single index_copy_ for all slots (the projection already emits them side by side)
    cross_k, cross_v: [L, S, H, A, Dh]     cross-attention keys/values of the slot's audio, computed once
    cross_e:          [S, A, D] or None    the slot's audio itself (the encoder output), which the absorbed
                      cross-attention of large steps reads instead of keys and values (model/absorbed.py)
    (L decoder layers, S slots, H heads, T = n_text_ctx (448), A = n_audio_ctx (1500), Dh head size, D width)
    """

    self_kv: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    cross_e: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, dims: ModelDims, slots: int, *, dtype: torch.dtype, device: torch.device | str, audio: bool = False
    ) -> KVCache:
        heads, head_dim = dims.n_text_head, dims.n_text_state // dims.n_text_head
        self_shape = (dims.n_text_layer, slots, dims.n_text_ctx, 2, heads, head_dim)
        cross_shape = (dims.n_text_layer, slots, heads, dims.n_audio_ctx, head_dim)
        # zeros, not empty: a slot's unused positions are masked, but NaN garbage would still poison 0*NaN.
        return cls(
            self_kv=torch.zeros(self_shape, dtype=dtype, device=device),
            cross_k=torch.zeros(cross_shape, dtype=dtype, device=device),
            cross_v=torch.zeros(cross_shape, dtype=dtype, device=device),
            cross_e=torch.zeros(slots, dims.n_audio_ctx, dims.n_audio_state, dtype=dtype, device=device)
            if audio
            else None,
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

    def step_rows(self, layer: int) -> torch.Tensor:
        """A layer's self-attention cache as one row per (slot, position): [S*T, 2*H*Dh], row slot*T + position
        holding that position's key then value (a view)."""
        return self.self_kv[layer].view(-1, self.self_kv[layer, 0, 0].numel())

    def write_step(self, layer: int, rows: torch.Tensor, kv: torch.Tensor) -> None:
        """Store one new key/value per slot: kv [B, 2*H*Dh] at flat rows `slot * T + position` [B]."""
        self.step_rows(layer).index_copy_(0, rows, kv)

    @staticmethod
    def bytes_per_slot(dims: ModelDims, dtype: torch.dtype, *, audio: bool = False) -> int:
        """Memory one slot costs: 2 × L × (T + A) × D elements, and A × D more with its audio kept."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        elements = 2 * dims.n_text_layer * (dims.n_text_ctx + dims.n_audio_ctx) * dims.n_text_state
        return (elements + (dims.n_audio_ctx * dims.n_audio_state if audio else 0)) * itemsize

    def store_cross(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's cross-attention keys/values k, v [B, H, A, Dh] of the windows in `slots` [B]."""
        self.cross_k[layer, slots] = k
        self.cross_v[layer, slots] = v

    def store_audio(self, slots: torch.Tensor, audio: torch.Tensor) -> None:
        """Keep the windows' audio [B, A, D] in `slots` [B], where the cache keeps audio (cross_e)."""
        if self.cross_e is not None:
            self.cross_e[slots] = audio

    def _window(self, slot: int) -> list[torch.Tensor]:
        """Views of everything a slot keeps of its window: its cross-attention keys and values, and its audio."""
        views = [self.cross_k[:, slot], self.cross_v[:, slot]]
        return views if self.cross_e is None else [*views, self.cross_e[slot]]

    def copy_cross(self, src: int, dst: int) -> None:
        """Give slot `dst` the window of slot `src` (beams and samples of one request share it)."""
        torch._foreach_copy_(self._window(dst), self._window(src))

    def move_slots(self, pairs: Sequence[tuple[int, int]], length: int) -> None:
        """Compaction: for each (source, destination) pair, copy the source slot's self-attention state up to
        `length` and its cross-attention state into the destination. The slots are distinct, none both a source
        and a destination. All the copies in one torch call: each call gives up the GIL, which the engine thread
        must then win back from the request threads (up to the switch interval each under load; bench/NOTES.md,
        session 33). Basic-index views, not index tensors: gathering the sources first would need a temporary
        as large as the slots moved (123 MB of cross keys a large-v3 slot)."""
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for s, d in pairs:
            dst += [self.self_kv[:, d, :length], *self._window(d)]
            src += [self.self_kv[:, s, :length], *self._window(s)]
        if dst:
            torch._foreach_copy_(dst, src)
